"""Differentiable sorting networks (odd-even, bitonic) and the GroCo loss.

Papers:
* Shvetsova, Petersen, Kukleva, Schiele, Kuehne, "Learning by Sorting: Self-supervised Learning
  with Group Ordering Constraints", ICCV 2023, arXiv:2301.02009 (GroCo loss, Sec. 3).
* Petersen, Borgelt, Kuehne, Deussen, "Differentiable Sorting Networks for Scalable Sorting and
  Ranking Supervision", ICML 2021, arXiv:2105.04019, and "Monotonic Differentiable Sorting
  Networks", ICLR 2022, arXiv:2203.09630 (the relaxed comparator and its distributions).

Soft sorting network: every comparator of a hard sorting network on values (a, b) is relaxed with
alpha = F(steepness (b - a)):  min' = alpha a + (1 - alpha) b,  max' = (1 - alpha) a + alpha b; the
same convex combination is applied to the columns of a running permutation matrix P (P_0 = I).
Conventions follow `diffsort` 0.2.0 exactly: ascending order, `sorted = x @ P`, i.e. P[..., i, j] is
the probability that input i lands at sorted position j. Networks: `odd_even` (n layers of
odd-even transposition) and `bitonic` (for n not a power of two the lowest wires of the 2^k network
are dropped, as in diffsort). F ("distribution"): cauchy atan(v)/pi + 1/2 (GroCo's choice),
logistic, logistic_phi, gaussian, reciprocal, optimal.

GroCo loss (per anchor view, Sec. 3.2-3.3 of the paper, official `GroCo.compute_loss`):
  x = [top-k negative similarities ascending, positive similarities ascending]
  P = soft_sort permutation of x (odd-even, cauchy, steepness)
  q_low[i] = clip(sum_{j<k} P[i, j], 0, 1),  q_high[i] = clip(sum_{j>=k} P[i, j], 0, 1)
  L = (BCE(q_high, 1[i >= k]) + BCE(q_low, 1[i < k])) / 2, BCE = torch BCELoss (log clamped at -100,
  mean over batch and list); the final loss is the mean over anchor views.
Negatives are the other samples of the anchor's own view (cosine with eps 1e-8); with
`stop_grad=True` (default of all released configs) positives and negatives are detached.
Defaults: steepness=1, topk_neg=10, network odd_even, distribution cauchy (official configs).
Padding: `where` [B] marks valid rows. A padded row is neither an anchor nor a negative (its
similarities are masked to -inf before the top-k), its rows are zeroed first so garbage/NaN padding
cannot leak, and the mean runs over valid anchors only - the loss equals the unpadded batch's and
padded rows get exactly zero gradient. An anchor with fewer than `topk_neg` valid negatives (only
possible with padding) contributes nothing; an all-padded batch gives 0 (with zero gradients).
Cross-device negatives: with `axis_name` (inside `jax.shard_map` over the batch axis) every device's
anchors take their negatives from the all-gathered batch (gradient-passing `all_gather`, as the
official distributed code; self excluded by global row index) and the loss is the mean over all
devices' valid anchors (`psum` of sums and counts), i.e. equal to the unsharded loss on the
concatenated batch. Deviation from the official code: it averages per-device means (DDP), which
differs from the global mean only when devices hold different numbers of valid rows.
"""
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from losses import _utils as U

_NETWORKS = ("odd_even", "bitonic")
_DISTRIBUTIONS = ("cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")


