"""The objective interface: an objective is three pure functions over its own state, in the optax style.

    state            = obj.init(cfg, ctx)                        # its part of the train state (a dict)
    terms            = obj.loss(cfg, state, inputs)               # inside the jitted, differentiated loss
    state            = obj.update(cfg, state, updates, new_params, step)   # after the optimizer step

`cfg` is the objective's own section of `cfg.objectives` (with an `enabled` switch); `obj.config()` returns its
defaults and `obj.check(cfg)` raises ValueError naming a bad field. `Terms` says how the objective changes the
loss: an extra per-token term added to the cross-entropy (a trajectory/distillation term), or weights over the
sequences of the batch (sample reweighting), plus per-example state updates (every leaf with a leading batch
axis, so microbatches concatenate) and metrics. The keys of an objective's state dict must be unique across
objectives: the train state holds their union (so checkpoints keep one flat `obj` dict).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax


class Context(NamedTuple):
  """What `init` may need to know about the run."""
  params: Any               # the model parameters (an nnx.State of arrays, placed on the mesh)
  num_train_examples: int   # packed training sequences (0 when the source has no fixed set, e.g. synthetic)
  seq_len: int
  vocab_size: int


class Inputs(NamedTuple):
  """What `loss` sees for one (micro)batch."""
  per_token_loss: jax.Array   # [B, T] next-token cross-entropy
  mask: jax.Array             # [B, T] 1 for real targets, 0 for padding
  logits: jax.Array           # [B, T, V] float32
  ids: jax.Array              # [B] global example ids
  step: jax.Array             # int32 optimizer step (0-based)
  forward: Optional[Callable[[Any], jax.Array]]  # params -> logits of the same batch (for a teacher pass)


class Terms(NamedTuple):
  token_loss: Optional[jax.Array] = None    # [B, T] added to the CE (0 where there is no target)
  seq_weights: Optional[jax.Array] = None   # [B] weights of the per-sequence losses (sum 1), no gradient
  updates: dict = {}                        # per-example state updates, for `update`
  metrics: dict = {}                        # float32 scalars for metrics.jsonl


class Objective(NamedTuple):
  config: Callable[[], Any]                   # default ConfigDict of its section (with `enabled`)
  check: Callable[[Any], None]                # raises ValueError naming the bad field
  init: Callable[[Any, Context], dict]
  loss: Callable[[Any, dict, Inputs], Terms]
  update: Callable[[Any, dict, dict, Any, jax.Array], dict]
  state_keys: tuple = ()                      # the keys of the train state's `obj` dict it owns


def no_update(cfg, state, updates, new_params, step):
  del cfg, updates, new_params, step
  return state


def check_number(name, v, *, lo=None, hi=None, positive=False):
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ValueError(f"objectives.{name}={v!r} must be a finite number")
  if positive and v <= 0:
    raise ValueError(f"objectives.{name}={v!r} must be > 0")
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    raise ValueError(f"objectives.{name}={v!r} must be in [{lo}, {hi}]")


def check_int(name, v, lo):
  if isinstance(v, bool) or not isinstance(v, int) or v < lo:
    raise ValueError(f"objectives.{name}={v!r} must be an int >= {lo}")


def check_enabled(name, cfg):
  if not isinstance(cfg.enabled, bool):
    raise ValueError(f"objectives.{name}.enabled={cfg.enabled!r} must be a bool")
