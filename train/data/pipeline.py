"""Packing, deterministic shuffling, the resumable train iterator and the evaluation batches.

Packing: a token stream s (see `corpus.py`) is cut into sequences of seq_len+1 tokens with stride seq_len:
sequence i = s[i*L : i*L + L + 1] (L = seq_len), i = 0 .. (len(s)-1)//L - 1. Consecutive sequences share one
boundary token, so every token after the first is a prediction target (tokens[:, 1:]) exactly once; the
remainder shorter than L+1 tokens is dropped from training. Sequences cross document boundaries (documents are
separated by EOS), as in GPT-style packing.

Train order: epoch e visits the packed sequences in the order of a seeded permutation,
`np.random.default_rng(SeedSequence([shuffle_seed, e])).permutation(N)`, in batches of global_batch; the
last N mod global_batch sequences of each epoch's permutation are skipped (every batch lies within one epoch).
The iterator state is {'epoch', 'position' (index into the epoch's permutation), 'num_sequences' (a check)},
so a restored iterator yields exactly the batches an uninterrupted one would. 'ids' are indices of the packed
sequences in the training set: stable across epochs, restarts and device counts.

On grain: batch k of the run (epoch k // batches_per_epoch) is element k of `grain.MapDataset.range(...)
.map(batch)`, read through `to_iter_dataset(ReadOptions(...))`, whose thread pool prepares the next batches while
the train step runs; grain's iterator state {'next_index': k} is saved in the format above (so run directories
written before grain resume unchanged). With `process_count` P > 1, process p builds only the rows
[p*B/P, (p+1)*B/P) of every global batch (same ids; the union over processes is the 1-process batch).

Evaluation: the first T = min(len(val)-1, eval_max_tokens or inf) targets of the validation stream, packed the
same way (stride L, so each evaluated target is counted once), in order; the last row is padded (mask 0) and
the last batch is filled with all-padding rows.
"""
from __future__ import annotations

import math
import threading
import weakref

import numpy as np

_RUN_LENGTH = 1 << 62  # Batches addressable by the grain dataset (an effectively infinite run).


def packed_view(stream, seq_len):
  """Read-only [N, seq_len+1] view of a 1-D stream with row stride seq_len (no copy)."""
  n = (stream.shape[0] - 1) // seq_len if stream.shape[0] > 1 else 0
  arr = np.asarray(stream)
  return np.lib.stride_tricks.as_strided(arr, shape=(n, seq_len + 1),
                                         strides=(seq_len * arr.itemsize, arr.itemsize), writeable=False)


def epoch_permutation(shuffle_seed, epoch, n):
  rng = np.random.default_rng(np.random.SeedSequence([int(shuffle_seed), int(epoch)]))
  return rng.permutation(n)


def _check_state(state):
  if not isinstance(state, dict) or "epoch" not in state or "position" not in state:
    raise ValueError(f"data iterator state must be a dict with 'epoch' and 'position'; got {state!r}")
  epoch, position = state["epoch"], state["position"]
  for k, v in (("epoch", epoch), ("position", position)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"data iterator state {k}={v!r} must be a non-negative int")
  return int(epoch), int(position)


def check_vocab(tokens, vocab_limit, where):
  """ValueError naming the first id >= vocab_limit (0 = no limit)."""
  if vocab_limit and tokens.size and int(tokens.max()) >= vocab_limit:
    bad = int(tokens[tokens >= vocab_limit][0])
    raise ValueError(f"token id {bad} in a {where} batch is >= data.vocab_limit={vocab_limit}: the model cannot "
                     "embed it (raise data.vocab_limit and model.vocab_size, or use a tokenizer whose ids fit)")


class _Batches:
  """Batch k of the run (this process's rows), as a pure function of k; shared by grain's reader threads."""

  def __init__(self, rows, global_batch, shuffle_seed, lo, local, vocab_limit):
    self.rows, self.global_batch, self.shuffle_seed = rows, global_batch, shuffle_seed
    self.lo, self.local, self.vocab_limit = lo, local, vocab_limit
    self.num_sequences = int(rows.shape[0])
    self.batches_per_epoch = self.num_sequences // global_batch
    self._lock = threading.Lock()
    self._perms = {}

  def permutation(self, epoch):
    with self._lock:  # A small cache of the last epochs' permutations.
      if epoch not in self._perms:
        if len(self._perms) >= 2:
          self._perms.pop(min(self._perms))
        self._perms[epoch] = epoch_permutation(self.shuffle_seed, epoch, self.num_sequences)
      return self._perms[epoch]

  def __call__(self, k):
    epoch, j = divmod(int(k), self.batches_per_epoch)
    start = j * self.global_batch + self.lo
    ids = self.permutation(epoch)[start:start + self.local]
    order = np.argsort(ids, kind="stable")  # Read the memmap in increasing order, then restore the order.
    tokens = np.empty((self.local, self.rows.shape[1]), np.int32)
    tokens[order] = self.rows[ids[order]]
    check_vocab(tokens, self.vocab_limit, "training")
    return {"tokens": tokens, "ids": ids.astype(np.int64),
            "mask": np.ones((self.local, self.rows.shape[1] - 1), np.float32), "epoch": epoch}


