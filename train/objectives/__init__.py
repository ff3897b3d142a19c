"""Training objectives on top of next-token cross-entropy, as registered (init, loss, update) triples.

Each objective is a `base.Objective` in its own file and one line in `REGISTRY`; its config is the section
`cfg.objectives.<name>` with an `enabled` switch (`--config.objectives.mesa.enabled=True`). Registered:
* `mesa`, `saf` (`trajectory.py`): the trajectory loss of SAF (arXiv 2205.14083), an extra λ·τ²·KL per token;
  'mesa' (EMA teacher, one extra forward) is the variant for one-pass LLM pretraining, 'saf' keeps the past
  outputs of every training example.
* `reweight` (`reweighting.py`): dynamic loss-based sample reweighting (arXiv 2502.06733), weights over the
  sequences of the batch computed from their cross-entropy.

Contract with the train step (train/step.py), for any combination of enabled objectives:

    obj_state = init_state(cfg.objectives, params, num_train_examples=..., seq_len=..., vocab_size=...)
    loss, obj_updates, metrics = apply(cfg.objectives, per_token_loss=..., mask=..., logits=..., ids=...,
                                       step=..., obj_state=..., forward=...)
    obj_state = post_update(cfg.objectives, obj_state, obj_updates, new_params, step)

The loss: with no sequence weights, masked-mean(CE) + Σ_objectives masked-mean(token term); with weights w from
one objective, Σ_i w_i·(CE_i + Σ token-term_i) over sequences i (per-sequence means over the non-masked tokens;
the weights see the CE alone). With every objective off, `loss` is the plain masked mean of `per_token_loss`
(bit-identical to a step without objectives) and the state is empty. With gradient accumulation the step stacks
the per-microbatch `obj_updates` and merges them with `merge_microbatch_updates` (every update leaf has a leading
per-example axis). Notes: docs/objectives.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from train.objectives import base, reweighting, trajectory

# name -> objective. Adding an objective: its file (a base.Objective) and one line here.
REGISTRY: dict[str, base.Objective] = {
    "mesa": trajectory.MESA,
    "saf": trajectory.SAF,
    "reweight": reweighting.REWEIGHT,
}


def default_objectives_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  for name, obj in REGISTRY.items():
    c[name] = obj.config()
  return c


def enabled(cfg) -> list[tuple[str, base.Objective]]:
  return [(name, obj) for name, obj in REGISTRY.items() if cfg[name].enabled]


def check_config(cfg) -> None:
  """Raises ValueError naming the first bad field of an objectives config."""
  unknown = sorted(set(cfg.keys()) - set(REGISTRY))
  if unknown:
    raise ValueError(f"unknown objective(s) objectives.{unknown[0]}; registered: {sorted(REGISTRY)}")
  for name, obj in REGISTRY.items():
    obj.check(cfg[name])


def init_state(cfg, params, *, num_train_examples: int, seq_len: int, vocab_size: int) -> dict:
  """The objective state: the union of the enabled objectives' state dicts ({} when all are off).

  Call it inside `jax.set_mesh(mesh)` so that per-example state (the SAF store) is sharded over the batch axes.
  """
  check_config(cfg)
  ctx = base.Context(params, num_train_examples, seq_len, vocab_size)
  state = {}
  for name, obj in enabled(cfg):
    part = obj.init(cfg[name], ctx)
    if set(part) != set(obj.state_keys) or set(part) & set(state):
      raise ValueError(f"objective {name!r} returned state keys {sorted(part)}; it declares {obj.state_keys} and "
                       f"keys must be unique across objectives")
    state.update(part)
  return state


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def apply(cfg, *, per_token_loss, mask, logits, ids, step, obj_state, forward):
  """(loss, obj_updates, metrics) for one (micro)batch; called inside the jitted, differentiated loss."""
  active = enabled(cfg)
  if not active:
    return _masked_mean(per_token_loss, mask), {}, {}
  check_config(cfg)
  if per_token_loss.ndim != 2 or mask.shape != per_token_loss.shape:
    raise ValueError(f"per_token_loss {per_token_loss.shape} and mask {mask.shape} must both be [B, T]")
  b, t = per_token_loss.shape
  if logits.shape[:2] != (b, t):
    raise ValueError(f"logits {logits.shape} do not match per_token_loss {per_token_loss.shape}")
  if ids.shape != (b,):
    raise ValueError(f"example ids {ids.shape} must be [B={b}]")
  inputs = base.Inputs(per_token_loss, mask, logits, ids, step, forward)
  token_terms, weights, updates, metrics = [], None, {}, {}
  for name, obj in active:
    terms = obj.loss(cfg[name], {k: obj_state[k] for k in obj.state_keys}, inputs)
    if terms.token_loss is not None:
      token_terms.append(terms.token_loss)
    if terms.seq_weights is not None:
      if weights is not None:
        raise ValueError(f"objective {name!r} weights the sequences too; at most one enabled objective may")
      weights = terms.seq_weights
    if terms.updates:
      updates[name] = terms.updates
    metrics.update(terms.metrics)

  mask32 = mask.astype(jnp.float32)
  if weights is None:
    loss = _masked_mean(per_token_loss, mask)
    for tok in token_terms:
      loss = loss + _masked_mean(tok, mask32)
    return loss, updates, metrics
  n_tok = jnp.maximum(jnp.sum(mask32, axis=1), 1.0)
  seq = jnp.sum(per_token_loss.astype(jnp.float32) * mask32, axis=1) / n_tok
  for tok in token_terms:
    seq = seq + jnp.sum(tok * mask32, axis=1) / n_tok
  return jnp.sum(weights * seq), updates, metrics


def merge_microbatch_updates(cfg, stacked):
  """Concatenates `obj_updates` stacked over microbatches ([accum, mb, ...] → [accum·mb, ...])."""
  del cfg
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), stacked)


def post_update(cfg, obj_state, obj_updates, new_params, step):
  """The objective state after the optimizer step (each enabled objective's `update` on its own keys)."""
  active = enabled(cfg)
  if not active:
    return obj_state
  state = dict(obj_state)
  for name, obj in active:
    own = {k: obj_state[k] for k in obj.state_keys}
    state.update(obj.update(cfg[name], own, obj_updates.get(name, {}), new_params, step))
  return state


__all__ = ["REGISTRY", "default_objectives_config", "check_config", "init_state", "apply",
           "merge_microbatch_updates", "post_update", "enabled", "base"]
