"""Robustness metrics for rankers: i.i.d. performance variance, OOD drop rate, adversarial attack metrics.

Paper: C. Wu, R. Zhang, J. Guo, Y. Fan, X. Cheng, "Are Neural Ranking Models Robust?", ACM TOIS,
arXiv:2108.05018. Robustness has three notions split into five tasks: (1) performance variance under i.i.d.
conditions, (2) out-of-distribution generalisability (query variations; unseen query types or corpora) and
(3) defence against adversarial operations (on documents; on queries). The attack metrics follow the same
group's PRADA paper (C. Wu et al., "PRADA: Practical Black-Box Adversarial Attacks against Neural Ranking
Models", arXiv:2204.01321).

Only the abstract of 2108.05018 was available to us, so the exact formulas are the documented defaults below
(each one is pinned by a test; change the keyword to change the convention). Per-query effectiveness values m_q
come from any base metric (e.g. `lostjax.metrics.retrieval.ndcg(..., per_query=True)`).

  variance            Var = (1 / (Q - ddof)) sum_q (m_q - mean m)^2              (ddof = 0 by default)
  worst-k% mean       mean of the ceil(fraction Q) smallest m_q                  (fraction = 0.1, >= 1 query)
  OOD drop rate       DR = (M_OOD - M_IID) / M_IID                               (negative = a drop)
  success rate        SR = share of target docs with rank_after < rank_before    (ranks are 1-based)
  rank boost          Boost = mean_t (rank_before_t - rank_after_t)             (signed, over all targets)
  top-k boost rate    share of targets with rank_before > k and rank_after <= k, over ALL targets (PRADA draws
                      its targets outside the top 10, where this is its T10R; targets already in the top k never
                      count as boosted into it)
  perturbation %      mean_t changed_tokens_t / doc_length_t

Choices: M_IID = 0 is a ValueError (the relative drop is undefined); ties in the worst-k% cut do not matter (the
mean of the smallest values is unique). All functions are jit-safe; bad concrete input raises one ValueError.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lostjax.metrics._checks import check_finite, concrete_or_none


def _values(x, name: str) -> jax.Array:
  shape = np.shape(x)
  if len(shape) != 1 or shape[0] == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array of per-query values, got shape {shape}")
  dtype = jnp.result_type(x)
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(f"{name} must be real, got dtype {dtype}")
  check_finite(x, name)
  x = jnp.asarray(x)
  return x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)


def per_query_variance(values, *, ddof: int = 0) -> jax.Array:
  """Variance of per-query effectiveness m_q across queries (population variance by default)."""
  x = _values(values, "values")
  if not isinstance(ddof, (int, np.integer)) or ddof < 0 or ddof >= x.shape[0]:
    raise ValueError(f"ddof must be an int in [0, {x.shape[0] - 1}] for {x.shape[0]} queries, got {ddof!r}")
  return jnp.sum((x - jnp.mean(x)) ** 2) / (x.shape[0] - ddof)


def worst_k_mean(values, fraction: float = 0.1) -> jax.Array:
  """Mean of the ceil(fraction * Q) lowest per-query values (at least one query)."""
  x = _values(values, "values")
  if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
  n = max(1, math.ceil(fraction * x.shape[0] - 1e-9))
  return jnp.mean(jnp.sort(x)[:n])


def ood_drop_rate(metric_ood, metric_iid) -> jax.Array:
  """Relative change DR = (M_OOD - M_IID) / M_IID of an effectiveness metric; negative values are drops.

  Scalars or matching arrays (e.g. one entry per model)."""
  ood, iid = jnp.asarray(metric_ood), jnp.asarray(metric_iid)
  if ood.shape != iid.shape:
    raise ValueError(f"metric_ood and metric_iid must have the same shape, got {ood.shape} and {iid.shape}")
  check_finite(ood, "metric_ood")
  check_finite(iid, "metric_iid")
  arr = concrete_or_none(iid)
  if arr is not None and np.any(arr == 0):
    raise ValueError(f"metric_iid must be non-zero (relative drop undefined), got {arr.tolist()}")
  dtype = jnp.float64 if jnp.float64 in (ood.dtype, iid.dtype) else jnp.float32
  return (ood.astype(dtype) - iid.astype(dtype)) / iid.astype(dtype)


def _ranks(rank_before, rank_after):
  b, a = jnp.asarray(rank_before), jnp.asarray(rank_after)
  if b.ndim != 1 or b.shape != a.shape or b.shape[0] == 0:
    raise ValueError(f"rank_before and rank_after must be non-empty 1-D arrays of equal length, "
                     f"got shapes {b.shape} and {a.shape}")
  for name, r in (("rank_before", b), ("rank_after", a)):
    if not jnp.issubdtype(r.dtype, jnp.integer):
      raise ValueError(f"{name} must hold integer 1-based ranks, got dtype {r.dtype}")
    arr = concrete_or_none(r)
    if arr is not None and arr.min() < 1:
      raise ValueError(f"{name} must hold 1-based ranks (>= 1), got {int(arr.min())}")
  return b, a


def attack_success_rate(rank_before, rank_after) -> jax.Array:
  """Share of target documents ranked strictly higher (smaller rank) after the attack."""
  b, a = _ranks(rank_before, rank_after)
  return jnp.mean(a < b)


def rank_boost(rank_before, rank_after) -> jax.Array:
  """Average rank improvement rank_before - rank_after over all targets (negative if demoted)."""
  b, a = _ranks(rank_before, rank_after)
  return jnp.mean((b - a).astype(jnp.float32))


def topk_boost_rate(rank_before, rank_after, k: int = 10) -> jax.Array:
  """Share of all targets moved from outside the top k into it (PRADA's T10R for k=10, T100R for k=100)."""
  b, a = _ranks(rank_before, rank_after)
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be an int >= 1, got {k!r}")
  return jnp.mean((b > k) & (a <= k))


def perturbation_percentage(num_changed, doc_length) -> jax.Array:
  """Mean share of a target document's tokens changed by the attack, mean_t changed_t / length_t."""
  c, n = jnp.asarray(num_changed), jnp.asarray(doc_length)
  if c.ndim != 1 or c.shape != n.shape or c.shape[0] == 0:
    raise ValueError(f"num_changed and doc_length must be non-empty 1-D arrays of equal length, "
                     f"got shapes {c.shape} and {n.shape}")
  cn, nn = concrete_or_none(c), concrete_or_none(n)
  if nn is not None and nn.min() < 1:
    raise ValueError(f"doc_length must be >= 1 token, got {nn.min()}")
  if cn is not None and nn is not None and (cn.min() < 0 or np.any(cn > nn)):
    raise ValueError(f"num_changed must lie in [0, doc_length], got {cn.tolist()} for lengths {nn.tolist()}")
  return jnp.mean(c.astype(jnp.float32) / n.astype(jnp.float32))
