"""Dynamic loss-based sample reweighting of the per-sequence losses of a batch.

Paper: Sow, Woisetschläger, Bulusu, Wang, Jacobsen, Liang, "Dynamic Loss-Based Sample Reweighting for Improved
Large Language Model Pretraining", ICLR 2025, arXiv 2502.06733 (§3; reference GPT-2 `src/trainer.py` and
fms-fsdp `fms_fsdp/utils/train_utils.py`).

For the per-sequence losses ℓ_i of the whole (global) batch (mean token CE over the non-masked tokens):
  1. normalise to [−δ, δ] with the batch min and max (δ = 1, denominator floored at 1e-6):
         h_i = 2δ·ℓ_i/(ℓ_max − ℓ_min) − δ·(ℓ_max + ℓ_min)/(ℓ_max − ℓ_min)
  2. transform: LinUpper f(h) = min(h + δ, δ); Quadratic f(h) = 1 − h²/δ²; Extremes f(h) = |h|
  3. weights w = softmax(f/r) (the closed form of max_w Σ w_i f_i − r·KL(w ‖ uniform)), with no gradient;
     uniform weights 1/B during the first `warmup_steps` steps;
  4. loss = Σ_i w_i ℓ_i.

Deviations from the reference code (deliberate):
* min/max and the softmax run over the global batch inside jit: with a batch-sharded array `jnp.min`/`jnp.max`/
  `softmax` are already global, so every device sees the same weights. (fms-fsdp slices the gathered weights with
  the local rank, which is wrong on multi-node runs; not reproduced.)
* Sequences without any non-masked token (padding rows) get weight 0 and are excluded from min/max/softmax.
* Gradient accumulation (`train.grad_accum` = A > 1): the weights are computed per microbatch (min/max and
  softmax over its B/A sequences, summing to 1 in each) and the step averages the A microbatch losses, so a
  sequence's effective weight is w_i/A. Global-batch weights would need every microbatch's losses before any
  backward pass (a second forward pass); the per-microbatch choice keeps one pass and equals the global weighting
  when A = 1. Pinned by `tests/test_fidelity_fixes.py`.
* Warm-up: uniform weights over sequences (the GPT-2 code uses token-weighted CE during `burnout_steps`; equal
  when every sequence has the same number of tokens, as in packed pretraining).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from train.objectives import base

STRATEGIES = ("linupper", "quadratic", "extremes")
DELTA = 1.0
DENOM_FLOOR = 1e-6


def check_config(strategy, r, warmup_steps):
  if strategy not in STRATEGIES:
    raise ValueError(f"reweight.strategy={strategy!r}; expected one of {STRATEGIES}")
  if isinstance(r, bool) or not isinstance(r, (int, float)) or not (r > 0 and math.isfinite(r)):
    raise ValueError(f"reweight.r={r!r} must be a positive finite number")
  if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
    raise ValueError(f"reweight.warmup_steps={warmup_steps!r} must be an int >= 0")


def normalize(losses, valid):
  """h = losses mapped affinely to [−δ, δ] with the min/max over the valid entries (δ = 1)."""
  losses = losses.astype(jnp.float32)
  lo = jnp.min(jnp.where(valid, losses, jnp.inf))
  hi = jnp.max(jnp.where(valid, losses, -jnp.inf))
  any_valid = jnp.any(valid)
  lo, hi = jnp.where(any_valid, lo, 0.0), jnp.where(any_valid, hi, 0.0)
  den = jnp.maximum(hi - lo, DENOM_FLOOR)
  h = 2 * DELTA * losses / den - DELTA * (hi + lo) / den
  return jnp.where(valid, h, 0.0)


def transform(h, strategy: str):
  if strategy == "linupper":
    return jnp.minimum(h + DELTA, DELTA)
  if strategy == "quadratic":
    return 1.0 - h * h / (DELTA * DELTA)
  if strategy == "extremes":
    return jnp.abs(h)
  raise ValueError(f"reweight.strategy={strategy!r}; expected one of {STRATEGIES}")


def sequence_weights(losses, valid, *, strategy: str, r: float, uniform=False):
  """Weights [B] (sum 1 over the valid sequences, 0 elsewhere), with no gradient.

  losses: per-sequence losses [B]; valid: bool[B]; uniform: a (traced) bool, True during warm-up.
  """
  if losses.ndim != 1 or valid.shape != losses.shape:
    raise ValueError(f"per-sequence losses must be [B] with a matching valid mask, got {losses.shape} and "
                     f"{valid.shape}")
  check_config(strategy, r, 0)
  losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
  valid = valid.astype(bool)
  f = transform(normalize(losses, valid), strategy) / r
  logits = jnp.where(valid, f, -jnp.inf)
  m = jnp.max(logits)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(valid, jnp.exp(jnp.where(valid, logits, 0.0) - m), 0.0)
  soft = e / jnp.maximum(jnp.sum(e), jnp.finfo(jnp.float32).tiny)
  flat = valid.astype(jnp.float32) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
  return jax.lax.stop_gradient(jnp.where(uniform, flat, soft))


def weight_stats(w, valid):
  """{'rw_entropy': −Σ w log w, 'rw_w_min', 'rw_w_max'} over the valid sequences."""
  w = w.astype(jnp.float32)
  ent = -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0))
  any_valid = jnp.any(valid)
  wmin = jnp.where(any_valid, jnp.min(jnp.where(valid, w, jnp.inf)), 0.0)
  wmax = jnp.where(any_valid, jnp.max(jnp.where(valid, w, -jnp.inf)), 0.0)
  return {"rw_entropy": ent, "rw_w_min": wmin, "rw_w_max": wmax}


# ----------------------------------------------------------------------------- as an objective (base.py)

def _config():
  # GPT-2 runs of the paper: r = 0.4 (extremes / linupper), 1.0 (quadratic); burnout_steps = 1000.
  return ml_collections.ConfigDict(dict(
      enabled=False,
      strategy="linupper",  # 'linupper' (min(x+1, 1)) | 'quadratic' (1 − x²) | 'extremes' (|x|)
      r=0.4,                # softmax temperature (KL regulariser); large r → uniform
      warmup_steps=1000,    # uniform weights before this step
  ))


def _check(c):
  base.check_enabled("reweight", c)
  try:
    check_config(c.strategy, c.r, c.warmup_steps)
  except ValueError as e:
    raise ValueError(f"objectives.{e}") from None


def _loss(c, state, x: base.Inputs):
  """Weights from each sequence's mean CE over its non-masked tokens (padding-only rows: weight 0)."""
  del state
  mask32 = x.mask.astype(jnp.float32)
  n_tok = jnp.sum(mask32, axis=1)
  valid = n_tok > 0
  seq = jnp.sum(x.per_token_loss.astype(jnp.float32) * mask32, axis=1) / jnp.maximum(n_tok, 1.0)
  w = sequence_weights(seq, valid, strategy=c.strategy, r=c.r, uniform=x.step < c.warmup_steps)
  return base.Terms(seq_weights=w, metrics=weight_stats(w, valid))


REWEIGHT = base.Objective(config=_config, check=_check, init=lambda c, ctx: {}, loss=_loss,
                          update=base.no_update)
