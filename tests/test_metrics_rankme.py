"""Tests for lostjax.metrics.rankme: float64 reference values of Eq. (1) (arXiv:2210.02885) and a numpy oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax.metrics import rankme
from lostjax.metrics.rankme import rankme_from_singular_values


def numpy_rankme(z, eps):
  """Independent oracle: Eq. (1) of arXiv:2210.02885 written as a python loop over singular values (float64)."""
  s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
  total = sum(s)
  h = 0.0
  for sk in s:
    p = (sk / total if total > 0 else 0.0) + eps
    h -= p * np.log(p)
  return float(np.exp(h))


@pytest.mark.parametrize("z, eps, expected", [
    ([[1, 1], [1, -1], [-1, 1], [-1, -1]], 1e-7, 1.999999877258836),
    ([[1, 1], [1, -1], [-1, 1], [-1, -1]], 1e-12, 1.9999999999987725),
    (np.ones((4, 2)), 1e-7, 1.0000015118107028),
    (np.ones((4, 2)), 1e-12, 1.000000000026631),
    (np.diag([3.0, 2.0, 1.0]), 1e-7, 2.749459434433214),
    (np.eye(5), 1e-7, 5.000001523594388),
])
def test_spec_reference_values_float64(z, eps, expected):
  with jax.enable_x64(True):
    got = rankme(jnp.asarray(z, jnp.float64), eps=eps)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), expected, rtol=1e-12)


def test_tfgnn_unit_test_values_float32():
  # tensorflow_gnn metrics_test.py expectations (eps=1e-12): +-1 matrix -> 2, ones -> 1, zeros -> 1.
  np.testing.assert_allclose(rankme(jnp.array([[1., 1], [1, -1], [-1, 1], [-1, -1]]), eps=1e-12), 2.0, rtol=1e-6)
  np.testing.assert_allclose(rankme(jnp.ones((4, 2)), eps=1e-12), 1.0, rtol=1e-5)
  np.testing.assert_allclose(rankme(jnp.zeros((2, 2)), eps=1e-12), 1.0, rtol=1e-6)


def test_all_zero_matrix_is_one_with_zero_gradient():
  z = jnp.zeros((6, 3))
  val = rankme(z)
  assert np.isfinite(val)
  np.testing.assert_allclose(val, 1.0, atol=1e-5)  # exp(3 * 1e-7 * 16.1) ~ 1 + 5e-6
  g = jax.grad(rankme)(z)
  assert np.all(np.isfinite(g)) and np.all(g == 0)


@pytest.mark.parametrize("shape, scale", [((50, 8), 1.0), ((7, 30), 1.0), ((40, 40), 1e-20), ((40, 10), 1e15)])
def test_matches_numpy_oracle_random(shape, scale):
  rng = np.random.default_rng(0)
  z = rng.normal(size=shape) * rng.uniform(0.01, 3.0, size=shape[1]) * scale
  with jax.enable_x64(True):
    np.testing.assert_allclose(float(rankme(jnp.asarray(z))), numpy_rankme(z, 1e-7), rtol=1e-10)
  # float32 path (values scaled back into a range float32 can hold)
  z32 = (z / scale).astype(np.float32)
  np.testing.assert_allclose(float(rankme(jnp.asarray(z32))), numpy_rankme(z32, 1e-7), rtol=2e-5)


def test_is_scale_invariant_and_uncentred():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(64, 16)).astype(np.float32)
  np.testing.assert_allclose(rankme(z * 1e3), rankme(z), rtol=1e-5)
  # no mean-centring: adding a large common offset collapses the rank towards 1
  assert rankme(z + 100.0) < 1.5 < rankme(z)


def test_large_gaussian_and_low_rank_statistical_values():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(25600, 64)).astype(np.float32)
  assert abs(float(rankme(z)) - 63.98) < 0.05
  strong = rng.normal(size=(1000, 8)) @ rng.normal(size=(8, 64))
  weak = 1e-3 * rng.normal(size=(1000, 64))
  r = float(rankme((strong + weak).astype(np.float32)))
  assert 7.5 < r < 9.5, r  # ~8.44 for 8 strong + 56 weak directions


def test_bf16_and_int_inputs_upcast():
  z = np.random.default_rng(2).normal(size=(32, 8))
  ref = numpy_rankme(np.asarray(jnp.asarray(z, jnp.bfloat16), np.float64), 1e-7)
  got = rankme(jnp.asarray(z, jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-4)
  np.testing.assert_allclose(rankme(np.eye(3, dtype=np.int32)), 3.0, rtol=1e-5)


def test_jit_and_grad_against_finite_differences():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    z = jnp.asarray(rng.normal(size=(10, 4)))
    np.testing.assert_allclose(jax.jit(rankme)(z), rankme(z), rtol=1e-12)
    g = jax.grad(rankme)(z)
    d = jnp.asarray(rng.normal(size=z.shape))
    h = 1e-6
    fd = (rankme(z + h * d) - rankme(z - h * d)) / (2 * h)
    np.testing.assert_allclose(jnp.sum(g * d), fd, rtol=1e-6)


def test_bounds_and_from_singular_values():
  s = jnp.array([4.0, 0.0, 0.0])
  np.testing.assert_allclose(rankme_from_singular_values(s, eps=0.0), 1.0)
  np.testing.assert_allclose(rankme_from_singular_values(jnp.ones(7), eps=0.0), 7.0, rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 3)), "non-empty"),
    (np.zeros((3,)), "2-D"),
    (np.zeros((2, 2, 2)), "2-D"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN"),
    (np.ones((2, 2), np.complex64), "real"),
])
def test_bad_input_raises(bad, match):
  with pytest.raises(ValueError, match=match):
    rankme(bad)


def test_negative_eps_raises():
  with pytest.raises(ValueError, match="eps"):
    rankme(np.eye(2), eps=-1.0)
