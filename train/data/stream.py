"""Streaming training data on grain: sharded document reading, tokenization and packing with no up-front pass.

Layout (see docs/data.md, "Streaming pipeline"): the training documents are split into S = `stream_shards`
document shards (`sources.open_shard`). Shard s is read in order, each document's training part is tokenized
(in chunks of documents, with the tokenizer's batch call) and followed by EOS, and the resulting token stream is
packed like the cached pipeline: window k = stream[k*L : k*L + L + 1] (stride L = seq_len, so every token after
the first is a target once). A global batch of B rows holds B/S consecutive windows of every shard, shard 0's
rows first; the row of window k of shard s has the global id k*S + s. A process with index p of P owns the
shards [p*S/P, (p+1)*S/P) and therefore exactly the rows [p*B/P, (p+1)*B/P) of every global batch: it reads
and tokenizes only its share, and the batches do not depend on P for a fixed S. When a shard runs out it starts
over (its epoch counter increases).

grain pieces: each shard is an `IterDataset` whose iterator packs windows and checkpoints
{'epoch', 'doc' (index of the document holding the next window's first token), 'offset' (that token's
position in the document's tokens), 'windows' (windows emitted), 'src' (the reader's resume token for that
document, e.g. a Hugging Face streaming `state_dict`, or None)}; restoring re-reads from that document and
re-tokenizes it, so resume is exact. Windows are grouped with `IterDataset.batch`, the shards of one process
are joined with `ZipIterDataset`, and `ThreadPrefetchIterDataset` prefetches whole batches in a background
thread while the train step runs (its checkpoint is the state after the last batch handed out).

Shuffling (`data.shuffle_buffer` = K > 0): each shard's windows pass through grain's `WindowShuffleIterDataset`
before batching: K consecutive windows are read, emitted in a random order (seeded by `data.shuffle_seed`, the
shard and the window-group index), then the next K. Its checkpoint is the shard state at the group's start plus
the position in the group; restoring re-reads the group and re-draws the same order, so resume is bit-identical.
A window keeps its id (k·S + s, its position in the stream), so per-example state keyed by id follows it. A window
moves at most K − 1 places; batches then mix windows from K/(B/S) consecutive batches' worth of the shard.

Aligned epochs (`data.stream_aligned_epochs`, for per-example state such as SAF's store): by default the packing
runs across a shard's epoch boundary, so a re-read shard is cut into different windows and ids keep growing. With
alignment each epoch of a shard is packed from its first token, the tail too short for another window is dropped,
and window j of an epoch gets the id j·S + s in every epoch: the same id is the same tokens. The number of windows
per epoch W_s is counted up front by one tokenization pass over every shard (`count_epoch_windows`); the id of
the k-th window emitted is (k mod W_s)·S + s, and the iterator checks at each epoch boundary that the shard still
gave exactly W_s windows.

Deviation from grain's own packers: `ConcatThenSplitIterDataset` cuts non-overlapping windows (L tokens, the
first token of each window is never a target); we keep windows of L+1 tokens with stride L, the same packing as
the cached pipeline.
"""
from __future__ import annotations

import weakref

import grain
import numpy as np

from train.data import sources
from train.data.pipeline import check_vocab

DOCS_PER_CHUNK = 64  # Documents tokenized per tokenizer batch call.


def _train_text(doc, val_fraction) -> str:
  """The training part of one document as the packer reads it (cleaned; the last `val_fraction` held out)."""
  return sources.split_document(sources.clean(bytes(doc)), float(val_fraction))[0]