@functools.lru_cache(maxsize=None)
def _layers(network: str, n: int):
  """Comparator layers as tuples of int arrays (i, j, dest_min, dest_max); no-op comparators dropped."""
  layers = []
  if network == "odd_even":
    for layer in range(n):
      i = np.arange(layer % 2, n - 1, 2)
      if i.size:
        layers.append((i, i + 1, i, i + 1))
  else:
    blocks = max(int(math.ceil(math.log2(n))), 0) if n > 1 else 0
    pad = 2 ** blocks - n
    for block in range(blocks):
      for sub in range(block + 1):
        m = 2 ** (block - sub)
        ii, jj, dmin, dmax = [], [], [], []
        for start in range(0, 2 ** blocks, 2 * m):
          for off in range(m):
            a, b = start + off, start + off + m
            if a < pad or b < pad:
              continue   # comparator touching a dropped wire: identity on the real wire
            lo, hi = (b, a) if ((start + off) // 2 ** (block + 1)) % 2 == 1 else (a, b)
            ii.append(a - pad); jj.append(b - pad); dmin.append(lo - pad); dmax.append(hi - pad)
        if ii:
          layers.append(tuple(np.asarray(v) for v in (ii, jj, dmin, dmax)))
  return tuple(layers)


def _alpha(a, b, steepness, art_lambda, distribution):
  d = b - a
  if distribution == "cauchy":
    return jnp.arctan(steepness * d) / jnp.pi + 0.5
  if distribution == "logistic":
    return jax.nn.sigmoid(steepness * d)
  if distribution == "logistic_phi":
    return jax.nn.sigmoid(steepness * d / (jnp.abs(d) + 1e-10) ** art_lambda)
  if distribution == "gaussian":
    return jax.scipy.special.ndtr(steepness * d)
  if distribution == "reciprocal":
    v = steepness * d
    return 0.5 * (v / (2 + jnp.abs(v)) + 1)
  v = steepness * d   # optimal
  big = (v > 0.25).astype(v.dtype) - (v < -0.25).astype(v.dtype)
  return jnp.clip(v, -0.25, 0.25) + 0.5 + big * (0.25 - 1 / 16 / (jnp.abs(v) + 1e-10))


@functools.lru_cache(maxsize=None)
def _gather_layers(network: str, n: int):
  """Per layer, for every wire w: the comparator inputs (I_w, J_w) and whether w gets the soft min.

  Untouched wires have I_w = J_w = w (the update is then an exact no-op), so a layer is two gathers.
  """
  out = []
  for i, j, dmin, dmax in _layers(network, n):
    src_i, src_j, is_min = np.arange(n), np.arange(n), np.zeros(n, bool)
    src_i[dmin], src_j[dmin], is_min[dmin] = i, j, True
    src_i[dmax], src_j[dmax] = i, j
    out.append((src_i.astype(np.int32), src_j.astype(np.int32), is_min))
  return tuple(out)


@functools.partial(jax.jit, static_argnames=("network", "steepness", "art_lambda", "distribution"))
def _sort_impl(x, network, steepness, art_lambda, distribution):
  n = x.shape[-1]
  perm = jnp.broadcast_to(jnp.eye(n, dtype=x.dtype), x.shape[:-1] + (n, n))
  for src_i, src_j, is_min in _gather_layers(network, n):
    a, b = x[..., src_i], x[..., src_j]
    al = _alpha(a, b, steepness, art_lambda, distribution)
    c = jnp.where(is_min, al, 1 - al)       # weight of input a on this wire
    x = c * a + (1 - c) * b
    c2 = c[..., None, :]
    perm = c2 * perm[..., :, src_i] + (1 - c2) * perm[..., :, src_j]
  return x, perm


def diffsort_permutation(x, *, network: str = "odd_even", steepness: float = 10.0,
                         art_lambda: float = 0.25, distribution: str = "cauchy"):
  """Differentiable sorting network (diffsort semantics).

  Args:
    x: [..., n] float values, sorted along the last axis (ascending).
    network: "odd_even" or "bitonic".
    steepness, art_lambda, distribution: comparator relaxation (diffsort defaults 10, 0.25, cauchy);
      Python floats (static).

  Returns:
    (sorted_x [..., n], P [..., n, n]) with sorted_x == x @ P (P doubly stochastic).
  """
  U.check_choice("network", network, _NETWORKS)
  U.check_choice("distribution", distribution, _DISTRIBUTIONS)
  U.check_positive("steepness", steepness)
  x = U.check_float_array("x", x)
  if x.ndim < 1:
    raise ValueError(f"x must have at least one axis, got shape {x.shape}")
  x = x.astype(U.compute_dtype(x))
  return _sort_impl(x, network, float(steepness), float(art_lambda), distribution)


def soft_sort(x, *, network: str = "odd_even", steepness: float = 10.0, art_lambda: float = 0.25,
              distribution: str = "cauchy"):
  """Softly sorted values (ascending) of `x` along the last axis; see `diffsort_permutation`."""
  return diffsort_permutation(x, network=network, steepness=steepness, art_lambda=art_lambda,
                              distribution=distribution)[0]


def _unit(a, eps=1e-8):
  return a / jnp.maximum(U.safe_sqrt(jnp.sum(a * a, -1, keepdims=True)), eps)


def _bce_terms(p, t):
  """Elementwise torch BCELoss terms (log clamped at -100)."""
  logp = jnp.maximum(jnp.log(p), -100.)
  log1mp = jnp.maximum(jnp.log1p(-p), -100.)
  return -(t * logp + (1 - t) * log1mp)


def _check_sims(neg_sims, pos_sims):
  neg_sims, pos_sims = U.check_float_array("neg_sims", neg_sims), U.check_float_array("pos_sims", pos_sims)
  U.check_ndim("neg_sims", neg_sims, 2)
  U.check_ndim("pos_sims", pos_sims, 2)
  if neg_sims.shape[0] != pos_sims.shape[0]:
    raise ValueError(f"neg_sims/pos_sims batch mismatch: {neg_sims.shape} vs {pos_sims.shape}")
  return neg_sims, pos_sims


def _row_losses(neg_sims, pos_sims, where, steepness, network, distribution):
  """Per-row GroCo ordering loss [B]: (BCE(q_high, t_high) + BCE(q_low, t_low)) / 2, BCE averaged
  over the row's list; rows with where=False are evaluated on zeros (finite, zero gradient)."""
  k = neg_sims.shape[1]
  dt = U.compute_dtype(neg_sims, pos_sims)
  x = jnp.concatenate([jnp.sort(neg_sims.astype(dt), -1), jnp.sort(pos_sims.astype(dt), -1)], -1)
  x = jnp.where(where[:, None], x, 0.)
  _, perm = diffsort_permutation(x, network=network, steepness=steepness, distribution=distribution)
  q_low = jnp.clip(jnp.sum(perm[..., :k], -1), 0., 1.)
  q_high = jnp.clip(jnp.sum(perm[..., k:], -1), 0., 1.)
  t_low = (jnp.arange(x.shape[-1]) < k).astype(dt)
  return 0.5 * (jnp.mean(_bce_terms(q_high, 1 - t_low), -1) + jnp.mean(_bce_terms(q_low, t_low), -1))


def groco_sorting_loss(neg_sims, pos_sims, *, steepness: float = 1.0, network: str = "odd_even",
                       distribution: str = "cauchy", where: Optional[jax.Array] = None):
  """GroCo ordering loss for given similarity lists (one row per anchor).

  Args:
    neg_sims: [B, k] negative similarities; pos_sims: [B, n_pos] positive similarities
      (any order: both are sorted ascending here, as in the official preordering).
    where: optional [B] bool, rows to include (others may hold any value, even inf/NaN).
  Returns: scalar, (BCE(q_high, t_high) + BCE(q_low, t_low)) / 2 averaged over the included rows
    (torch BCELoss mean when all are included); 0 when no row is included.
  """
  neg_sims, pos_sims = _check_sims(neg_sims, pos_sims)
  where = U.mask_or_ones("where", where, neg_sims.shape[:1])
  rows = _row_losses(neg_sims, pos_sims, where, steepness, network, distribution)
  return U.safe_mean(rows, where)


def groco_loss(views, *, steepness: float = 1.0, topk_neg: int = 10, n_pos_views: Optional[int] = None,
               stop_grad: bool = True, network: str = "odd_even", distribution: str = "cauchy",
               where: Optional[jax.Array] = None, axis_name=None):
  """GroCo loss over `V` augmented views of a batch.

  Args:
    views: [V, B, D] projections of V augmentations of the same B images. Views `0..n_pos_views-1`
      are "full" views used as positives (multi-crop: later views are small crops, anchors only).
    steepness, network, distribution: sorter settings (official: 1, odd_even, cauchy).
    topk_neg: number of hardest in-batch negatives per anchor (requires B - 1 >= topk_neg, B the
      global batch with `axis_name`).
    n_pos_views: number of positive views (default V).
    stop_grad: detach positives and negatives (official default True).
    where: optional [B] bool, valid (non-padding) rows; see the module docstring. An anchor with
      fewer than `topk_neg` valid negatives contributes nothing; all rows padded -> 0.
    axis_name: optional `jax.shard_map` axis (name or tuple of names) sharding the B axis: negatives
      are all-gathered over it and the returned loss (identical on every device) is the global one.

  Returns: scalar, mean over the V anchor views of the per-view ordering loss (mean over valid anchors).
  """
  views = U.check_float_array("views", views)
  U.check_ndim("views", views, 3)
  n_views, b, _ = views.shape
  n_pos = n_views if n_pos_views is None else int(n_pos_views)
  if not 1 <= n_pos <= n_views:
    raise ValueError(f"n_pos_views must be in [1, {n_views}], got {n_pos_views}")
  if n_pos < 2 and n_views <= n_pos:
    raise ValueError(f"need at least 2 views to form positives, got {n_views} views")
  where = U.mask_or_ones("where", where, (b,))
  views = views.astype(U.compute_dtype(views))
  views = jnp.where(where[None, :, None], views, 0.)
  sg = jax.lax.stop_gradient if stop_grad else (lambda v: v)
  if axis_name is None:
    gather = lambda v: v
    offset = 0
  else:
    gather = lambda v: jax.lax.all_gather(v, axis_name, axis=0, tiled=True)
    offset = jax.lax.axis_index(axis_name) * b
  where_all = gather(where)
  b_all = where_all.shape[0]
  if not 0 <= topk_neg <= b_all - 1:
    raise ValueError(f"topk_neg must be in [0, B-1={b_all - 1}], got {topk_neg}")
  # every valid row has the same number of valid negatives: all valid rows but itself
  anchor_ok = where & (jnp.sum(where_all) - 1 >= topk_neg)
  neg_ok = where_all[None, :] & (jnp.arange(b_all)[None, :] != (offset + jnp.arange(b))[:, None])
  total = 0.
  for n in range(n_views):
    anchor = _unit(views[n])
    pos = [p for p in range(n_pos) if p != n]
    pos_sims = jnp.stack([jnp.sum(anchor * _unit(sg(views[p])), -1) for p in pos], axis=1)
    neg = anchor @ gather(sg(anchor)).T
    neg = jnp.where(neg_ok, neg, -jnp.inf)
    neg_sims = jax.lax.top_k(neg, topk_neg)[0]
    total = total + _row_losses(neg_sims, pos_sims, anchor_ok, steepness, network, distribution)
  num = jnp.sum(jnp.where(anchor_ok, total, 0.))
  count = jnp.sum(anchor_ok)
  if axis_name is not None:
    num, count = jax.lax.psum(num, axis_name), jax.lax.psum(count, axis_name)
  return jnp.where(count > 0, num / jnp.maximum(count, 1), 0.) / n_views
