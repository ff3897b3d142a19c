"""Proto-Triplet and ICNN losses for few-shot learning.

Paper: "SuSana Distancia is all you need: Enforcing class separability in metric learning via two
novel distance-based loss functions for few-shot image classification", arXiv:2305.09062 (2023);
official code maumruiz/FSL-Loss (`algorithms/icnn_loss.py`). Formulas follow the official code
(notes in docs/losses.md): Euclidean distance d(x, y) = sqrt(sum (x - y)^2 + 1e-6).

Proto-Triplet:  L = mean_q max(0, d(q, c_{y_q}) - min_{c != y_q} d(q, c) + m),  m = 0.5.

ICNN (inter-class nearest-neighbour score, official `modified_score`, k = 4):
  k <- T - 2 if k + 2 >= T (T = target size); ipc <- k + 1 if None
  D, nbr = the ipc nearest targets of each origin point (after dropping the nearest one, see below)
  SC / DC = same / different class masks of the neighbours
  nn_dc = min DC distance per row (inf if none);  nd = D / (nn_dc + 1e-7), first k columns,
  each row divided by max(1, row max)
  sc_lambda = 1 - sum_n (sum_j nd SC / (|SC_n| + eps)) / (#rows with SC + eps)
  dcnd = (D DC)[:, :k] / (global max + eps)
  dc_lambda = | sum_n (sum_j dcnd / (|DC_n| + eps)) / (#rows with DC + eps) - 1[no DC at all] |
  gamma = mean_n |SC_n| / k  if k + 2 < T else 1;   score = ((sc_l + dc_l)/2 + gamma)/2
  L_ICNN = -log(score)
Deliberate deviation: the official code always drops the nearest neighbour (self-exclusion when
origin == target) - also when origin != target, where it drops a genuine neighbour. Here
`drop_nearest=None` drops it only when scoring a set against itself (`target=None`);
`drop_nearest=True` reproduces the official behaviour. Neighbour selection (top-k) is not
differentiated; gradients flow through the selected distances (as in the code).

Memory: the official code (and a direct port) forms the [N_o, N_t, D] difference tensor. Here the
neighbours are preselected with the ranking key ||t_j||^2 - 2 o_i.t_j (= d^2 - ||o_i||^2, both sets
centred on the target mean, matmul at HIGHEST precision; [N_o, N_t] memory), keeping
ipc + drop + 8 candidates per row; their distances are then recomputed exactly with the formula
above ([N_o, ipc + drop + 8, D]) and the final top-k is taken on those exact values, ties broken
towards the lower target index like `lax.top_k` on the full matrix. Values and gradients therefore
equal the direct computation whenever the float rounding of the key (~1e-7 ||t||^2 in float32) does
not push a true neighbour out of the 8 spare candidates, i.e. except among more than 8 targets whose
squared distances tie to float precision. Peak memory O(N_o N_t + N_o (ipc + 8) D).
"""
from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U

_DIST_EPS = 1e-6
_EPS = 1e-7


def _dist(x, y):
  d2 = jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
  return jnp.sqrt(d2 + _DIST_EPS)


_SPARE_CANDIDATES = 8


def _nearest(o, t, m: int):
  """Distances `_dist` [N_o, m] (ascending) and indices of the m nearest targets of each origin row.

  Same result as `lax.top_k(-_dist(o, t), m)` without the [N_o, N_t, D] intermediate (module
  docstring): candidates from the matmul ranking key, exact distances on the candidates only.
  """
  n_t = t.shape[0]
  n_cand = min(n_t, m + _SPARE_CANDIDATES)
  if n_cand == n_t:   # every target is a candidate: the gathered tensor is already small
    cand = jnp.broadcast_to(jnp.arange(n_t), (o.shape[0], n_t))
  else:
    os_, ts_ = jax.lax.stop_gradient(o), jax.lax.stop_gradient(t)
    center = jnp.mean(ts_, axis=0)
    os_, ts_ = os_ - center, ts_ - center
    key = jnp.sum(ts_ * ts_, -1)[None, :] - 2. * jnp.matmul(os_, ts_.T, precision=jax.lax.Precision.HIGHEST)
    cand = jnp.sort(jax.lax.top_k(-key, n_cand)[1], axis=1)   # index order: ties go to the lower index
  d = jnp.sqrt(jnp.sum((o[:, None, :] - t[cand]) ** 2, axis=-1) + _DIST_EPS)
  neg_d, pos = jax.lax.top_k(-d, m)
  return -neg_d, jnp.take_along_axis(cand, pos, axis=1)