class PackedShardIterator(grain.DatasetIterator):
  """Windows of L+1 tokens (stride L) of one document shard; checkpointable (see module docstring)."""

  def __init__(self, shard, shard_index, num_shards, tokenizer, seq_len, val_fraction, epoch_windows=0):
    super().__init__()
    self._shard, self._s, self._S = shard, int(shard_index), int(num_shards)
    self._tok, self._L, self._val_fraction = tokenizer, int(seq_len), float(val_fraction)
    self._W = int(epoch_windows)  # > 0: aligned epochs of W windows each (module docstring)
    self._state = {"epoch": 0, "doc": 0, "offset": 0, "windows": 0, "src": None}
    self._reset()

  def _reset(self):
    self._docs = None          # Reader: iterator of (bytes, resume token), positioned after the buffered documents.
    self._buf = []             # [(epoch, doc index, resume token, int32 tokens + EOS)] from the current document on.
    self._next_doc = self._state["doc"]
    self._epoch_read = self._state["epoch"]  # Epoch of the documents the reader returns next.
    self._epoch_tokens = None if self._next_doc else 0  # Tokens read in an epoch read from its start.

  def _open(self, start, resume):
    self._docs = iter(self._shard.open(start, resume))

  def _read_chunk(self):
    """Reads and tokenizes up to DOCS_PER_CHUNK documents into the buffer; wraps to a new epoch at the end."""
    if self._docs is None:
      first = not self._buf
      self._open(self._next_doc, self._state["src"] if first else None)
    raw = []
    for d, token in self._docs:
      raw.append((self._next_doc, token, _train_text(d, self._val_fraction)))
      self._next_doc += 1
      if len(raw) == DOCS_PER_CHUNK:
        break
    if not raw:
      if self._epoch_tokens == 0:
        raise ValueError(f"stream shard {self._s} of {self._S} has no training text (use fewer "
                         "data.stream_shards or more data)")
      self._epoch_read, self._next_doc, self._epoch_tokens = self._epoch_read + 1, 0, 0
      self._open(0, None)
      return
    texts = [t for _, _, t in raw if t]
    encoded = iter(self._tok.encode_batch(texts))
    eos = np.array([self._tok.eos_id], np.int32)
    for doc, token, text in raw:
      ids = np.concatenate([next(encoded), eos]) if text else np.zeros(0, np.int32)
      self._buf.append((self._epoch_read, doc, token, ids.astype(np.int32)))
      if self._epoch_tokens is not None:
        self._epoch_tokens += len(ids)

  def _available(self):
    return sum(len(b[3]) for b in self._buf) - self._state["offset"]

  def _align(self, need):
    """Aligned epochs: moves to the next epoch's first token when the current epoch has no window left."""
    while True:
      if not self._buf:
        self._read_chunk()
        continue
      epoch = self._buf[0][0]
      left = sum(len(b[3]) for b in self._buf if b[0] == epoch) - self._state["offset"]
      if left >= need:
        return
      if self._buf[-1][0] == epoch:   # the epoch is not read to its end yet
        self._read_chunk()
        continue
      if self._state["windows"] != (epoch + 1) * self._W:
        self._changed(epoch, self._state["windows"] - epoch * self._W)
      self._buf = [b for b in self._buf if b[0] != epoch]
      self._state = {**self._state, "offset": 0}

  def _changed(self, epoch, n):
    raise ValueError(f"stream shard {self._s} of {self._S} gave {n} windows in epoch {epoch}, not the {self._W} "
                     "counted when the run started (did the data change?)")

  def __next__(self):
    need = self._L + 1
    if self._W:
      self._align(need)
      if self._state["windows"] >= (self._buf[0][0] + 1) * self._W:
        self._changed(self._buf[0][0], f"more than {self._W}")
    while self._available() < need:
      self._read_chunk()
    parts, offset, k = [], self._state["offset"], 0
    while sum(len(p) for p in parts) < need:
      ids = self._buf[k][3]
      parts.append(ids[offset:])
      offset, k = 0, k + 1
    window = np.concatenate(parts)[:need]
    # Advance by L tokens: drop the documents passed, keep the one holding the new first token.
    adv = self._state["offset"] + self._L
    while adv >= len(self._buf[0][3]):
      adv -= len(self._buf[0][3])
      self._buf.pop(0)
      while not self._buf:
        self._read_chunk()
    epoch, doc, token, _ = self._buf[0]
    k = self._state["windows"]
    gid = (k % self._W if self._W else k) * self._S + self._s
    self._state = {"epoch": epoch, "doc": doc, "offset": adv, "windows": self._state["windows"] + 1, "src": token}
    return {"tokens": window, "ids": np.int64(gid), "epoch": np.int64(epoch)}

  def get_state(self):
    return dict(self._state)

  def set_state(self, state):
    keys = ("epoch", "doc", "offset", "windows")
    if not isinstance(state, dict) or any(k not in state for k in keys):
      raise ValueError(f"stream shard state must be a dict with {list(keys)} and 'src'; got {state!r}")
    for k in keys:
      v = state[k]
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"stream shard state {k}={v!r} must be a non-negative int")
    self._state = {**{k: int(state[k]) for k in keys}, "src": state.get("src")}
    self._reset()


