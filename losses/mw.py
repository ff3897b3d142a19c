"""MW (Mann-Whitney) loss and the AUC metric.

Paper: "Optimizing What Matters: AUC-Driven Learning for Robust Neural Retrieval",
arXiv:2510.00137 (ServiceNow, 2025). No official code is known; the formula is reconstructed from
the paper's abstract and Fig. 2 (global pooling; notes in docs/losses.md):

  P = {(i, j): Y_ij = 1}, N = {(k, l): Y_kl = 0}       (valid entries of the Q x M score matrix)
  L_MW = 1/(|P||N|) sum_{P x N} -log sigmoid((S_ij - S_kl) / T)        ("global", the paper's point)
  AUC  = 1/(|P||N|) sum_{P x N} (1[s+ > s-] + 1/2 1[s+ = s-])

`scope="per_query"` restricts pairs to the same row (k = i): RankNet within each query, pooled over
all pairs of the batch (== `rax.pairwise_logistic_loss(S, Y)`); per-query AUC is the mean over
queries with at least one pair. Assumptions: no margin; `temperature` (score scale) default 1 (the
paper's value is not confirmed). Empty P or N gives 0 for both the loss and the AUC (library-wide
empty-set convention; the AUC of an empty pair set is undefined).

Memory: pairs are formed against all Q*M entries for each candidate positive; pass
`max_positives` (static, e.g. 1 per query for a dual-encoder batch) so that only that many
positives per row (global: in total) are gathered, and the work is chunked with `lax.map`.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U


def _inputs(scores, labels, where, temperature):
  U.check_positive("temperature", temperature)
  s = U.check_float_array("scores", scores)
  if s.ndim not in (1, 2):
    raise ValueError(f"scores must be [M] or [Q, M], got shape {s.shape}")
  U.check_shape("labels", labels, s.shape)
  w = U.mask_or_ones("where", where, s.shape)
  y = (jnp.asarray(labels) > 0) & w
  n = (~(jnp.asarray(labels) > 0)) & w
  return s.astype(U.compute_dtype(s)) / temperature, y, n


def _pairwise(s, pos, neg, pair_fn, max_positives):
  """Sums pair_fn(s_pos - s_neg) over pos x neg for 1-D s; returns (sum, count)."""
  m = s.shape[0]
  k = m if max_positives is None else min(int(max_positives), m)
  if k < m:
    idx = jax.lax.top_k(pos.astype(jnp.int32), k)[1]
    sp, vp = s[idx], pos[idx]
  else:
    sp, vp = s, pos
  def row(args):
    p, ok = args
    return jnp.where(ok, jnp.sum(jnp.where(neg, pair_fn(p - s), 0.)), 0.)
  if k * m <= 1 << 22:
    sums = jax.vmap(row)((sp, vp))
  else:
    sums = jax.lax.map(row, (sp, vp), batch_size=max(1, (1 << 22) // m))
  return jnp.sum(sums), jnp.sum(vp).astype(s.dtype) * jnp.sum(neg).astype(s.dtype)


def _reduce(s, y, n, pair_fn, scope, max_positives, per_query_mean):
  if scope == "global" or s.ndim == 1:
    total, count = _pairwise(s.reshape(-1), y.reshape(-1), n.reshape(-1), pair_fn, max_positives)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.)
  totals, counts = jax.vmap(lambda a, b, c: _pairwise(a, b, c, pair_fn, max_positives))(s, y, n)
  if per_query_mean:
    return U.safe_mean(totals / jnp.maximum(counts, 1), counts > 0)
  count = jnp.sum(counts)
  return jnp.where(count > 0, jnp.sum(totals) / jnp.maximum(count, 1), 0.)


def mw_loss(scores, labels, where: Optional[jax.Array] = None, *, scope: str = "global",
            temperature: float = 1.0, max_positives: Optional[int] = None):
  """MW loss: mean over positive x negative pairs of softplus(-(s+ - s-) / T).

  Args:
    scores: [Q, M] (or [M]) similarity scores.
    labels: same shape, > 0 for positive (relevant) pairs.
    where: optional validity mask of the same shape.
    scope: "global" (pairs across queries, paper) or "per_query" (pairs within a row, pooled mean).
    temperature: scores are divided by it.
    max_positives: optional static bound on positives per row (per_query) or in total (global).
  """
  U.check_choice("scope", scope, ("global", "per_query"))
  s, y, n = _inputs(scores, labels, where, temperature)
  return _reduce(s, y, n, lambda d: jax.nn.softplus(-d), scope, max_positives, False)


def auc(scores, labels, where: Optional[jax.Array] = None, *, scope: str = "global",
        max_positives: Optional[int] = None):
  """ROC-AUC = normalised Mann-Whitney U (ties count 1/2); per_query = mean of per-row AUCs."""
  U.check_choice("scope", scope, ("global", "per_query"))
  s, y, n = _inputs(scores, labels, where, 1.0)
  step = lambda d: (d > 0).astype(d.dtype) + 0.5 * (d == 0).astype(d.dtype)
  return jax.lax.stop_gradient(_reduce(s, y, n, step, scope, max_positives, True))
