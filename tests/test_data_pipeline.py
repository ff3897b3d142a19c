"""Tests for train.data: reading, validation cut, packing, shuffling, resume, evaluation batches, cache.

Oracles are plain-Python re-implementations written here from the documented conventions
(docs/data.md cut rule, stride-seq_len packing, EOS-separated documents).
"""
import gzip
import json
import os

import numpy as np
import pytest

from train.data import default_data_config, make_data
from train.data import corpus as corpus_lib
from train.data import sources

EOS = 256


def oracle_split(data, frac):
  """README rule by an explicit scan: cut after the first newline at or after floor(n*(1-frac))."""
  n = len(data)
  mark = int(n * (1 - frac)) if frac > 0 else n
  for j in range(mark, n):
    if data[j] == ord("\n"):
      return data[:j + 1], data[j + 1:]
  return data, b""


def oracle_streams(docs, frac):
  train, val = [], []
  for d in docs:
    t, v = oracle_split(d, frac)
    if t:
      train += list(t) + [EOS]
    if v:
      val += list(v) + [EOS]
  return train, val


def oracle_rows(stream, seq_len):
  rows, i = [], 0
  while i + seq_len + 1 <= len(stream):
    rows.append(stream[i:i + seq_len + 1])
    i += seq_len
  return rows


def make_docs(rng, n_docs, lo=200, hi=900):
  words = ["alpha", "beta", "gamma", "delta", "\u00e9t\u00e9", "\u4e2d\u6587", "x=1", "  indent", "\t", "end"]
  docs = []
  for _ in range(n_docs):
    n = int(rng.integers(lo, hi))
    parts = []
    while sum(len(p) for p in parts) < n:
      parts.append(str(rng.choice(words)))
      if rng.random() < 0.15:
        parts.append("\n")
      else:
        parts.append(" ")
    docs.append("".join(parts).encode("utf-8"))
  return docs


def write_txt(tmp_path, docs):
  paths = []
  for i, d in enumerate(docs):
    p = tmp_path / f"doc{i:03d}.txt"
    p.write_bytes(d)
    paths.append(p)
  return paths


def cfg_for(tmp_path, **kw):
  c = default_data_config()
  c.source = "files"
  c.paths = str(tmp_path / "*.txt")
  c.cache_dir = str(tmp_path / "cache")
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture
def corpus_dir(tmp_path):
  docs = make_docs(np.random.default_rng(0), 12)
  write_txt(tmp_path, docs)
  return tmp_path, docs


def test_split_document_matches_oracle():
  rng = np.random.default_rng(1)
  for d in make_docs(rng, 30, 1, 400) + [b"", b"no newline at all", b"\n", b"a\nb\n", b"abc\n"]:
    for frac in (0.0, 0.02, 0.1, 0.5, 0.99):
      assert sources.split_document(d, frac) == oracle_split(d, frac)
  # The README example: the newline itself stays in the training part.
  assert sources.split_document(b"0123456789\nabc", 0.3) == (b"0123456789\n", b"abc")
  assert sources.split_document(b"0123456789\nabc", 0.2) == (b"0123456789\nabc", b"")  # no newline after mark


