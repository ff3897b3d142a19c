"""Tokenizers for the training data pipeline: byte-level, SentencePiece and Hugging Face `tokenizers`.

All expose the same small interface used by `train.data`:
  `.encode(str) -> np.int32[n]`, `.encode_batch(list[str]) -> list[np.int32[...]]`, `.decode(ids) -> str`,
  `.vocab_size`, `.eos_id`, `.name`, `.fingerprint` (a string that changes when the tokenizer changes; part of
  the token-cache key), `.token_byte_lengths(ids, num_bytes)` (UTF-8 bytes behind each token, for bits/byte).

* `ByteTokenizer`: ids 0..255 are the UTF-8 bytes of the text, id 256 is EOS (document separator);
  vocab_size 257. No files needed. Tokenizing is `np.frombuffer`.
* `SentencePieceTokenizer`: wraps a `.model` file (user-supplied, e.g. T5's `spiece.model` for C4 parity, or one
  trained offline with `python -m train.data.train_tokenizer`). No BOS/EOS is added by `encode`; documents are
  separated by the model's EOS id (if the model has none, an extra id `piece_size` is appended as EOS).
* `HFTokenizer`: a Hugging Face `tokenizers` file (`tokenizer.json`, or a folder holding one; a Hub name such as
  `t5-base` is fetched with `Tokenizer.from_pretrained`). Encodes without special tokens; EOS is the first of
  `</s>`, `<|endoftext|>`, `<eos>`, `[SEP]` found in the vocabulary (else an extra id = vocab size). T5's
  tokenizer has 32,100 ids (32,000 pieces + 100 sentinels); see `data.vocab_limit` in `docs/data.md`.
"""
import hashlib
import os

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as tokens (0..255) plus EOS = 256."""

  name = "byte"
  vocab_size = 257
  eos_id = 256
  fingerprint = "byte-v1"

  def encode(self, text):
    if isinstance(text, str):
      text = text.encode("utf-8")
    return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    ids = np.asarray(ids).reshape(-1)
    keep = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
    return keep.tobytes().decode("utf-8", errors="replace")

  def token_byte_lengths(self, ids, num_bytes):
    del num_bytes  # Exact: one byte per byte token.
    ids = np.asarray(ids)
    return (ids < 256).astype(np.int32)


class SentencePieceTokenizer:
  """A SentencePiece model file; `encode` adds no BOS/EOS."""

  def __init__(self, path, num_threads=None):
    import sentencepiece as spm  # Installed with the package (install_requires).

    path = os.path.expanduser(str(path))
    if not path:
      raise ValueError("tokenizer='sentencepiece' needs data.tokenizer_path (a SentencePiece .model file); got ''")
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer_path={path!r} does not exist (expected a SentencePiece .model file)")
    with open(path, "rb") as f:
      proto = f.read()
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError depending on version.
      raise ValueError(f"tokenizer_path={path!r} is not a valid SentencePiece model: {e}") from None
    self.path = path
    self.name = "sentencepiece:" + os.path.basename(path)
    self.fingerprint = "sentencepiece-v1:" + hashlib.sha256(proto).hexdigest()
    self._num_threads = num_threads or min(8, os.cpu_count() or 1)
    n = self._sp.get_piece_size()
    eos = self._sp.eos_id()
    self.eos_id = int(eos) if eos >= 0 else n
    self.vocab_size = n if eos >= 0 else n + 1
    # Estimated UTF-8 bytes per piece ('\u2581' is one space byte, byte-fallback pieces are one byte, control
    # and unknown pieces 0); rescaled per document in `token_byte_lengths` so that sums are exact.
    lengths = np.zeros(self.vocab_size, np.int64)
    for i in range(n):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      if self._sp.is_byte(i):
        lengths[i] = 1
      else:
        lengths[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    self._piece_bytes = lengths

  def encode(self, text):
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def encode_batch(self, texts):
    texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
    if not texts:
      return []
    out = self._sp.encode(texts, out_type=int, num_threads=self._num_threads)
    return [np.asarray(o, dtype=np.int32) for o in out]

  def decode(self, ids):
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < self._sp.get_piece_size()]
    return self._sp.decode(ids)

  def token_byte_lengths(self, ids, num_bytes):
    """Bytes of original text behind each token of one document; sums exactly to `num_bytes`.

    Per-piece estimates are accumulated and rescaled to the true byte count of the document (normalisation such
    as T5's whitespace collapsing makes pieces differ from the raw text), so whole documents are exact and a
    partially evaluated document is apportioned by piece length.
    """
    return _rescaled_lengths(self._piece_bytes, ids, num_bytes)


def _rescaled_lengths(piece_bytes, ids, num_bytes):
  """Per-token byte estimates rescaled so that one document's tokens sum exactly to `num_bytes`."""
  ids = np.asarray(ids, dtype=np.int64)
  if ids.size == 0:
    return np.zeros(0, np.int32)
  est = np.cumsum(piece_bytes[ids])
  if est[-1] <= 0:
    out = np.zeros(ids.size, np.int64)
    out[-1] = num_bytes
    return out.astype(np.int32)
  cum = (est * int(num_bytes)) // int(est[-1])
  return np.diff(cum, prepend=0).astype(np.int32)


EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer`; `encode` adds no special tokens."""

  def __init__(self, path):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ValueError("tokenizer='hf' needs the `tokenizers` package: run `pip install -e .[hf]`") from None
    path = str(path or "")
    if not path:
      raise ValueError("tokenizer='hf' needs data.tokenizer_path (a tokenizer.json file, a folder holding one, "
                       "or a Hugging Face Hub name such as 't5-base'); got ''")
    local = os.path.expanduser(path)
    if local.endswith(".model"):
      raise ValueError(f"tokenizer_path={path!r} looks like a SentencePiece model: set data.tokenizer="
                       "'sentencepiece' for it (tokenizer='hf' reads a tokenizer.json)")
    if os.path.isdir(local):
      local = os.path.join(local, "tokenizer.json")
    try:
      if os.path.isfile(local):
        with open(local, "rb") as f:
          blob = f.read()
        tok = tokenizers.Tokenizer.from_str(blob.decode("utf-8"))
        self.path = local
      elif path.endswith(".json") or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ValueError(f"tokenizer_path={path!r} does not exist (expected a tokenizer.json file)")
      else:  # A Hub name ('t5-base', 'google-t5/t5-base'): downloaded and cached by the tokenizers library.
        tok = tokenizers.Tokenizer.from_pretrained(path)
        blob = tok.to_str().encode("utf-8")
        self.path = path
    except ValueError:
      raise
    except Exception as e:  # tokenizers raises its own Exception type for bad files and failed downloads.
      raise ValueError(f"tokenizer_path={path!r} could not be loaded as a Hugging Face tokenizer: {e}") from None
    self._tok = tok
    self.name = "hf:" + os.path.basename(self.path.rstrip("/"))
    self.fingerprint = "hf-v1:" + hashlib.sha256(blob).hexdigest()
    n = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = next((vocab[t] for t in EOS_CANDIDATES if t in vocab), None)
    self.eos_id = int(eos) if eos is not None else n
    self.vocab_size = n if eos is not None else n + 1
    specials = {int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special}
    lengths = np.zeros(self.vocab_size, np.int64)
    for piece, i in vocab.items():
      if i in specials or i >= self.vocab_size:
        continue
      # Metaspace ('\u2581') and byte-level ('\u0120') word markers stand for one space byte.
      lengths[i] = len(piece.replace("\u2581", " ").replace("\u0120", " ").replace("##", "").encode("utf-8"))
    self._piece_bytes = lengths

  def encode(self, text):
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts):
    texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
    if not texts:
      return []
    fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # No offsets: faster when available.
    return [np.asarray(e.ids, dtype=np.int32) for e in fast(texts, add_special_tokens=False)]

  def decode(self, ids):
    n = self._tok.get_vocab_size(with_added_tokens=True)
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < n])

  def token_byte_lengths(self, ids, num_bytes):
    """Bytes of original text behind each token of one document (exact per document, see SentencePiece's)."""
    return _rescaled_lengths(self._piece_bytes, ids, num_bytes)


TOKENIZERS = ("byte", "sentencepiece", "hf")


def make_tokenizer(name, path=""):
  """Tokenizer by config name: 'byte', 'sentencepiece' (needs `path`) or 'hf' (needs `path`)."""
  if name == "byte":
    return ByteTokenizer()
  if name == "sentencepiece":
    return SentencePieceTokenizer(path)
  if name == "hf":
    return HFTokenizer(path)
  raise ValueError(f"unknown tokenizer={name!r}; expected one of {', '.join(TOKENIZERS)}")
