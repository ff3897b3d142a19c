"""Tokenized corpus: the train and validation token streams, cached on disk as `.npy` memmaps.

Stream layout (both splits): `doc_1 EOS doc_2 EOS ...`: the tokens of each non-empty document part followed by
the tokenizer's EOS id. The validation stream carries a parallel `val_bytes` array: the UTF-8 bytes of text
behind each token (0 for EOS), so bits per byte can be computed for any prefix of it (exact for the byte
tokenizer; for SentencePiece exact per whole document, see `SentencePieceTokenizer.token_byte_lengths`).

Cache: `<cache_dir>/<key>/{train,val,val_bytes}.npy + meta.json`, where `key` is a SHA-256 of everything the
streams depend on (source, file paths with sizes and mtimes, text field, TFDS name/splits, max_bytes,
val_fraction, tokenizer fingerprint = model-file hash, cache format version). A directory is built under a
temporary name and renamed into place when complete, so concurrent or interrupted builds never leave a
half-written cache behind. Token dtype: uint16 when the vocabulary fits, else uint32.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from train.data import sources

CACHE_VERSION = 1
_CHUNK_BYTES = 4 << 20  # Documents are tokenized in batches of about this many bytes.


@dataclasses.dataclass
class Corpus:
  train: np.ndarray      # uint16/uint32 [n_train]
  val: np.ndarray        # uint16/uint32 [n_val]
  val_bytes: np.ndarray  # int32 [n_val]
  meta: dict


class _Sink:
  """Appends 1-D arrays; streams to a raw file when `path` is given, else keeps them in memory."""

  def __init__(self, path, dtype):
    self.dtype = np.dtype(dtype)
    self.path = path
    self.n = 0
    self._parts = []
    self._f = open(path + ".raw", "wb") if path else None

  def append(self, arr):
    arr = np.ascontiguousarray(arr, dtype=self.dtype)
    self.n += arr.size
    if self._f is not None:
      self._f.write(arr.tobytes())
    else:
      self._parts.append(arr)

  def finish(self):
    if self._f is None:
      return np.concatenate(self._parts) if self._parts else np.zeros(0, self.dtype)
    self._f.close()
    raw = self.path + ".raw"
    if self.n == 0:
      np.save(self.path, np.zeros(0, self.dtype))
    else:
      src = np.memmap(raw, dtype=self.dtype, mode="r", shape=(self.n,))
      dst = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=(self.n,))
      step = 1 << 24
      for i in range(0, self.n, step):
        dst[i:i + step] = src[i:i + step]
      dst.flush()
      del src, dst
    os.remove(raw)
    return None


def _load(path):
  arr = np.load(path, mmap_mode="r")
  return arr if arr.size else np.load(path)


def _documents(cfg):
  """(train_docs, val_docs or None, key material) for the configured source."""
  src = cfg.source
  if src in ("stdlib", "files"):
    files = sources.stdlib_files() if src == "stdlib" else sources.expand_paths(cfg.paths)
    key = {"files": sources.files_fingerprint(files), "text_field": cfg.text_field}
    return sources.capped(sources.file_documents(files, cfg.text_field), cfg.max_bytes), None, key
  if src == "tfds":
    if not cfg.tfds_name:
      raise ValueError("source='tfds' needs data.tfds_name (e.g. 'c4/en'); got ''")
    key = {"tfds_name": cfg.tfds_name, "tfds_data_dir": cfg.tfds_data_dir, "text_field": cfg.text_field,
           "tfds_train_split": cfg.tfds_train_split, "tfds_eval_split": cfg.tfds_eval_split}
    train = sources.capped(
        sources.tfds_documents(cfg.tfds_name, cfg.tfds_train_split, cfg.tfds_data_dir, cfg.text_field),
        cfg.max_bytes)
    val = None
    if cfg.tfds_eval_split:
      key["eval_max_tokens"] = int(cfg.eval_max_tokens)
      val = sources.capped(
          sources.tfds_documents(cfg.tfds_name, cfg.tfds_eval_split, cfg.tfds_data_dir, cfg.text_field), 0)
    return train, val, key
  if src == "hf":
    key = {"hf_name": cfg.hf_name, "hf_config": cfg.hf_config, "text_field": cfg.text_field,
           "hf_train_split": cfg.hf_train_split, "hf_eval_split": cfg.hf_eval_split}
    where = f"hf_name={cfg.hf_name!r}"

    def docs(split):
      ds = lambda: sources.hf_dataset(cfg.hf_name, cfg.hf_config, split, cfg.text_field,
                                      split_required=split != cfg.hf_train_split)
      return (d for d, _ in sources.HFShard(ds, cfg.text_field, 0, 1, where).open(0))

    val = None
    if cfg.hf_eval_split:
      key["eval_max_tokens"] = int(cfg.eval_max_tokens)
      val = sources.capped(docs(cfg.hf_eval_split), 0)
    return sources.capped(docs(cfg.hf_train_split), cfg.max_bytes), val, key
  raise ValueError(f"unknown data source={src!r}; expected 'stdlib', 'files', 'hf', 'tfds' or 'synthetic'")


def _chunks(docs):
  buf, size = [], 0
  for d in docs:
    buf.append(d)
    size += len(d)
    if size >= _CHUNK_BYTES:
      yield buf
      buf, size = [], 0
  if buf:
    yield buf


def write_streams(tokenizer, train_docs, val_docs, val_fraction, eval_max_tokens, out_dir):
  """Tokenizes into train/val streams (files under out_dir, or in memory when out_dir is None)."""
  dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
  path = (lambda name: os.path.join(out_dir, name + ".npy")) if out_dir else (lambda name: None)
  train, val, vbytes = _Sink(path("train"), dtype), _Sink(path("val"), dtype), _Sink(path("val_bytes"), np.int32)
  eos = np.array([tokenizer.eos_id])
  zero = np.zeros(1, np.int32)
  stats = {"num_docs": 0, "train_text_bytes": 0, "val_text_bytes": 0}

  def add_val(parts):
    for part, ids in zip(parts, tokenizer.encode_batch(parts)):
      val.append(ids)
      val.append(eos)
      vbytes.append(tokenizer.token_byte_lengths(ids, len(part)))
      vbytes.append(zero)
      stats["val_text_bytes"] += len(part)

  for chunk in _chunks(train_docs):
    stats["num_docs"] += len(chunk)
    cuts = [sources.split_document(d, val_fraction if val_docs is None else 0.0) for d in chunk]
    tr = [t for t, _ in cuts if t]
    for ids in tokenizer.encode_batch(tr):
      train.append(ids)
      train.append(eos)
    stats["train_text_bytes"] += sum(len(t) for t in tr)
    add_val([v for _, v in cuts if v])
  if val_docs is not None:  # A separate validation split (TFDS): whole documents, up to eval_max_tokens.
    for chunk in _chunks(val_docs):
      add_val(chunk)
      if eval_max_tokens > 0 and val.n > eval_max_tokens:
        break
  arrays = [train.finish(), val.finish(), vbytes.finish()]
  stats.update(train_tokens=train.n, val_tokens=val.n, dtype=np.dtype(dtype).name)
  return arrays, stats


def cache_key(cfg, tokenizer, source_key):
  material = {"version": CACHE_VERSION, "source": cfg.source, "max_bytes": int(cfg.max_bytes),
              "val_fraction": float(cfg.val_fraction), "tokenizer": tokenizer.fingerprint, **source_key}
  blob = json.dumps(material, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:32]


def load_corpus(cfg, tokenizer):
  """Token streams for `cfg` (a data ConfigDict), from the cache when present, else built (and cached)."""
  train_docs, val_docs, source_key = _documents(cfg)
  cache_dir = os.path.expanduser(str(cfg.cache_dir or ""))
  if not cache_dir or cache_dir.lower() == "none":
    (train, val, vbytes), stats = write_streams(tokenizer, train_docs, val_docs, cfg.val_fraction,
                                                 cfg.eval_max_tokens, None)
    return Corpus(train, val, vbytes, {**stats, "cache_path": None})
  key = cache_key(cfg, tokenizer, source_key)
  final = os.path.join(cache_dir, key)
  meta_path = os.path.join(final, "meta.json")
  if not os.path.isfile(meta_path):
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=key + ".tmp.", dir=cache_dir)
    os.chmod(tmp, 0o755)
    try:
      _, stats = write_streams(tokenizer, train_docs, val_docs, cfg.val_fraction, cfg.eval_max_tokens, tmp)
      stats.update(source=cfg.source, tokenizer=tokenizer.name)
      with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(stats, f, indent=1)
      try:
        os.rename(tmp, final)
      except OSError:  # Another process finished the same cache first; keep theirs.
        if not os.path.isfile(meta_path):
          raise
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
  with open(meta_path) as f:
    meta = json.load(f)
  meta["cache_path"] = final
  return Corpus(_load(os.path.join(final, "train.npy")), _load(os.path.join(final, "val.npy")),
                _load(os.path.join(final, "val_bytes.npy")), meta)
