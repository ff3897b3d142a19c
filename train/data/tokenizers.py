"""Tokenizers for the training data pipeline: byte-level and SentencePiece.

Both expose the same small interface used by `train.data`:
  `.encode(str) -> np.int32[n]`, `.encode_batch(list[str]) -> list[np.int32[...]]`, `.decode(ids) -> str`,
  `.vocab_size`, `.eos_id`, `.name`, `.fingerprint` (a string that changes when the tokenizer changes; part of
  the token-cache key), `.token_byte_lengths(ids, num_bytes)` (UTF-8 bytes behind each token, for bits/byte).

* `ByteTokenizer`: ids 0..255 are the UTF-8 bytes of the text, id 256 is EOS (document separator);
  vocab_size 257. No files needed. Tokenizing is `np.frombuffer`.
* `SentencePieceTokenizer`: wraps a `.model` file (user-supplied, e.g. T5's `spiece.model` for C4 parity, or one
  trained offline with `python -m train.data.train_tokenizer`). No BOS/EOS is added by `encode`; documents are
  separated by the model's EOS id (if the model has none, an extra id `piece_size` is appended as EOS).
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
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
      return np.zeros(0, np.int32)
    est = np.cumsum(self._piece_bytes[ids])
    if est[-1] <= 0:
      out = np.zeros(ids.size, np.int64)
      out[-1] = num_bytes
      return out.astype(np.int32)
    cum = (est * int(num_bytes)) // int(est[-1])
    return np.diff(cum, prepend=0).astype(np.int32)


def make_tokenizer(name, path=""):
  """Tokenizer by config name: 'byte' or 'sentencepiece' (needs `path`)."""
  if name == "byte":
    return ByteTokenizer()
  if name == "sentencepiece":
    return SentencePieceTokenizer(path)
  raise ValueError(f"unknown tokenizer={name!r}; expected 'byte' or 'sentencepiece'")