class TrainIterator:
  """Infinite, deterministic iterator over shuffled packed training sequences (this process's rows)."""

  def __init__(self, stream, seq_len, global_batch, shuffle_seed, process_index=0, process_count=1,
               vocab_limit=0, prefetch=2):
    self.seq_len = int(seq_len)
    self.global_batch = int(global_batch)
    self.shuffle_seed = int(shuffle_seed)
    self._rows = packed_view(stream, self.seq_len)
    local = self.global_batch // int(process_count)
    self._batches = _Batches(self._rows, self.global_batch, self.shuffle_seed, int(process_index) * local, local,
                             int(vocab_limit))
    self.num_sequences = self._batches.num_sequences
    self.batches_per_epoch = self._batches.batches_per_epoch
    import grain  # pylint: disable=import-outside-toplevel  (only training needs it, not train_tokenizer)

    ds = grain.MapDataset.range(_RUN_LENGTH).map(self._batches)
    opts = grain.ReadOptions(num_threads=1 if prefetch > 0 else 0, prefetch_buffer_size=int(prefetch))
    self._it = iter(ds.to_iter_dataset(opts))
    self._finalizer = weakref.finalize(self, self._it.close)  # Reader threads end with this iterator.

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  def get_state(self):
    k = int(self._it.get_state()["next_index"])
    epoch, j = divmod(k, self.batches_per_epoch)
    return {"epoch": epoch, "position": j * self.global_batch, "num_sequences": self.num_sequences}

  def set_state(self, state):
    epoch, position = _check_state(state)
    n = state.get("num_sequences", self.num_sequences)
    if int(n) != self.num_sequences:
      raise ValueError(f"data iterator state has num_sequences={n} but this data has {self.num_sequences} "
                       "packed training sequences (different data, tokenizer or seq_len)")
    if position > self.num_sequences:
      raise ValueError(f"data iterator state position={position} exceeds num_sequences={self.num_sequences}")
    if position % self.global_batch:
      raise ValueError(f"data iterator state position={position} is not a multiple of global_batch="
                       f"{self.global_batch} (a state saved with another batch size)")
    # Written before grain, a finished epoch was {'epoch': e, 'position': batches_per_epoch * B}: same as e+1, 0.
    self._it.set_state({"next_index": epoch * self.batches_per_epoch + min(position // self.global_batch,
                                                                            self.batches_per_epoch)})


class SyntheticTrainIterator:
  """Uniform random tokens (for benchmarks); batch b is drawn from SeedSequence([seed, 1, position])."""

  def __init__(self, vocab_size, seq_len, global_batch, seed, process_index=0, process_count=1):
    self.vocab_size, self.seq_len, self.global_batch = int(vocab_size), int(seq_len), int(global_batch)
    self.seed = int(seed)
    self.num_sequences = None
    self.batches_per_epoch = None
    self._position = 0
    self._local = self.global_batch // int(process_count)
    self._lo = int(process_index) * self._local

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1, self._position]))
    tokens = rng.integers(0, self.vocab_size, (self.global_batch, self.seq_len + 1), dtype=np.int32)
    ids = np.arange(self._position, self._position + self.global_batch, dtype=np.int64)
    self._position += self.global_batch
    sl = slice(self._lo, self._lo + self._local)
    return {"tokens": tokens[sl], "ids": ids[sl], "mask": np.ones((self._local, self.seq_len), np.float32),
            "epoch": 0}

  def get_state(self):
    return {"epoch": 0, "position": self._position}

  def set_state(self, state):
    _, self._position = _check_state(state)


def eval_rows(seq_len, num_targets):
  """Number of packed evaluation rows for `num_targets` targets."""
  return math.ceil(num_targets / seq_len) if num_targets > 0 else 0


def make_eval_batches(stream, seq_len, global_batch, num_targets, process_index=0, process_count=1):
  """A callable returning a fresh iterator over padded evaluation batches of the first `num_targets` targets
  (this process's rows [p*B/P, (p+1)*B/P) of each global batch)."""
  stream = stream[:num_targets + 1] if num_targets > 0 else stream[:0]
  rows = eval_rows(seq_len, num_targets)
  local = global_batch // process_count
  lo = process_index * local

  def batches():
    for start in range(0, rows, global_batch):
      tokens = np.zeros((local, seq_len + 1), np.int32)
      mask = np.zeros((local, seq_len), np.float32)
      for b, r in enumerate(range(start + lo, min(start + lo + local, rows))):
        row = np.asarray(stream[r * seq_len:r * seq_len + seq_len + 1])
        tokens[b, :row.shape[0]] = row
        mask[b, :row.shape[0] - 1] = 1.0
      yield {"tokens": tokens, "mask": mask}

  return batches


def make_synthetic_eval_batches(vocab_size, seq_len, global_batch, seed, num_targets, process_index=0,
                                process_count=1):
  rows = eval_rows(seq_len, num_targets)
  local = global_batch // process_count
  lo = process_index * local

  def batches():
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    for start in range(0, rows, global_batch):
      tokens = rng.integers(0, vocab_size, (global_batch, seq_len + 1), dtype=np.int32)
      flat = np.arange(global_batch * seq_len).reshape(global_batch, seq_len) + start * seq_len
      mask = (flat < num_targets).astype(np.float32)
      yield {"tokens": tokens[lo:lo + local], "mask": mask[lo:lo + local]}

  return batches
