"""Optimizer-state accounting: elements and bytes of `tx.init(params)`, without allocating (jax.eval_shape).

`state_size(tx, params)` accepts concrete arrays or abstract `jax.ShapeDtypeStruct` params. Moments are the leaves
whose path contains a field named `mu`, `nu` or `trace` (optax Adam/momentum and every transform in optim/); the
rest (projection bases, LIFT indices, counters, PRNG keys) is reported in the totals only. Closed forms (per
matrix W[m, n] handled by the method, N_other = elements of the AdamW-handled leaves):
  AdamW                 2·(N_other + m·n)
  GaLore rank r         2·(N_other + r·max(m, n))            (+ projector r·min(m, n))
  FRUGAL svd ρ          2·(N_other + round(ρ·min(m, n))·max(m, n))  (= GaLore at equal rank; + projector)
  FRUGAL blockwise ρ    2·(N_other + Σ_groups round(ρ·L_g)·m·n)      (ρ = 0: 2·N_other)
  LIFT                  2·(N_other + min((m+n)·lora_rank, m·n))       (+ k int32 indices)
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from optim.projection import key_to_str

MOMENT_FIELDS = ("mu", "nu", "trace")


class StateSize(NamedTuple):
  elements: int         # all state elements
  bytes: int            # all state bytes (actual dtypes)
  moment_elements: int  # optimizer moments only
  moment_bytes: int


def state_size(tx, params) -> StateSize:
  shapes = jax.eval_shape(tx.init, params)
  el = by = mel = mby = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    if not hasattr(leaf, "shape"):
      continue
    n = int(np.prod(leaf.shape, dtype=np.int64))
    b = n * np.dtype(leaf.dtype).itemsize
    el, by = el + n, by + b
    if any(key_to_str(k) in MOMENT_FIELDS for k in path):
      mel, mby = mel + n, mby + b
  return StateSize(el, by, mel, mby)
