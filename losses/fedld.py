"""FedLD: margin-control regularisation and principal-gradient aggregation.

Paper: Zeng, Guo, Wang, Wang, Zhou, Qu, "Tackling Data Heterogeneity in Federated Learning via Loss
Decomposition", MICCAI 2024, arXiv:2408.12300; official code Zeng-Shuang/FedLD (`methods/fedld.py`,
`svd_tools.py`). Formulas follow the official code (notes in docs/losses.md).

Client loss (margin control):
  L = CE(z, y) + lambda log(1 + ||softmax(z)||_F^2),  lambda = 0.03
  reduction="batch_frobenius" (code): Frobenius norm of the whole [B, C] probability matrix;
  reduction="per_sample": mean_b log(1 + ||p_b||^2).

Server aggregation (official `pcgrad_svd`), per parameter tensor with client updates G [m, d]:
  H = G G^T / m;  H = E diag(s) E^T (s descending);  V = E^T G (principal directions)
  k = int(m k_proportion) (0.8);  r_ij = (g_i . V_j / V_j . V_j) V_j
  g_hat_i = sum_{j<k} r_ij (s_j / sum(s)) |g_i| / |r_ij|;   g = mean_i g_hat_i
Scalar tensors (d = 1) and tensors without history (first round) use the plain mean.
Deviations: the two 0/0 traps of the code (|r_ij| = 0 when g_i is orthogonal to V_j, V_j = 0 when G is
rank deficient) contribute 0 instead of NaN; eigh of the symmetric H replaces svd (same subspace;
the result is invariant to the eigenvector signs, so the code's majority-sign flip is a no-op and
is omitted). Aggregation returns the update g; the caller adds it to the global weights and updates
its history (0.99 h + 0.01 g is returned as well).
"""
from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U


def fedld_margin_loss(logits, labels, *, penalty: float = 0.03, reduction: str = "batch_frobenius",
                      where: Optional[jax.Array] = None):
  """CE + penalty * log(1 + ||softmax(logits)||^2) (see module docstring for the two reductions)."""
  U.check_choice("reduction", reduction, ("batch_frobenius", "per_sample"))
  U.check_positive("penalty", penalty, allow_zero=True)
  z = U.check_float_array("logits", logits)
  U.check_ndim("logits", z, 2)
  y = U.check_int_array("labels", labels)
  U.check_shape("labels", y, z.shape[:1])
  w = U.mask_or_ones("where", where, z.shape[:1])
  z = z.astype(U.compute_dtype(z))
  logp = jax.nn.log_softmax(z, 1)
  ce = U.safe_mean(-jnp.take_along_axis(logp, y[:, None], 1)[:, 0], w)
  sq = jnp.sum(jnp.exp(logp) ** 2, 1)
  if reduction == "batch_frobenius":
    reg = jnp.log1p(jnp.sum(jnp.where(w, sq, 0.)))
  else:
    reg = U.safe_mean(jnp.log1p(sq), w)
  return ce + penalty * reg


def _principal(g, k_proportion):
  m = g.shape[0]
  flat = g.reshape(m, -1)
  if flat.shape[1] == 1:
    return jnp.mean(g, 0)
  k = int(m * k_proportion)
  h = flat @ flat.T / m
  s, e = jnp.linalg.eigh(h)
  s, e = s[::-1], e[:, ::-1]
  s = jnp.maximum(s, 0.)
  v = e.T @ flat                                   # [m, d] principal directions (unnormalised)
  vv = jnp.sum(v * v, 1)                           # [m]
  gv = flat @ v.T                                  # [m clients, m directions]
  gnorm = U.safe_sqrt(jnp.sum(flat * flat, 1))     # [m]
  ssum = jnp.sum(s)
  wts = jnp.where(ssum > 0, s / jnp.where(ssum > 0, ssum, 1.), 0.)
  # r_ij |g_i| / |r_ij| = sign(g_i . v_j) |g_i| v_j / |v_j|
  vnorm = U.safe_sqrt(vv)
  coef = jnp.where((vv > 0)[None, :] & (gv != 0), jnp.sign(gv) / jnp.where(vnorm > 0, vnorm, 1.)[None, :], 0.)
  coef = coef * gnorm[:, None] * wts[None, :]
  coef = coef * (jnp.arange(m) < k)[None, :]
  ghat = coef @ v                                  # [m, d]
  return jnp.mean(ghat, 0).reshape(g.shape[1:])


def principal_gradient_aggregate(client_updates, history=None, *, k_proportion: float = 0.8):
  """Principal-gradient server aggregation of client updates.

  Args:
    client_updates: pytree whose leaves have a leading client axis m (g_i = w_i^local - w^global).
    history: optional pytree (leaves without the client axis) of the server history; None = first
      round (plain mean for every tensor). Leaves whose history is all zero also use the mean.
    k_proportion: fraction of principal directions kept (k = int(m * k_proportion)).
  Returns:
    (update, new_history): the aggregated update pytree and 0.99 * history + 0.01 * update.
  """
  if not 0 < k_proportion <= 1:
    raise ValueError(f"k_proportion must be in (0, 1], got {k_proportion}")
  leaves, treedef = jax.tree_util.tree_flatten(client_updates)
  if not leaves:
    raise ValueError("client_updates is empty")
  m = jnp.shape(leaves[0])[0] if jnp.ndim(leaves[0]) else None
  for x in leaves:
    if jnp.ndim(x) < 1 or jnp.shape(x)[0] != m:
      raise ValueError(f"every leaf of client_updates needs the same leading client axis {m}, got {jnp.shape(x)}")
  hist = [None] * len(leaves) if history is None else treedef.flatten_up_to(history)
  out, new_hist = [], []
  for g, h in zip(leaves, hist):
    g = U.check_float_array("client_updates leaf", g)
    g = g.astype(U.compute_dtype(g))
    mean = jnp.mean(g, 0)
    if h is None:
      agg = mean
      h = jnp.zeros_like(mean)
    else:
      U.check_shape("history leaf", h, g.shape[1:])
      agg = jnp.where(jnp.any(jnp.asarray(h) != 0), _principal(g, k_proportion), mean)
    out.append(agg)
    new_hist.append(0.99 * jnp.asarray(h, agg.dtype) + 0.01 * agg)
  return treedef.unflatten(out), treedef.unflatten(new_hist)