@pytest.mark.parametrize("seq_len", [7, 16])
def test_packing_and_split_against_oracle(corpus_dir, seq_len):
  tmp_path, docs = corpus_dir
  train_s, val_s = oracle_streams(docs, 0.1)
  rows = oracle_rows(train_s, seq_len)
  b = make_data(cfg_for(tmp_path, val_fraction=0.1), seq_len=seq_len, global_batch=4, seed=3)
  assert b.vocab_size == 257 and b.tokenizer.eos_id == EOS
  assert b.train.num_sequences == len(rows)
  seen = []
  for _ in range(b.train.batches_per_epoch):
    batch = next(b.train)
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (4, seq_len + 1)
    assert batch["ids"].dtype == np.int64 and batch["epoch"] == 0
    for tok, i in zip(batch["tokens"], batch["ids"]):
      np.testing.assert_array_equal(tok, rows[i])
    seen += batch["ids"].tolist()
  # One epoch = distinct sequences, all but the N mod B remainder, in a shuffled order.
  assert len(set(seen)) == len(seen) == (len(rows) // 4) * 4
  assert seen != sorted(seen)
  # Evaluation: every target of the validation stream once, in order, padding masked.
  targets, n_rows = [], 0
  for eb in b.eval_batches():
    assert eb["tokens"].shape == (4, seq_len + 1) and eb["mask"].shape == (4, seq_len)
    assert eb["mask"].dtype == np.float32
    for tok, m in zip(eb["tokens"], eb["mask"]):
      k = int(m.sum())
      assert np.all(m[:k] == 1) and np.all(m[k:] == 0)
      targets += tok[1:k + 1].tolist()
      if k:
        # Row r starts at val[r * seq_len].
        assert tok[0] == val_s[n_rows * seq_len]
        n_rows += 1
  assert targets == val_s[1:]
  assert b.eval_num_tokens == len(val_s) - 1
  # Byte tokenizer: bits-per-byte denominator = non-EOS targets = validation text bytes minus the first token.
  assert b.eval_num_bytes == sum(1 for t in val_s[1:] if t != EOS)
  assert b.eval_num_bytes == sum(len(oracle_split(d, 0.1)[1]) for d in docs) - 1


def test_eval_max_tokens_and_restart(corpus_dir):
  tmp_path, docs = corpus_dir
  _, val_s = oracle_streams(docs, 0.1)
  b = make_data(cfg_for(tmp_path, val_fraction=0.1, eval_max_tokens=50), seq_len=8, global_batch=3, seed=0)
  assert b.eval_num_tokens == 50
  first = list(b.eval_batches())
  second = list(b.eval_batches())  # Each call restarts.
  assert len(first) == len(second) == 3  # ceil(50 / 8) = 7 rows -> 3 batches of 3 rows.
  for x, y in zip(first, second):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  assert sum(float(e["mask"].sum()) for e in first) == 50
  targets = [t for e in first for tok, m in zip(e["tokens"], e["mask"]) for t in tok[1:int(m.sum()) + 1]]
  assert targets == val_s[1:51]
  assert b.eval_num_bytes == sum(1 for t in val_s[1:51] if t != EOS)


def test_determinism_resume_and_epochs(corpus_dir):
  tmp_path, _ = corpus_dir
  cfg = cfg_for(tmp_path)
  a = make_data(cfg, seq_len=16, global_batch=8, seed=5)
  b = make_data(cfg, seq_len=16, global_batch=8, seed=5)
  bpe = a.train.batches_per_epoch
  assert bpe >= 3
  run = [next(a.train) for _ in range(3 * bpe + 2)]
  for x in run:
    y = next(b.train)
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["ids"], y["ids"])
  # Epoch counter and per-epoch reshuffle; ids are the same set each epoch.
  assert [x["epoch"] for x in run] == [e for e in range(4) for _ in range(bpe)][:3 * bpe + 2]
  ep = [np.concatenate([x["ids"] for x in run[e * bpe:(e + 1) * bpe]]) for e in range(3)]
  assert not np.array_equal(ep[0], ep[1]) and not np.array_equal(ep[1], ep[2])
  # Resume from every point (including epoch boundaries) through a JSON round trip of the state.
  for k in (0, 1, bpe - 1, bpe, bpe + 1, 2 * bpe):
    c = make_data(cfg, seq_len=16, global_batch=8, seed=5)
    for _ in range(k):
      next(c.train)
    state = json.loads(json.dumps(c.train.get_state()))
    d = make_data(cfg, seq_len=16, global_batch=8, seed=5)
    d.train.set_state(state)
    for j in range(k, min(k + bpe + 1, len(run))):
      x = next(d.train)
      np.testing.assert_array_equal(x["tokens"], run[j]["tokens"])
      np.testing.assert_array_equal(x["ids"], run[j]["ids"])
      assert x["epoch"] == run[j]["epoch"]
  # A different seed gives a different order of the same sequences; shuffle_seed overrides the seed.
  e = make_data(cfg, seq_len=16, global_batch=8, seed=6)
  assert not np.array_equal(next(e.train)["ids"], run[0]["ids"])
  cfg2 = cfg_for(tmp_path, shuffle_seed=5)
  f = make_data(cfg2, seq_len=16, global_batch=8, seed=123)
  np.testing.assert_array_equal(next(f.train)["ids"], run[0]["ids"])
  # ids do not depend on the batch size (stable across device counts): same rows for the same id.
  g = make_data(cfg, seq_len=16, global_batch=2, seed=5)
  x = next(g.train)
  rows = corpus_lib.load_corpus(cfg, a.tokenizer).train
  for tok, i in zip(x["tokens"], x["ids"]):
    np.testing.assert_array_equal(tok, rows[i * 16:i * 16 + 17])


