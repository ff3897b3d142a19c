"""Training objectives applied on top of next-token cross-entropy (SAF/MESA, loss-based sample reweighting).

Contract with the train step (train/step.py):

    obj_state = init_state(cfg.objectives, params, num_train_examples=..., seq_len=..., vocab_size=...)
    loss, obj_updates, metrics = apply(cfg.objectives, per_token_loss=..., mask=..., logits=..., ids=...,
                                       step=..., obj_state=..., forward=...)
    obj_state = post_update(cfg.objectives, obj_state, obj_updates, new_params, step)

With gradient accumulation the step stacks the per-microbatch `obj_updates` and merges them with
`merge_microbatch_updates` (every update leaf has a leading per-example axis, so they concatenate).

With every objective switched off, `loss` is the plain masked mean of `per_token_loss` (bit-identical to the
step without objectives) and the state is empty.

Two independent switches, which combine:
* `trajectory`: 'none' | 'mesa' | 'saf' — the SAF trajectory loss (arXiv 2205.14083, `saf.py`). 'mesa' (an EMA
  teacher, no per-example memory, one extra forward) is the variant to use for one-pass LLM pretraining; 'saf'
  keeps the top-k past outputs of every training example in a store keyed by global example id.
  Loss = CE + λ·τ²·KL(teacher ‖ student), per token, averaged over the non-masked tokens.
* `reweight.enabled`: dynamic loss-based sample reweighting (arXiv 2502.06733, `reweighting.py`).
  Loss = Σ_i w_i·ℓ_i over the sequences of the batch, w = stop_gradient(softmax(f(h(CE_i))/r)).
  Combined with a trajectory loss, ℓ_i = CE_i + λ·τ²·KL_i (the weights come from CE_i alone).

Metrics (into metrics.jsonl): `<mesa|saf>_kl` (mean unscaled KL over the tokens with a target), `<mesa|saf>_active`,
`saf_hit_frac` (fraction of the batch with a stored target), `rw_entropy`, `rw_w_min`, `rw_w_max`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from train.objectives import reweighting, saf

TRAJECTORIES = ("none", "mesa", "saf")


def default_objectives_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trajectory = "none"   # 'none' | 'mesa' (EMA teacher; the LLM choice) | 'saf' (per-example store)
  # MESA (arXiv 2205.14083 §4, MESA_train.py / run.sh): λ=0.8, τ=5, EMA decay 0.9998, KL after a warm-up.
  c.mesa = ml_collections.ConfigDict(dict(
      lam=0.8,
      tau=5.0,
      decay=0.9998,
      start_step=1000,    # KL term from this optimizer step on (EMA updated from step 0)
  ))
  # SAF (arXiv 2205.14083 §3, README): λ=0.3, τ=5, Ẽ=3 (also 2); targets appear after Ẽ visits of an example.
  c.saf = ml_collections.ConfigDict(dict(
      lam=0.3,
      tau=5.0,
      epochs_back=3,      # Ẽ: target = this example's output from Ẽ visits (epochs) earlier
      topk=8,             # stored top-k log-probs per position (+ the tail mass); k = vocab gives the exact KL
      start_step=0,       # KL term from this optimizer step on (the store fills from step 0)
      store_dtype="bfloat16",  # 'bfloat16' | 'float16' | 'float32'
  ))
  # Loss-based sample reweighting (arXiv 2502.06733): GPT-2 runs use r=0.4 (extremes/linupper), 1.0 (quadratic).
  c.reweight = ml_collections.ConfigDict(dict(
      enabled=False,
      strategy="linupper",  # 'linupper' (min(x+1, 1)) | 'quadratic' (1 − x²) | 'extremes' (|x|)
      r=0.4,                # softmax temperature (KL regulariser); large r → uniform
      warmup_steps=1000,    # uniform weights before this step (GPT-2 code: burnout_steps=1000)
  ))
  return c


def _num(name, v, *, lo=None, hi=None, positive=False):
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ValueError(f"objectives.{name}={v!r} must be a finite number")
  if positive and v <= 0:
    raise ValueError(f"objectives.{name}={v!r} must be > 0")
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    raise ValueError(f"objectives.{name}={v!r} must be in [{lo}, {hi}]")


def _int(name, v, lo):
  if isinstance(v, bool) or not isinstance(v, int) or v < lo:
    raise ValueError(f"objectives.{name}={v!r} must be an int >= {lo}")


def check_config(cfg) -> None:
  """Raises ValueError naming the first bad field of an objectives config."""
  if cfg.trajectory not in TRAJECTORIES:
    raise ValueError(f"objectives.trajectory={cfg.trajectory!r}; expected one of {TRAJECTORIES}")
  m, s, r = cfg.mesa, cfg.saf, cfg.reweight
  _num("mesa.lam", m.lam, lo=0.0)
  _num("mesa.tau", m.tau, positive=True)
  _num("mesa.decay", m.decay, lo=0.0, hi=1.0)
  _int("mesa.start_step", m.start_step, 0)
  _num("saf.lam", s.lam, lo=0.0)
  _num("saf.tau", s.tau, positive=True)
  _int("saf.epochs_back", s.epochs_back, 1)
  _int("saf.topk", s.topk, 1)
  _int("saf.start_step", s.start_step, 0)
  if s.store_dtype not in saf.STORE_DTYPES:
    raise ValueError(f"objectives.saf.store_dtype={s.store_dtype!r}; expected one of {sorted(saf.STORE_DTYPES)}")
  if not isinstance(r.enabled, bool):
    raise ValueError(f"objectives.reweight.enabled={r.enabled!r} must be a bool")
  try:
    reweighting.check_config(r.strategy, r.r, r.warmup_steps)
  except ValueError as e:
    raise ValueError(f"objectives.{e}") from None


def _off(cfg) -> bool:
  return cfg.trajectory == "none" and not cfg.reweight.enabled


def init_state(cfg, params, *, num_train_examples: int, seq_len: int, vocab_size: int):
  """The objective state (a pytree of arrays, part of the donated train state and of the checkpoint).

  mesa: {'ema': float32 copy of params (same shardings)}; saf: {'store': see `saf.store_init`}; otherwise {}.
  Call it inside `jax.set_mesh(mesh)` so that the SAF store is sharded over the batch axes.
  """
  check_config(cfg)
  state = {}
  if cfg.trajectory == "mesa":
    state["ema"] = saf.ema_init(params)
  elif cfg.trajectory == "saf":
    s = cfg.saf
    if s.topk > vocab_size:
      raise ValueError(f"objectives.saf.topk={s.topk} exceeds vocab_size={vocab_size}")
    state["store"] = saf.store_init(num_examples=num_train_examples, epochs_back=s.epochs_back, seq_len=seq_len,
                                    topk=s.topk, vocab_size=vocab_size, store_dtype=s.store_dtype)
  return state


def apply(cfg, *, per_token_loss, mask, logits, ids, step, obj_state, forward):
  """(loss, obj_updates, metrics) for one (micro)batch; called inside the jitted, differentiated loss."""
  if _off(cfg):
    del logits, ids, step, obj_state, forward
    loss = jnp.sum(per_token_loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, {}, {}
  check_config(cfg)
  if per_token_loss.ndim != 2 or mask.shape != per_token_loss.shape:
    raise ValueError(f"per_token_loss {per_token_loss.shape} and mask {mask.shape} must both be [B, T]")
  b, t = per_token_loss.shape
  if logits.shape[:2] != (b, t):
    raise ValueError(f"logits {logits.shape} do not match per_token_loss {per_token_loss.shape}")
  if ids.shape != (b,):
    raise ValueError(f"example ids {ids.shape} must be [B={b}]")
  mask32 = mask.astype(jnp.float32)
  metrics, updates = {}, {}

  traj_tok = None  # λτ²·KL per token (0 where there is no target)
  if cfg.trajectory == "mesa":
    c = cfg.mesa
    active = step >= c.start_step
    ema = obj_state["ema"]

    def on(lg):
      teacher = forward(jax.tree.map(jax.lax.stop_gradient, ema))
      return saf.kl_full(teacher, lg, c.tau)

    kl = jax.lax.cond(active, on, lambda lg: jnp.zeros(lg.shape[:2], jnp.float32), logits)
    has = jnp.broadcast_to(active, (b,))
    traj_tok = (c.lam * c.tau ** 2) * kl
  elif cfg.trajectory == "saf":
    c = cfg.saf
    active = step >= c.start_step
    store = obj_state["store"]
    target_logp, target_ids, stored = saf.store_read(store, ids)
    has = stored & active
    kl = jnp.where(has[:, None], saf.kl_topk(target_logp, target_ids, logits, c.tau), 0.0)
    traj_tok = (c.lam * c.tau ** 2) * kl
    new_logp, new_ids = saf.topk_targets(logits, c.tau, c.topk)
    updates = {"ids": ids.astype(jnp.int32), "logp": new_logp.astype(store["logp"].dtype),
               "tok": new_ids.astype(store["ids"].dtype)}
    metrics["saf_hit_frac"] = jnp.mean(stored.astype(jnp.float32))
  if traj_tok is not None:
    name = cfg.trajectory
    m_has = mask32 * has[:, None].astype(jnp.float32)
    metrics[f"{name}_kl"] = jax.lax.stop_gradient(jnp.sum(kl * m_has) / jnp.maximum(jnp.sum(m_has), 1.0))
    metrics[f"{name}_active"] = active.astype(jnp.float32)

  if not cfg.reweight.enabled:
    loss = jnp.sum(per_token_loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    loss = loss + jnp.sum(traj_tok * mask32) / jnp.maximum(jnp.sum(mask32), 1.0)
    return loss, updates, metrics

  r = cfg.reweight
  n_tok = jnp.sum(mask32, axis=1)
  valid = n_tok > 0
  seq = jnp.sum(per_token_loss.astype(jnp.float32) * mask32, axis=1) / jnp.maximum(n_tok, 1.0)
  w = reweighting.sequence_weights(seq, valid, strategy=r.strategy, r=r.r, uniform=step < r.warmup_steps)
  if traj_tok is not None:
    seq = seq + jnp.sum(traj_tok * mask32, axis=1) / jnp.maximum(n_tok, 1.0)
  loss = jnp.sum(w * seq)
  metrics.update(reweighting.weight_stats(w, valid))
  return loss, updates, metrics


def merge_microbatch_updates(cfg, stacked):
  """Concatenates `obj_updates` stacked over microbatches ([accum, mb, ...] → [accum·mb, ...])."""
  del cfg
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), stacked)


def post_update(cfg, obj_state, obj_updates, new_params, step):
  """The objective state after the optimizer step: EMA update (mesa) or store write (saf)."""
  del step
  if cfg.trajectory == "mesa":
    return {**obj_state, "ema": saf.ema_update(obj_state["ema"], new_params, float(cfg.mesa.decay))}
  if cfg.trajectory == "saf":
    u = obj_updates
    return {**obj_state, "store": saf.store_write(obj_state["store"], u["ids"], u["logp"], u["tok"])}
  return obj_state