def count_epoch_windows(shard, tokenizer, seq_len, val_fraction) -> int:
  """Windows of L+1 tokens (stride L) that one epoch of `shard` packs into when packed from its first token.

  One pass over the shard: T tokens (training parts, each followed by EOS) give floor((T − 1) / L) windows.
  """
  total, texts = 0, []

  def flush():
    nonlocal total
    if texts:
      total += sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))
      texts.clear()

  for d, _ in shard.open(0, None):
    text = _train_text(d, val_fraction)
    if text:
      texts.append(text)
    if len(texts) == DOCS_PER_CHUNK:
      flush()
  flush()
  return max(total - 1, 0) // int(seq_len)


class PackedShard(grain.IterDataset):
  """grain IterDataset of the packed windows of one document shard."""

  def __init__(self, shard, shard_index, num_shards, tokenizer, seq_len, val_fraction, epoch_windows=0):
    super().__init__()
    self._args = (shard, shard_index, num_shards, tokenizer, seq_len, val_fraction, epoch_windows)

  def __iter__(self):
    return PackedShardIterator(*self._args)


def _join(parts, vocab_limit):
  """Concatenates the per-shard row groups of one process (zip output) into one batch with its mask."""
  tokens = np.concatenate([p["tokens"] for p in parts]).astype(np.int32)
  check_vocab(tokens, vocab_limit, "training")
  return {"tokens": tokens, "ids": np.concatenate([p["ids"] for p in parts]).astype(np.int64),
          "mask": np.ones((tokens.shape[0], tokens.shape[1] - 1), np.float32),
          "epoch": int(max(int(np.max(p["epoch"])) for p in parts))}


class StreamTrainIterator:
  """This process's rows of each global batch, prefetched by grain; JSON state {'stream': [per-shard states]}."""

  def __init__(self, shards, num_shards, tokenizer, seq_len, global_batch, val_fraction, process_index=0,
               process_count=1, vocab_limit=0, prefetch=2, shuffle_buffer=0, shuffle_seed=0, epoch_windows=None):
    """`shards(index)` -> the document reader of shard `index` (see `sources.FileShard`); shuffle_buffer > 0:
    windows shuffled in groups of that many per shard; epoch_windows: windows per epoch of every shard (aligned
    epochs, stable ids; None = packing runs across epochs) (module docstring)."""
    S, P = int(num_shards), int(process_count)
    self.seq_len, self.global_batch, self.num_shards = int(seq_len), int(global_batch), S
    self.num_sequences, self.batches_per_epoch = None, None
    per_shard = self.global_batch // S
    mine = range(int(process_index) * (S // P), (int(process_index) + 1) * (S // P))
    def shard(s):
      ds = PackedShard(shards(s), s, S, tokenizer, seq_len, val_fraction,
                       epoch_windows[s] if epoch_windows else 0)
      if shuffle_buffer:   # one seed per (shuffle_seed, shard); grain adds the window-group index
        seed = int(np.random.SeedSequence([int(shuffle_seed), s]).generate_state(1)[0] >> 1)
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=int(shuffle_buffer), seed=seed)
      return ds.batch(per_shard, drop_remainder=True)

    parts = [shard(s) for s in mine]
    ds = grain.experimental.ZipIterDataset(parts).map(lambda xs: _join(xs, vocab_limit))
    if prefetch > 0:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(prefetch))
    self._ds = ds
    self._it = iter(ds)
    # Stop the prefetch thread when this iterator is dropped or, at the latest, before interpreter shutdown.
    self._finalizer = weakref.finalize(self, self._it.close)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  def get_state(self):
    return {"stream": _to_json(self._it.get_state())}

  def set_state(self, state):
    if not isinstance(state, dict) or "stream" not in state:
      raise ValueError(f"streaming data iterator state must be a dict with 'stream' (saved by a run with the "
                       f"streaming pipeline); got keys {sorted(state) if isinstance(state, dict) else state!r}")
    try:
      self._it.set_state(state["stream"])
    except (KeyError, IndexError, TypeError) as e:
      raise ValueError(f"streaming data iterator state does not match this pipeline (different "
                       f"data.stream_shards or process count?): {e!r}") from None


def _to_json(x):
  """grain states may hold numpy scalars and tuples; make them plain JSON values."""
  if isinstance(x, dict):
    return {str(k): _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  return x