def proto_triplet_loss(query_features, query_labels, prototypes, *, margin: float = 0.5,
                       where: Optional[jax.Array] = None):
  """Proto-Triplet loss: hinge between the own-prototype and the nearest wrong prototype distance.

  Args:
    query_features: [Nq, D]; query_labels: [Nq] ints in [0, N); prototypes: [N, D] class means.
    margin: triplet margin m (official default 0.5).
    where: optional [Nq] validity mask.
  Returns: scalar, mean over valid queries; a query with no other prototype contributes 0.
  """
  q, y = U.check_labeled_matrix("query_features", query_features, "query_labels", query_labels)
  c = U.check_matrix("prototypes", prototypes, dim=q.shape[1])
  where = U.mask_or_ones("where", where, q.shape[:1])
  dt = U.compute_dtype(q, c)
  d = _dist(q.astype(dt), c.astype(dt))
  same = y[:, None] == jnp.arange(c.shape[0])[None, :]
  d_pos = jnp.sum(jnp.where(same, d, 0.), axis=1)
  d_neg = U.masked_min(d, ~same, axis=1)
  hinge = jnp.where(jnp.any(~same, axis=1), jnp.maximum(d_pos - jnp.where(jnp.isfinite(d_neg), d_neg, 0.)
                                                        + margin, 0.), 0.)
  return U.safe_mean(hinge, where)


def icnn_score(origin, origin_labels, target=None, target_labels=None, *, k: int = 4,
               ipc: Optional[int] = None, drop_nearest: Optional[bool] = None):
  """ICNN score in (0, 1] (official `modified_score`); see the module docstring."""
  o, yo = U.check_labeled_matrix("origin", origin, "origin_labels", origin_labels)
  self_ref = target is None
  if self_ref:
    if target_labels is not None:
      raise ValueError("target_labels given without target")
    t, yt = o, yo
  else:
    t, yt = U.check_labeled_matrix("target", target, "target_labels", target_labels, dim=o.shape[1])
  drop = self_ref if drop_nearest is None else bool(drop_nearest)
  n_t = t.shape[0]
  k = n_t - 2 if k + 2 >= n_t else int(k)
  ipc = k + 1 if ipc is None else int(ipc)
  if k < 1 or ipc < k or ipc + int(drop) > n_t:
    raise ValueError(f"target set too small: size {n_t} for k={k}, ipc={ipc}, drop_nearest={drop}")
  dt = U.compute_dtype(o, t)
  D, idx = _nearest(o.astype(dt), t.astype(dt), ipc + int(drop))
  D, idx = D[:, int(drop):], idx[:, int(drop):]
  sc = yt[idx] == yo[:, None]
  dc = ~sc
  dcd = jnp.where(dc, D, 0.)
  nn_dc = U.masked_min(D, dc, axis=1)
  nd = jnp.where(jnp.isfinite(nn_dc)[:, None], D / (jnp.where(jnp.isfinite(nn_dc), nn_dc, 1.)[:, None] + _EPS), 0.)
  nd = nd[:, :k]
  nd = nd / jnp.maximum(1., jnp.max(nd, axis=1, keepdims=True))
  sc, dc, dcd = sc[:, :k], dc[:, :k], dcd[:, :k]
  sc_counts = jnp.sum(sc, axis=1).astype(dt)
  sc_lambda = 1 - jnp.sum(jnp.sum(jnp.where(sc, nd, 0.), 1) / (sc_counts + _EPS)) / (
      jnp.sum(sc_counts > 0) + _EPS)
  dcnd = dcd / (jnp.max(dcd) + _EPS)
  dc_counts = jnp.sum(dc, axis=1).astype(dt)
  dc_op = jnp.where(jnp.any(dc), 0., -1.)
  dc_lambda = jnp.abs(jnp.sum(jnp.sum(dcnd, 1) / (dc_counts + _EPS)) / (jnp.sum(dc_counts > 0) + _EPS) + dc_op)
  gamma = jnp.mean(sc_counts / k) if k + 2 < n_t else 1.0
  return ((sc_lambda + dc_lambda) / 2 + gamma) / 2


def icnn_loss(origin, origin_labels, target=None, target_labels=None, *, k: int = 4,
              ipc: Optional[int] = None, drop_nearest: Optional[bool] = None):
  """ICNN loss -log(icnn_score(...)).

  Official variants: `suppicnn` = icnn_loss(support, support_labels); `queryicnn` =
  icnn_loss(queries, query_labels, prototypes or support, their labels, drop_nearest=True for
  the official behaviour); `fullicnn` = icnn_loss(concat(support, queries), labels,
  ipc=shot + query). The official total divides the sum of the selected terms by their number.
  """
  return -jnp.log(icnn_score(origin, origin_labels, target, target_labels, k=k, ipc=ipc,
                             drop_nearest=drop_nearest))