def test_set_state_rejects_bad_state(corpus_dir):
  tmp_path, _ = corpus_dir
  b = make_data(cfg_for(tmp_path), seq_len=16, global_batch=8, seed=0)
  st = b.train.get_state()
  with pytest.raises(ValueError, match="num_sequences"):
    b.train.set_state({**st, "num_sequences": st["num_sequences"] + 1})
  with pytest.raises(ValueError, match="position"):
    b.train.set_state({"epoch": 0, "position": -1})
  with pytest.raises(ValueError, match="epoch"):
    b.train.set_state({"position": 0})


def test_jsonl_gz_and_plain_gz_reading(tmp_path):
  rng = np.random.default_rng(2)
  docs = make_docs(rng, 9)
  recs = [{"body": d.decode("utf-8"), "id": i} for i, d in enumerate(docs)]
  with open(tmp_path / "a.jsonl", "w") as f:
    for r in recs[:3]:
      f.write(json.dumps(r) + "\n")
    f.write("\n")  # Blank lines are skipped.
  with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
    for r in recs[3:6]:
      f.write(json.dumps(r) + "\n")
  with gzip.open(tmp_path / "c.txt.gz", "wb") as f:
    f.write(b"".join(docs[6:]))  # One gzip text file = one document.
  got = list(sources.file_documents(sources.expand_paths(
      f"{tmp_path}/*.jsonl, {tmp_path}/*.jsonl.gz,{tmp_path}/*.gz"), "body"))
  assert got == docs[:6] + [b"".join(docs[6:])]  # Duplicated matches (b.jsonl.gz) are read once.
  c = default_data_config()
  c.update(source="files", paths=f"{tmp_path}/*.jsonl*,{tmp_path}/c.txt.gz", text_field="body",
           cache_dir="", val_fraction=0.05)
  b = make_data(c, seq_len=8, global_batch=2, seed=0)
  train_s, val_s = oracle_streams(got, 0.05)
  assert b.train.num_sequences == len(oracle_rows(train_s, 8))
  assert b.eval_num_tokens == len(val_s) - 1
  # A record without the text field is a clear error naming file, line and field.
  with open(tmp_path / "bad.jsonl", "w") as f:
    f.write(json.dumps({"text": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1.*'body'"):
    list(sources.file_documents([str(tmp_path / "bad.jsonl")], "body"))


def test_stdlib_source_small_cap(tmp_path):
  files = sources.stdlib_files()
  rel = [os.path.relpath(f, sources.stdlib_root()) for f in files]
  assert rel == sorted(rel, key=lambda p: p.replace(os.sep, "/"))
  assert all(p.endswith(".py") for p in rel)
  parts = [set(p.split(os.sep)[:-1]) for p in rel]
  assert not any(s & {"site-packages", "dist-packages", "test", "tests", "idle_test"} for s in parts)
  assert "argparse.py" in rel and os.path.join("json", "decoder.py") in rel
  cap = 60_000
  # Oracle: the first files in order, concatenated, cut at the cap.
  want, total = [], 0
  for f in files:
    d = open(f, "rb").read().decode("utf-8", errors="replace").encode("utf-8")
    if total + len(d) >= cap:
      want.append(d[:cap - total].decode("utf-8", errors="ignore").encode("utf-8"))
      break
    want.append(d)
    total += len(d)
  c = default_data_config()
  c.update(source="stdlib", max_bytes=cap, cache_dir=str(tmp_path / "cache"))
  b = make_data(c, seq_len=32, global_batch=4, seed=0)
  train_s, val_s = oracle_streams(want, 0.02)
  assert b.info["train_text_bytes"] + b.info["val_text_bytes"] == sum(len(w) for w in want) <= cap
  assert b.train.num_sequences == len(oracle_rows(train_s, 32))
  assert b.eval_num_tokens == len(val_s) - 1
  rows = oracle_rows(train_s, 32)
  x = next(b.train)
  for tok, i in zip(x["tokens"], x["ids"]):
    np.testing.assert_array_equal(tok, rows[i])
  assert b"import " in b"".join(want)


def test_cache_hit_and_invalidation(corpus_dir, monkeypatch):
  tmp_path, docs = corpus_dir
  cfg = cfg_for(tmp_path)
  a = make_data(cfg, seq_len=16, global_batch=4, seed=0)
  path = a.info["cache_path"]
  assert os.path.isfile(os.path.join(path, "train.npy")) and os.path.isfile(os.path.join(path, "meta.json"))
  real = corpus_lib.write_streams

  def fail(*args, **kwargs):
    raise AssertionError("cache was rebuilt")

  monkeypatch.setattr(corpus_lib, "write_streams", fail)
  b = make_data(cfg, seq_len=16, global_batch=4, seed=0)  # Served from the cache.
  assert b.info["cache_path"] == path
  assert isinstance(corpus_lib.load_corpus(cfg, b.tokenizer).train, np.memmap)  # Memory-mapped, not loaded.
  np.testing.assert_array_equal(next(a.train)["tokens"], next(b.train)["tokens"])
  # Changing a file (size/mtime) changes the key and rebuilds.
  monkeypatch.setattr(corpus_lib, "write_streams", real)
  (tmp_path / "doc000.txt").write_bytes(docs[0] + b"more text\n")
  c = make_data(cfg, seq_len=16, global_batch=4, seed=0)
  assert c.info["cache_path"] != path
  assert c.info["train_text_bytes"] + c.info["val_text_bytes"] == sum(map(len, docs)) + 10
  # No cache: same streams in memory.
  d = make_data(cfg_for(tmp_path, cache_dir=""), seq_len=16, global_batch=4, seed=0)
  assert d.info["cache_path"] is None
  np.testing.assert_array_equal(next(d.train)["tokens"], next(make_data(
      cfg, seq_len=16, global_batch=4, seed=0).train)["tokens"])
  leftovers = [n for n in os.listdir(tmp_path / "cache") if ".tmp." in n]
  assert not leftovers


def test_synthetic_source():
  c = default_data_config()
  c.update(source="synthetic", synthetic_vocab_size=1000, eval_max_tokens=100)
  a = make_data(c, seq_len=16, global_batch=4, seed=1)
  b = make_data(c, seq_len=16, global_batch=4, seed=1)
  assert a.vocab_size == 1000 and a.eval_num_bytes == 0 and a.eval_num_tokens == 100
  xs = [next(a.train) for _ in range(3)]
  assert all(x["tokens"].shape == (4, 17) and x["tokens"].dtype == np.int32 for x in xs)
  assert all(0 <= x["tokens"].min() and x["tokens"].max() < 1000 for x in xs)
  np.testing.assert_array_equal(np.concatenate([x["ids"] for x in xs]), np.arange(12))
  b.train.set_state(json.loads(json.dumps({"epoch": 0, "position": 4})))
  np.testing.assert_array_equal(next(b.train)["tokens"], xs[1]["tokens"])
  assert not np.array_equal(xs[0]["tokens"], xs[1]["tokens"])
  ev = list(a.eval_batches())
  assert sum(float(e["mask"].sum()) for e in ev) == 100 and len(ev) == 2  # 7 rows of 16 -> 2 batches.
  np.testing.assert_array_equal(ev[0]["tokens"], next(iter(a.eval_batches()))["tokens"])


class _FakeTfds:
  """Minimal stand-in for tensorflow_datasets: `load(name, split=, data_dir=, shuffle_files=)`, `as_numpy`."""

  def __init__(self, splits):
    self.splits = splits
    self.calls = []

  def load(self, name, split, data_dir=None, shuffle_files=True):
    self.calls.append((name, split, data_dir, shuffle_files))
    if name != "fake/en":
      raise RuntimeError(f"Dataset {name} not found")
    return self.splits[split]

  def as_numpy(self, ds):
    return iter(ds)


def test_tfds_source_with_fake_module(tmp_path, monkeypatch):
  import sys
  rng = np.random.default_rng(4)
  tr, va = make_docs(rng, 6), make_docs(rng, 3)
  fake = _FakeTfds({"train": [{"text": d} for d in tr], "validation": [{"text": d} for d in va]})
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  c = default_data_config()
  c.update(source="tfds", tfds_name="fake/en", cache_dir=str(tmp_path / "c"), pipeline="cached")
  b = make_data(c, seq_len=8, global_batch=2, seed=0)
  assert ("fake/en", "train", None, False) in fake.calls
  train_s, _ = oracle_streams(tr, 0.0)  # Separate validation split: training documents are used whole.
  val_s, _ = oracle_streams(va, 0.0)
  assert b.train.num_sequences == len(oracle_rows(train_s, 8))
  assert b.eval_num_tokens == len(val_s) - 1
  assert b.eval_num_bytes == sum(map(len, va)) - 1
  c.update(tfds_name="nope/en", cache_dir="")
  with pytest.raises(ValueError, match="nope/en"):
    make_data(c, seq_len=8, global_batch=2, seed=0)


def test_vocab_limit_refuses_the_first_id_equal_to_the_limit():
  from train.data.pipeline import check_vocab
  check_vocab(np.array([[0, 4, 3]]), 5, "training")      # ids 0..4 fit an embedding of 5 rows
  check_vocab(np.array([[0, 5, 3]]), 0, "training")      # 0 = no limit
  with pytest.raises(ValueError, match=r"token id 5 in a training batch is >= data.vocab_limit=5"):
    check_vocab(np.array([[0, 5, 3]]), 5, "training")


def test_synthetic_source_gives_each_process_its_own_rows():
  """Process p of P reads rows [p·B/P, (p+1)·B/P) of every global batch, for training and evaluation."""
  c = default_data_config()
  c.update(source="synthetic", synthetic_vocab_size=1000, eval_max_tokens=100)
  whole = make_data(c, seq_len=16, global_batch=4, seed=1)
  parts = [make_data(c, seq_len=16, global_batch=4, seed=1, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(2):
    want = next(whole.train)
    got = [next(p.train) for p in parts]
    for key in ("tokens", "ids", "mask"):
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key], err_msg=key)
  for want, *got in zip(whole.eval_batches(), *[p.eval_batches() for p in parts]):
    for key in ("tokens", "mask"):
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key], err_msg=key)


def test_eval_batches_of_one_target():
  """The smallest evaluation set, one target: one row holding one input token and its target, mask 1 there."""
  from train.data.pipeline import eval_rows, make_eval_batches
  assert (eval_rows(4, 0), eval_rows(4, 1), eval_rows(4, 4), eval_rows(4, 5)) == (0, 1, 1, 2)
  stream = np.arange(10, 30, dtype=np.int32)
  (batch,) = list(make_eval_batches(stream, seq_len=4, global_batch=2, num_targets=1)())
  np.testing.assert_array_equal(batch["tokens"][0], [10, 11, 0, 0, 0])
  np.testing.assert_array_equal(batch["mask"], [[1, 0, 0, 0], [0, 0, 0, 0]])
  assert list(make_eval_batches(stream, seq_len=4, global_batch=2, num_targets=0)()) == []


def test_stream_dtype_holds_every_id():
  """Token streams are uint16 while every id (0 .. vocab_size-1) fits, uint32 from a vocabulary of 65537 on."""
  class Tok:
    eos_id = 0
    def __init__(self, n):
      self.vocab_size = n
  for n, want in ((256, "uint16"), (65536, "uint16"), (65537, "uint32")):
    (train, _, _), stats = corpus_lib.write_streams(Tok(n), [], [], 0.0, 0, None)
    assert stats["dtype"] == want and train.dtype == np.dtype(want), n


def test_write_streams_statistics():
  from train.data.tokenizers import make_tokenizer
  docs = [b"first line\nsecond line\n", b"short\n", b"a b c\nd e f\n"]
  (train, val, vbytes), stats = corpus_lib.write_streams(make_tokenizer("byte"), docs, None, 0.5, 0, None)
  assert stats["num_docs"] == 3
  assert stats["train_text_bytes"] + stats["val_text_bytes"] == sum(len(d) for d in docs)
  assert (stats["train_tokens"], stats["val_tokens"]) == (train.shape[0], val.shape[0])
  assert int(vbytes.sum()) == stats["val_text_bytes"]       # each byte token stands for one byte of text
