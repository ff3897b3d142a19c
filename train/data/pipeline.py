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

Evaluation: the first T = min(len(val)-1, eval_max_tokens or inf) targets of the validation stream, packed the
same way (stride L, so each evaluated target is counted once), in order; the last row is padded (mask 0) and
the last batch is filled with all-padding rows.
"""
import math

import numpy as np


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


class TrainIterator:
  """Infinite, deterministic iterator over shuffled packed training sequences."""

  def __init__(self, stream, seq_len, global_batch, shuffle_seed):
    self.seq_len = int(seq_len)
    self.global_batch = int(global_batch)
    self.shuffle_seed = int(shuffle_seed)
    self._rows = packed_view(stream, self.seq_len)
    self.num_sequences = int(self._rows.shape[0])
    self.batches_per_epoch = self.num_sequences // self.global_batch
    self._epoch, self._position = 0, 0
    self._perm_epoch, self._perm = None, None

  def __iter__(self):
    return self

  def _permutation(self, epoch):
    if self._perm_epoch != epoch:
      self._perm = epoch_permutation(self.shuffle_seed, epoch, self.num_sequences)
      self._perm_epoch = epoch
    return self._perm

  def __next__(self):
    if self._position + self.global_batch > self.num_sequences:
      self._epoch, self._position = self._epoch + 1, 0
    ids = self._permutation(self._epoch)[self._position:self._position + self.global_batch]
    epoch = self._epoch
    self._position += self.global_batch
    order = np.argsort(ids, kind="stable")  # Read the memmap in increasing order, then restore the order.
    tokens = np.empty((self.global_batch, self.seq_len + 1), np.int32)
    tokens[order] = self._rows[ids[order]]
    return {"tokens": tokens, "ids": ids.astype(np.int64), "epoch": epoch}

  def get_state(self):
    return {"epoch": self._epoch, "position": self._position, "num_sequences": self.num_sequences}

  def set_state(self, state):
    epoch, position = _check_state(state)
    n = state.get("num_sequences", self.num_sequences)
    if int(n) != self.num_sequences:
      raise ValueError(f"data iterator state has num_sequences={n} but this data has {self.num_sequences} "
                       "packed training sequences (different data, tokenizer or seq_len)")
    if position > self.num_sequences:
      raise ValueError(f"data iterator state position={position} exceeds num_sequences={self.num_sequences}")
    self._epoch, self._position = epoch, position


class SyntheticTrainIterator:
  """Uniform random tokens (for benchmarks); batch b is drawn from SeedSequence([seed, 1, position])."""

  def __init__(self, vocab_size, seq_len, global_batch, seed):
    self.vocab_size, self.seq_len, self.global_batch = int(vocab_size), int(seq_len), int(global_batch)
    self.seed = int(seed)
    self.num_sequences = None
    self.batches_per_epoch = None
    self._position = 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1, self._position]))
    tokens = rng.integers(0, self.vocab_size, (self.global_batch, self.seq_len + 1), dtype=np.int32)
    ids = np.arange(self._position, self._position + self.global_batch, dtype=np.int64)
    self._position += self.global_batch
    return {"tokens": tokens, "ids": ids, "epoch": 0}

  def get_state(self):
    return {"epoch": 0, "position": self._position}

  def set_state(self, state):
    _, self._position = _check_state(state)


def eval_rows(seq_len, num_targets):
  """Number of packed evaluation rows for `num_targets` targets."""
  return math.ceil(num_targets / seq_len) if num_targets > 0 else 0


def make_eval_batches(stream, seq_len, global_batch, num_targets):
  """A callable returning a fresh iterator over padded evaluation batches of the first `num_targets` targets."""
  stream = stream[:num_targets + 1] if num_targets > 0 else stream[:0]
  rows = eval_rows(seq_len, num_targets)

  def batches():
    for start in range(0, rows, global_batch):
      tokens = np.zeros((global_batch, seq_len + 1), np.int32)
      mask = np.zeros((global_batch, seq_len), np.float32)
      for b, r in enumerate(range(start, min(start + global_batch, rows))):
        row = np.asarray(stream[r * seq_len:r * seq_len + seq_len + 1])
        tokens[b, :row.shape[0]] = row
        mask[b, :row.shape[0] - 1] = 1.0
      yield {"tokens": tokens, "mask": mask}

  return batches


def make_synthetic_eval_batches(vocab_size, seq_len, global_batch, seed, num_targets):
  rows = eval_rows(seq_len, num_targets)

  def batches():
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    for start in range(0, rows, global_batch):
      tokens = rng.integers(0, vocab_size, (global_batch, seq_len + 1), dtype=np.int32)
      flat = np.arange(global_batch * seq_len).reshape(global_batch, seq_len) + start * seq_len
      yield {"tokens": tokens, "mask": (flat < num_targets).astype(np.float32)}

  return batches
