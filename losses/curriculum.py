"""Curriculum weights for answer re-ranking.

Paper: MacAvaney, Nardini, Perego, Tonellotto, Goharian, Frieder, "Training Curricula for
Open Domain Answer Re-Ranking", SIGIR 2020, arXiv:2004.14269; official code in OpenNIR
(`onir/trainers/pairwise_cl.py`, `pointwise_cl.py`, `onir/util/__init__.py::kde_cdf_from_run`).

Difficulty heuristics from the first-stage run of a query (all in [0, 1], larger = easier positive):
  reciprank  1 / rank (1-based; absent documents get rank 1000)
  normscore  (s - min s) / (max s - min s) over the query's run
  kdescore   CDF of a Gaussian KDE of the run scores at s: mean_k Phi((s - s_k)/h),
             h = std_unbiased * n^(-1/5) (Scott; == scipy gaussian_kde(...).integrate_box_1d(-inf, s))
Per-sample difficulty D (anti-curriculum: h -> 1 - h), then D += 1e-8:
  pointwise  D = h(d) if d is relevant else 1 - h(d)
  pairwise   D = min_j (h(d+) - h(d-_j) + 1) / 2
Schedule with epoch i and end-of-curriculum m (default 20):  W = D (1 - i/m) + i/m for i < m, else 1.
Application: the official code multiplies the batch-mean loss by the batch-mean weight
(`per_sample=False`, the default here for reproduction); `per_sample=True` is the paper's per-sample
weighting mean(W * loss).
Guards (deviations, the official code would divide by zero): a run with constant scores gives
normscore 0.5; a KDE over fewer than two distinct scores uses bandwidth 1.
"""
from typing import Optional

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from losses import _utils as U



def _check_run_scores(scores, run_scores, run_where):
  """(scores, run_scores [Q, N], run mask, compute dtype) with the shape checks shared by the difficulty measures."""
  s = U.check_float_array("scores", scores)
  rs = U.check_float_array("run_scores", run_scores)
  U.check_ndim("run_scores", rs, 2)
  if s.shape[0] != rs.shape[0]:
    raise ValueError(f"scores and run_scores need the same number of queries, got {s.shape} and {rs.shape}")
  return s, rs, U.mask_or_ones("run_where", run_where, rs.shape), U.compute_dtype(s, rs)

def reciprank_difficulty(ranks, *, missing_rank: int = 1000):
  """1/rank with 1-based ranks; ranks <= 0 (absent from the run) count as `missing_rank`."""
  r = jnp.asarray(ranks)
  r = jnp.where(r > 0, r, missing_rank).astype(U.compute_dtype(r))
  return 1.0 / r


def normscore_difficulty(scores, run_scores, run_where: Optional[jax.Array] = None):
  """Min-max normalised score of each document within its query's run.

  scores: [Q, K] scores of the training documents; run_scores: [Q, N] first-stage run scores.
  A query whose run is constant or empty (all of `run_where` False) gets 0.5 for every document.
  """
  s, rs, w, dt = _check_run_scores(scores, run_scores, run_where)
  lo = U.masked_min(rs.astype(dt), w, axis=1, empty=0.)[:, None]
  hi = U.masked_max(rs.astype(dt), w, axis=1, empty=0.)[:, None]   # empty run: hi = lo, no range
  rng = hi - lo
  return jnp.where(rng > 0, (s.astype(dt) - lo) / jnp.where(rng > 0, rng, 1.), 0.5)


def kde_difficulty(scores, run_scores, run_where: Optional[jax.Array] = None):
  """Gaussian-KDE CDF (Scott bandwidth) of each query's run scores evaluated at `scores`."""
  s, rs, w, dt = _check_run_scores(scores, run_scores, run_where)
  rs = rs.astype(dt)
  wf = w.astype(dt)
  n = jnp.sum(wf, 1, keepdims=True)
  mean = jnp.sum(rs * wf, 1, keepdims=True) / jnp.maximum(n, 1)
  var = jnp.sum(wf * (rs - mean) ** 2, 1, keepdims=True) / jnp.maximum(n - 1, 1)
  h = U.safe_sqrt(var) * jnp.maximum(n, 1) ** (-0.2)
  h = jnp.where(h > 0, h, 1.)
  z = (s.astype(dt)[:, :, None] - rs[:, None, :]) / h[:, :, None]
  return jnp.sum(ndtr(z) * wf[:, None, :], -1) / jnp.maximum(n, 1)


def curriculum_weights(pos_difficulty, neg_difficulty=None, *, epoch, end_epoch: int = 20,
                       relevant: Optional[jax.Array] = None, anti_curriculum: bool = False):
  """Curriculum weights W in (0, 1].

  Args:
    pos_difficulty: [B] heuristic h of the positive (pairwise) or of the document (pointwise).
    neg_difficulty: [B, n] heuristics of the negatives (pairwise mode); None = pointwise mode.
    epoch: current training epoch i (may be traced). end_epoch: m, weights are 1 from epoch m on.
    relevant: [B] bool relevance (pointwise mode only).
    anti_curriculum: use 1 - h instead of h.
  """
  if end_epoch <= 0:
    raise ValueError(f"end_epoch must be > 0, got {end_epoch}")
  hp = U.check_float_array("pos_difficulty", pos_difficulty)
  U.check_ndim("pos_difficulty", hp, 1)
  dt = U.compute_dtype(hp)
  hp = hp.astype(dt)
  if anti_curriculum:
    hp = 1 - hp
  if neg_difficulty is None:
    if relevant is None:
      raise ValueError("relevant is required in pointwise mode (neg_difficulty=None)")
    U.check_shape("relevant", relevant, hp.shape)
    d = jnp.where(jnp.asarray(relevant, bool), hp, 1 - hp)
  else:
    if relevant is not None:
      raise ValueError("relevant is only used in pointwise mode")
    hn = U.check_float_array("neg_difficulty", neg_difficulty)
    if hn.ndim != 2 or hn.shape[0] != hp.shape[0]:
      raise ValueError(f"neg_difficulty must have shape ({hp.shape[0]}, n), got {hn.shape}")
    hn = hn.astype(dt)
    if anti_curriculum:
      hn = 1 - hn
    d = jnp.min((hp[:, None] - hn + 1) / 2, axis=1)
  d = d + 1e-8
  frac = jnp.asarray(epoch, dt) / end_epoch
  return jax.lax.stop_gradient(jnp.where(frac < 1, d * (1 - frac) + frac, 1.))


def curriculum_weighted_loss(losses, weights, *, per_sample: bool = False,
                             where: Optional[jax.Array] = None):
  """Applies curriculum weights: mean(loss) * mean(W) (official code) or mean(W * loss) (per_sample)."""
  l = U.check_float_array("losses", losses)
  U.check_ndim("losses", l, 1)
  U.check_shape("weights", weights, l.shape)
  w = U.mask_or_ones("where", where, l.shape)
  wt = jax.lax.stop_gradient(jnp.asarray(weights, U.compute_dtype(l)))
  l = l.astype(U.compute_dtype(l))
  if per_sample:
    return U.safe_mean(wt * l, w)
  return U.safe_mean(l, w) * U.safe_mean(wt, w)
