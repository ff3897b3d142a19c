"""Tests for lostjax.metrics.robustness against float64 python-loop oracles written from the documented
formulas, plus edge cases (one query, ties, all equal, bf16) and jit."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax.metrics import robustness as rb


def loop_variance(x, ddof):
  mean = sum(x) / len(x)
  return sum((v - mean) ** 2 for v in x) / (len(x) - ddof)


def loop_worst(x, fraction):
  n = max(1, math.ceil(round(fraction * len(x), 9)))
  return sum(sorted(x)[:n]) / n


@pytest.mark.parametrize("seed, n", [(0, 1), (1, 7), (2, 50)])
def test_variance_and_worst_k_against_loops(seed, n):
  x = np.random.default_rng(seed).uniform(size=n)
  with jax.enable_x64(True):
    np.testing.assert_allclose(rb.per_query_variance(x), loop_variance(list(x), 0), rtol=1e-12, atol=1e-15)
    if n > 1:
      np.testing.assert_allclose(rb.per_query_variance(x, ddof=1), loop_variance(list(x), 1), rtol=1e-12)
    for frac in (0.1, 0.2, 0.5, 1.0):
      np.testing.assert_allclose(rb.worst_k_mean(x, frac), loop_worst(list(x), frac), rtol=1e-12)
  np.testing.assert_allclose(rb.per_query_variance(x.astype(np.float32)), np.var(x), rtol=1e-5, atol=1e-7)


def test_worst_k_count_rounding_and_ties():
  x = np.array([0.5, 0.1, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])
  np.testing.assert_allclose(rb.worst_k_mean(x, 0.1), 0.1)             # 1 of 10
  np.testing.assert_allclose(rb.worst_k_mean(x, 0.25), (0.1 + 0.1 + 0.2) / 3, rtol=1e-6)   # ceil(2.5) = 3
  np.testing.assert_allclose(rb.worst_k_mean(np.full(4, 0.3), 0.5), 0.3, rtol=1e-6)
  np.testing.assert_allclose(rb.per_query_variance(np.full(4, 0.3)), 0.0, atol=1e-9)
  got = rb.worst_k_mean(jnp.asarray(x, jnp.bfloat16), 0.2)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, 0.1, rtol=1e-2)


def test_worst_k_count_is_exact_for_decimal_fractions():
  """0.07·100 is 7.000000000000001 in floating point: the count is still 7 (not ceil -> 8)."""
  x = np.arange(100.0)
  np.testing.assert_allclose(rb.worst_k_mean(x, 0.07), np.mean(np.arange(7)), rtol=1e-6)
  np.testing.assert_allclose(rb.worst_k_mean(x, 0.29), np.mean(np.arange(29)), rtol=1e-6)  # 28.999999999999996


def test_ood_drop_rate():
  np.testing.assert_allclose(rb.ood_drop_rate(0.3, 0.4), -0.25, rtol=1e-6)
  np.testing.assert_allclose(rb.ood_drop_rate(np.array([0.5, 0.2]), np.array([0.4, 0.2])), [0.25, 0.0], rtol=1e-6)
  with pytest.raises(ValueError, match="metric_iid must be non-zero"):
    rb.ood_drop_rate(0.1, 0.0)
  with pytest.raises(ValueError, match="same shape"):
    rb.ood_drop_rate(np.zeros(2), np.ones(3))


def loop_attack(before, after, k):
  n = len(before)
  sr = sum(a < b for b, a in zip(before, after)) / n
  boost = sum(b - a for b, a in zip(before, after)) / n
  tk = sum(b > k and a <= k for b, a in zip(before, after)) / n
  return sr, boost, tk


@pytest.mark.parametrize("seed", [0, 1])
def test_attack_metrics_against_loop(seed):
  rng = np.random.default_rng(seed)
  before = rng.integers(1, 200, 40)
  after = np.maximum(1, before - rng.integers(-30, 120, 40))
  after[:3] = before[:3]                               # unchanged ranks are not successes
  for k in (10, 100):
    sr, boost, tk = loop_attack(before.tolist(), after.tolist(), k)
    np.testing.assert_allclose(rb.attack_success_rate(before, after), sr, rtol=1e-6)
    np.testing.assert_allclose(rb.rank_boost(before, after), boost, rtol=1e-6)
    np.testing.assert_allclose(rb.topk_boost_rate(before, after, k), tk, rtol=1e-6)
  changed = rng.integers(0, 10, 40)
  length = changed + rng.integers(1, 100, 40)
  np.testing.assert_allclose(rb.perturbation_percentage(changed, length), np.mean(changed / length), rtol=1e-6)


def test_attack_edge_cases():
  # a target already in the top 10 never counts as boosted into it; demotion gives a negative boost
  np.testing.assert_allclose(rb.topk_boost_rate(np.array([5, 50]), np.array([1, 8])), 0.5)
  np.testing.assert_allclose(rb.rank_boost(np.array([3]), np.array([7])), -4.0)
  np.testing.assert_allclose(rb.attack_success_rate(np.array([3]), np.array([3])), 0.0)


def test_jit():
  x = np.random.default_rng(3).uniform(size=20).astype(np.float32)
  np.testing.assert_allclose(jax.jit(rb.per_query_variance)(x), rb.per_query_variance(x), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda v: rb.worst_k_mean(v, 0.3))(x), rb.worst_k_mean(x, 0.3), rtol=1e-6)
  b, a = np.array([20, 30]), np.array([5, 40])
  np.testing.assert_allclose(jax.jit(rb.topk_boost_rate)(b, a), 0.5)
  # gradient of the variance (a smooth function of the per-query values)
  g = jax.grad(rb.per_query_variance)(x)
  np.testing.assert_allclose(g, 2 * (x - x.mean()) / x.size, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: rb.per_query_variance(np.zeros((2, 2))), "1-D"),
    (lambda: rb.per_query_variance(np.array([])), "non-empty"),
    (lambda: rb.per_query_variance(np.array([1.0, np.nan])), "NaN"),
    (lambda: rb.per_query_variance(np.ones(3), ddof=3), "ddof"),
    (lambda: rb.worst_k_mean(np.ones(3), 0.0), "fraction"),
    (lambda: rb.attack_success_rate(np.array([0, 2]), np.array([1, 1])), "1-based"),
    (lambda: rb.attack_success_rate(np.array([1.5]), np.array([1.0])), "integer"),
    (lambda: rb.rank_boost(np.array([1, 2]), np.array([1])), "equal length"),
    (lambda: rb.topk_boost_rate(np.array([1]), np.array([1]), 0), "k must be"),
    (lambda: rb.perturbation_percentage(np.array([5]), np.array([3])), "num_changed"),
    (lambda: rb.perturbation_percentage(np.array([0]), np.array([0])), "doc_length"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()
