"""SAF and MESA as objectives: the trajectory loss of "Sharpness-Aware Training for Free" (Du, Zhou, Feng, Tan,
Zhou; NeurIPS 2022, arXiv 2205.14083), on top of next-token cross-entropy.

Both add, per token with a target, λ·τ²·KL(teacher_τ ‖ student_τ) (Eq. 7/9 of the paper; τ the softmax temperature):
* `MESA` (§4, "memory-efficient SAF"): the teacher is an exponential moving average of the weights (decay β),
  one extra forward pass per step and no per-example memory; the term starts at `start_step`. The LLM choice.
* `SAF` (§3): the teacher of an example is the model's own output for it Ẽ visits (epochs) earlier, kept in a
  store keyed by the global example id (top-k log-probs per position plus the tail mass; `saf.py`).

The kernels (KL, top-k targets, the store, the EMA) are in `saf.py`; this file only wires them into the
objective interface (`base.py`). Notes: docs/objectives.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from train.objectives import base, saf


def _mesa_config():
  # arXiv 2205.14083 §4 and the authors' ImageNet scripts: λ=0.8, τ=5, EMA decay 0.9998, KL after a warm-up.
  return ml_collections.ConfigDict(dict(
      enabled=False,
      lam=0.8,
      tau=5.0,
      decay=0.9998,
      start_step=1000,    # KL term from this optimizer step on (EMA updated from step 0)
  ))


def _mesa_check(c):
  base.check_enabled("mesa", c)
  base.check_number("mesa.lam", c.lam, lo=0.0)
  base.check_number("mesa.tau", c.tau, positive=True)
  base.check_number("mesa.decay", c.decay, lo=0.0, hi=1.0)
  base.check_int("mesa.start_step", c.start_step, 0)


def _mesa_init(c, ctx: base.Context):
  del c
  return {"ema": saf.ema_init(ctx.params)}


def _kl_terms(name, lam, tau, kl, has, active, mask):
  """(λτ²·KL per token, metrics) — the part SAF and MESA share."""
  m_has = mask.astype(jnp.float32) * has[:, None].astype(jnp.float32)
  metrics = {f"{name}_kl": jax.lax.stop_gradient(jnp.sum(kl * m_has) / jnp.maximum(jnp.sum(m_has), 1.0)),
             f"{name}_active": active.astype(jnp.float32)}
  return (lam * tau ** 2) * kl, metrics


def _mesa_loss(c, state, x: base.Inputs):
  active = x.step >= c.start_step

  def on(lg):
    teacher = x.forward(jax.tree.map(jax.lax.stop_gradient, state["ema"]))
    return saf.kl_full(teacher, lg, c.tau)

  kl = jax.lax.cond(active, on, lambda lg: jnp.zeros(lg.shape[:2], jnp.float32), x.logits)
  has = jnp.broadcast_to(active, x.ids.shape)
  tok, metrics = _kl_terms("mesa", c.lam, c.tau, kl, has, active, x.mask)
  return base.Terms(token_loss=tok, metrics=metrics)


def _mesa_update(c, state, updates, new_params, step):
  del updates, step
  return {"ema": saf.ema_update(state["ema"], new_params, float(c.decay))}


MESA = base.Objective(config=_mesa_config, check=_mesa_check, init=_mesa_init, loss=_mesa_loss,
                      update=_mesa_update, state_keys=("ema",))


def _saf_config():
  # arXiv 2205.14083 §3 and the authors' README: λ=0.3, τ=5, Ẽ=3 (also 2).
  return ml_collections.ConfigDict(dict(
      enabled=False,
      lam=0.3,
      tau=5.0,
      epochs_back=3,      # Ẽ: target = this example's output from Ẽ visits (epochs) earlier
      topk=8,             # stored top-k log-probs per position (+ the tail mass); k = vocab gives the exact KL
      start_step=0,       # KL term from this optimizer step on (the store fills from step 0)
      store_dtype="bfloat16",  # 'bfloat16' | 'float16' | 'float32'
  ))


def _saf_check(c):
  base.check_enabled("saf", c)
  base.check_number("saf.lam", c.lam, lo=0.0)
  base.check_number("saf.tau", c.tau, positive=True)
  base.check_int("saf.epochs_back", c.epochs_back, 1)
  base.check_int("saf.topk", c.topk, 1)
  base.check_int("saf.start_step", c.start_step, 0)
  if c.store_dtype not in saf.STORE_DTYPES:
    raise ValueError(f"objectives.saf.store_dtype={c.store_dtype!r}; expected one of {sorted(saf.STORE_DTYPES)}")


def _saf_init(c, ctx: base.Context):
  if c.topk > ctx.vocab_size:
    raise ValueError(f"objectives.saf.topk={c.topk} exceeds vocab_size={ctx.vocab_size}")
  return {"store": saf.store_init(num_examples=ctx.num_train_examples, epochs_back=c.epochs_back,
                                  seq_len=ctx.seq_len, topk=c.topk, vocab_size=ctx.vocab_size,
                                  store_dtype=c.store_dtype)}


def _saf_loss(c, state, x: base.Inputs):
  active = x.step >= c.start_step
  store = state["store"]
  target_logp, target_ids, stored = saf.store_read(store, x.ids)
  has = stored & active
  kl = jnp.where(has[:, None], saf.kl_topk(target_logp, target_ids, x.logits, c.tau), 0.0)
  tok, metrics = _kl_terms("saf", c.lam, c.tau, kl, has, active, x.mask)
  new_logp, new_ids = saf.topk_targets(x.logits, c.tau, c.topk)
  updates = {"ids": x.ids.astype(jnp.int32), "logp": new_logp.astype(store["logp"].dtype),
             "tok": new_ids.astype(store["ids"].dtype)}
  metrics["saf_hit_frac"] = jnp.mean(stored.astype(jnp.float32))
  return base.Terms(token_loss=tok, updates=updates, metrics=metrics)


def _saf_update(c, state, updates, new_params, step):
  del c, new_params, step
  return {"store": saf.store_write(state["store"], updates["ids"], updates["logp"], updates["tok"])}


SAF = base.Objective(config=_saf_config, check=_saf_check, init=_saf_init, loss=_saf_loss, update=_saf_update,
                     state_keys=("store",))
