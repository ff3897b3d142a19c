"""Trains a SentencePiece tokenizer offline on the TRAINING split of a corpus and writes the .model file.

    python -m train.data.train_tokenizer --source=stdlib --vocab_size=8192 --out=tok/stdlib_sp8k.model
    python -m train.data.train_tokenizer --source=files --paths='data/*.jsonl.gz' --vocab_size=32000 \
        --max_bytes=200000000 --out=tok/my_sp32k.model

Use it with `--config.data.tokenizer=sentencepiece --config.data.tokenizer_path=tok/stdlib_sp8k.model`.
The validation part of each document (same `--val_fraction` cut as `train.data`) is excluded, so evaluation
text is never seen by the tokenizer. Refuses to overwrite an existing output unless `--overwrite`.

Model options (chosen so code and any text round-trip exactly): BPE by default (`--model_type=unigram` also
works), identity normalisation, no whitespace collapsing, whitespace-only pieces allowed (indentation),
digits split, byte fallback (every byte is encodable, so decode(encode(x)) == x), ids unk=0, bos=1, eos=2 (EOS
separates documents), no pad. Training sentences are the non-empty lines of the training text (newlines are
encoded through byte fallback); at most `--max_sentences` lines, sampled by SentencePiece.
"""
import argparse
import io
import os
import sys

from train.data import sources


def training_lines(docs, val_fraction, max_line_bytes=8192):
  """Non-empty lines (str) of the training parts of `docs` (bytes), longest lines cut to max_line_bytes."""
  for d in docs:
    train_part, _ = sources.split_document(d, val_fraction)
    for line in train_part.split(b"\n"):
      if line.strip():
        yield line[:max_line_bytes].decode("utf-8", errors="ignore")


def train_sentencepiece(lines, out, vocab_size, model_type="bpe", overwrite=False, max_sentences=2_000_000,
                        num_threads=None, character_coverage=0.9995):
  """Trains on an iterable of str lines and writes `out` (atomically). Returns the output path."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel

  out = os.path.expanduser(str(out))
  if not out:
    raise ValueError("--out must name the .model file to write")
  if os.path.exists(out) and not overwrite:
    raise ValueError(f"output {out!r} already exists; pass --overwrite to replace it")
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 260:
    raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 260 (256 byte pieces + 4 specials)")
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type={model_type!r} must be 'bpe' or 'unigram'")
  lines = iter(lines)
  first = next(lines, None)
  if first is None:
    raise ValueError("empty corpus: no training text to train the tokenizer on")

  def all_lines():
    yield first
    yield from lines

  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=all_lines(), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
      character_coverage=character_coverage, byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
      split_digits=True, max_sentence_length=1 << 16, input_sentence_size=max_sentences,
      shuffle_input_sentence=True, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      num_threads=num_threads or min(8, os.cpu_count() or 1), minloglevel=2)
  d = os.path.dirname(os.path.abspath(out))
  os.makedirs(d, exist_ok=True)
  tmp = out + f".tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, out)
  return out


def corpus_documents(source, paths="", text_field="text", tfds_name="c4/en", tfds_data_dir="",
                     tfds_split="train", max_bytes=0):
  """Documents (bytes) of a corpus, as read by `train.data` (before the validation cut)."""
  if source == "stdlib":
    docs = sources.file_documents(sources.stdlib_files(), text_field)
  elif source == "files":
    docs = sources.file_documents(sources.expand_paths(paths), text_field)
  elif source == "tfds":
    docs = sources.tfds_documents(tfds_name, tfds_split, tfds_data_dir, text_field)
  else:
    raise ValueError(f"unknown source={source!r}; expected 'stdlib', 'files' or 'tfds'")
  return sources.capped(docs, max_bytes)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m train.data.train_tokenizer", description=__doc__.split("\n")[0])
  p.add_argument("--source", default="stdlib", help="stdlib | files | tfds")
  p.add_argument("--paths", default="", help="source=files: comma-separated globs")
  p.add_argument("--text_field", default="text")
  p.add_argument("--tfds_name", default="c4/en")
  p.add_argument("--tfds_data_dir", default="")
  p.add_argument("--max_bytes", type=int, default=0, help="cap on corpus bytes read (0 = all)")
  p.add_argument("--val_fraction", type=float, default=0.02, help="held-out tail of each document (excluded)")
  p.add_argument("--vocab_size", type=int, default=8192)
  p.add_argument("--model_type", default="bpe", help="bpe | unigram")
  p.add_argument("--max_sentences", type=int, default=2_000_000, help="lines sampled for training")
  p.add_argument("--num_threads", type=int, default=0)
  p.add_argument("--out", required=True, help="output .model file")
  p.add_argument("--overwrite", action="store_true")
  a = p.parse_args(argv)
  try:
    if not 0.0 <= a.val_fraction < 1.0:
      raise ValueError(f"val_fraction={a.val_fraction} must be in [0, 1)")
    if a.max_bytes < 0:
      raise ValueError(f"max_bytes={a.max_bytes} must be >= 0")
    if os.path.exists(os.path.expanduser(a.out)) and not a.overwrite:
      raise ValueError(f"output {a.out!r} already exists; pass --overwrite to replace it")
    docs = corpus_documents(a.source, a.paths, a.text_field, a.tfds_name, a.tfds_data_dir, "train", a.max_bytes)
    # With TFDS the validation split is separate, so the training split is used whole.
    val_fraction = 0.0 if a.source == "tfds" else a.val_fraction
    out = train_sentencepiece(training_lines(docs, val_fraction), a.out, a.vocab_size, a.model_type,
                              a.overwrite, a.max_sentences, a.num_threads or None)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
