"""Tests for train.data tokenizers and the offline SentencePiece training command.

Oracles: Python's own UTF-8 codec for the byte tokenizer; exact text round trip and the `sentencepiece`
library's processor (loaded independently from the written file) for the SentencePiece model.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from train.data import SentencePieceTokenizer, default_data_config, make_data
from train.data import train_tokenizer
from train.data.tokenizers import ByteTokenizer

SAMPLES = ["hello world", "", "  indented\n\tline\n\n", "caf\u00e9 \u4e2d\u6587 \U0001f600", "x = [1, 2, 3]  # c"]


def oracle_split(data, frac):
  """README validation cut by an explicit scan (after the first newline at/after floor(n*(1-frac)))."""
  for j in range(int(len(data) * (1 - frac)), len(data)):
    if data[j] == ord("\n"):
      return data[:j + 1], data[j + 1:]
  return data, b""


def corpus_lines(n=400):
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "value", "class", "import", "numpy", "the", "data", "for", "in", "range",
           "if", "else", "print", "caf\u00e9", "x", "y", "=", "(", ")", ":", "0", "1", "42"]
  lines = []
  for _ in range(n):
    indent = "    " * int(rng.integers(0, 3))
    lines.append(indent + " ".join(str(w) for w in rng.choice(words, int(rng.integers(3, 12)))))
  return lines


def test_byte_tokenizer_against_utf8():
  t = ByteTokenizer()
  assert t.vocab_size == 257 and t.eos_id == 256 and t.name == "byte"
  for s in SAMPLES:
    ids = t.encode(s)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, list(s.encode("utf-8")))
    assert t.decode(ids) == s
    assert t.decode(np.append(ids, t.eos_id)) == s  # EOS is dropped when decoding.
    assert t.token_byte_lengths(np.append(ids, 256), 0).sum() == len(s.encode("utf-8"))
  assert t.decode([0, 65, 255, 256]) == "\x00A\ufffd"     # the byte 0 is text too; 255 alone is invalid UTF-8


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok") / "tiny.model"
  train_tokenizer.train_sentencepiece(corpus_lines(), str(out), vocab_size=400, num_threads=1)
  return str(out)


def test_sentencepiece_train_encode_decode_roundtrip(sp_model):
  import sentencepiece as spm
  tok = SentencePieceTokenizer(sp_model)
  ref = spm.SentencePieceProcessor(model_file=sp_model)
  assert tok.vocab_size == ref.get_piece_size() <= 400 and tok.eos_id == ref.eos_id() == 2
  assert tok.name == "sentencepiece:tiny.model"
  texts = SAMPLES + ["def value(self):\n    return self.data  # caf\u00e9\n", "\u00c5ngstr\u00f6m \u2192 \ufb01"]
  for s in texts:
    ids = tok.encode(s)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, ref.encode(s))
    assert tok.decode(ids) == s  # Identity normalisation + byte fallback: exact round trip.
    assert 2 not in ids.tolist()  # No EOS/BOS added by encode.
  for ids, s in zip(tok.encode_batch(texts), texts):
    np.testing.assert_array_equal(ids, ref.encode(s))
  # Learned merges compress the training text.
  text = "\n".join(corpus_lines(50))
  assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2
  # Byte lengths per token sum exactly to the document's bytes.
  for s in texts:
    ids = tok.encode(s)
    lens = tok.token_byte_lengths(ids, len(s.encode("utf-8")))
    assert lens.shape == ids.shape and (lens >= 0).all() and lens.sum() == len(s.encode("utf-8"))


def test_sentencepiece_in_make_data(sp_model, tmp_path):
  lines = corpus_lines(300)
  docs = ["\n".join(lines[i:i + 30]) + "\n" for i in range(0, 300, 30)]
  for i, d in enumerate(docs):
    (tmp_path / f"d{i}.txt").write_text(d, encoding="utf-8")
  c = default_data_config()
  c.update(source="files", paths=str(tmp_path / "*.txt"), tokenizer="sentencepiece", tokenizer_path=sp_model,
           cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
  b = make_data(c, seq_len=16, global_batch=2, seed=0)
  tok = b.tokenizer
  assert b.vocab_size == tok.vocab_size
  # Oracle stream: encode each (train, val) part with the reference tokenizer, EOS-separated.
  train_s, val_s, val_text = [], [], 0
  for d in docs:
    t, v = oracle_split(d.encode("utf-8"), 0.1)
    train_s += tok.encode(t.decode()).tolist() + [tok.eos_id]
    if v:
      val_s += tok.encode(v.decode()).tolist() + [tok.eos_id]
      val_text += len(v)
  assert b.train.num_sequences == (len(train_s) - 1) // 16
  x = next(b.train)
  for row, i in zip(x["tokens"], x["ids"]):
    np.testing.assert_array_equal(row, train_s[i * 16:i * 16 + 17])
  assert b.eval_num_tokens == len(val_s) - 1
  targets = [t for e in b.eval_batches() for row, m in zip(e["tokens"], e["mask"]) for t in row[1:int(m.sum()) + 1]]
  assert targets == val_s[1:]
  # Bytes behind the targets: all validation text except the part behind the stream's first token.
  first = len(tok.decode(val_s[:1]).encode("utf-8"))
  assert val_text - first - 1 <= b.eval_num_bytes <= val_text
  assert b.info["val_text_bytes"] == val_text


def test_train_tokenizer_cli(tmp_path, sp_model):
  (tmp_path / "a.txt").write_text("\n".join(corpus_lines(200)) + "\n", encoding="utf-8")
  out = tmp_path / "tok" / "cli.model"
  cmd = [sys.executable, "-m", "train.data.train_tokenizer", "--source=files", f"--paths={tmp_path}/*.txt",
         "--vocab_size=300", "--num_threads=1", f"--out={out}"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
  assert r.returncode == 0, r.stderr
  assert out.is_file() and SentencePieceTokenizer(str(out)).decode(SentencePieceTokenizer(str(out)).encode(
      "    return x\n")) == "    return x\n"
  mtime = out.stat().st_mtime_ns
  # Refuses to overwrite without --overwrite (one clear error line, exit code 2).
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
  assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
  assert out.stat().st_mtime_ns == mtime
  with pytest.raises(ValueError, match="already exists"):
    train_tokenizer.train_sentencepiece(["a b c"], str(out), 300)
  # Validation tails are excluded from tokenizer training.
  docs = [b"train line\nmore train\n" * 40 + b"HELDOUT tail\n"]
  lines = list(train_tokenizer.training_lines(docs, 0.02))
  assert lines and not any("HELDOUT" in l for l in lines)
  with pytest.raises(ValueError, match="vocab_size"):
    train_tokenizer.train_sentencepiece(["a"], str(tmp_path / "x.model"), 100)
  with pytest.raises(ValueError, match="vocab_size=259"):
    train_tokenizer.train_sentencepiece([], str(tmp_path / "x.model"), 259)
  with pytest.raises(ValueError, match="empty corpus"):         # 260, the smallest vocabulary, passes that check
    train_tokenizer.train_sentencepiece([], str(tmp_path / "x.model"), 260)
