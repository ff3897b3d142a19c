"""Training objectives applied on top of next-token cross-entropy (SAF/MESA, loss-based sample reweighting).

Contract with the train step (train/step.py):

    obj_state = init_state(cfg.objectives, params, num_train_examples=..., seq_len=..., vocab_size=...)
    loss, obj_updates, metrics = apply(cfg.objectives, per_token_loss=..., mask=..., logits=..., ids=...,
                                       step=..., obj_state=..., forward=...)
    obj_state = post_update(cfg.objectives, obj_state, obj_updates, new_params, step)

With every objective switched off, `loss` is the plain masked mean of `per_token_loss` (bit-identical to the
step without objectives) and the state is empty.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections


def default_objectives_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "none"
  return c


def init_state(cfg, params, *, num_train_examples: int, seq_len: int, vocab_size: int):
  if cfg.name != "none":
    raise ValueError(f"unknown objective {cfg.name!r}")
  return {}


def apply(cfg, *, per_token_loss, mask, logits, ids, step, obj_state, forward):
  del logits, ids, step, obj_state, forward
  loss = jnp.sum(per_token_loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return loss, {}, {}


def post_update(cfg, obj_state, obj_updates, new_params, step):
  return obj_state
