"""Normalized LR+GD (arXiv 2412.08424) on the paper's worst-case dataset (Thm 5.1) and against its formula."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim import normalized_gd
from optim.normalized_gd import logistic_margins


def worst_case(n):
  """One sample (0.5, -1) of class +1 and n-1 samples (-0.5, -1) of class -1 (proof of Thm 5.1)."""
  a = np.array([[0.5, -1.0]] + [[-0.5, -1.0]] * (n - 1), np.float32)
  y = np.array([1.0] + [-1.0] * (n - 1), np.float32)
  return jnp.asarray(a), jnp.asarray(y)


def loss(theta, a, y):
  return jnp.mean(jax.nn.softplus(-logistic_margins(theta, a, y)))


def iterations_to_separate(tx, a, y, max_iter=2000, pass_margins=True):
  theta = jnp.zeros(2)
  state = tx.init(theta)

  @jax.jit
  def step(theta, state):
    g = jax.grad(loss)(theta, a, y)
    kw = {"margins": logistic_margins(theta, a, y)} if pass_margins else {}
    u, state = tx.update(g, state, theta, **kw)
    return theta + u, state

  for t in range(1, max_iter + 1):
    theta, state = step(theta, state)
    if bool(jnp.all(logistic_margins(theta, a, y) > 0)):
      return t
  return max_iter + 1


def test_worst_case_dataset_table1():
  a, y = worst_case(1000)
  # Paper Table 1: Normalized LR+GD gamma=100 -> 2, gamma=1 -> 16, gamma=0.1 -> 157; LR+GD gamma=100 -> 308.
  # n = 1000 reproduces every entry of the table exactly.
  for gamma, expected in ((100.0, 2), (10.0, 2), (1.0, 16), (0.1, 157)):
    assert iterations_to_separate(normalized_gd(gamma), a, y) == expected, gamma
  assert iterations_to_separate(optax.sgd(100.0), a, y, pass_margins=False) == 308


def test_one_step_matches_formula():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(50, 3)).astype(np.float32)
  y = np.sign(rng.normal(size=50)).astype(np.float32)
  theta = rng.normal(size=3).astype(np.float32)
  gamma = 3.0
  m = y * (a @ theta)
  g = -(1 / 50) * ((1 / (1 + np.exp(m))) * y) @ a
  beta = 1.0 / np.mean(1 / (1 + np.exp(m)))
  tx = normalized_gd(gamma)
  u, _ = tx.update(jnp.asarray(g), tx.init(theta), margins=jnp.asarray(m))
  np.testing.assert_allclose(u, -gamma * beta * g, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(loss)(jnp.asarray(theta), jnp.asarray(a), jnp.asarray(y)), g, rtol=1e-5)


def test_separated_data_gives_finite_step_and_composes():
  tx = optax.chain(optax.clip_by_global_norm(10.0), normalized_gd(optax.constant_schedule(100.0)))
  theta = jnp.ones(2)
  u, _ = jax.jit(lambda g, s, m: tx.update(g, s, theta, margins=m))(
      jnp.array([1e-30, 0.0]), tx.init(theta), jnp.full((4,), 200.0))
  assert bool(jnp.all(jnp.isfinite(u)))


def test_bad_inputs():
  with pytest.raises(ValueError):
    normalized_gd(0.0)
  tx = normalized_gd(1.0)
  with pytest.raises(ValueError, match="margins"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
  with pytest.raises(ValueError, match="1-D"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), margins=jnp.ones((2, 2)))


def test_schedule_count_single_sample_and_clamp():
  """γ_t follows the schedule's count 0, 1, 2; one sample is a valid batch; β is clamped to 1/finfo.tiny."""
  m1 = np.array([0.7], np.float32)
  beta1 = 1.0 + np.exp(0.7)                       # n = 1: β = 1 / σ(−m) = 1 + e^m
  tx = normalized_gd(lambda count: 1.0 + count)
  state, g = tx.init(jnp.zeros(2)), jnp.array([1.0, -2.0])
  for t in range(3):
    u, state = tx.update(g, state, margins=jnp.asarray(m1))
    np.testing.assert_allclose(u, -(1.0 + t) * beta1 * np.array([1.0, -2.0]), rtol=1e-5)
  with pytest.raises(ValueError, match="non-empty"):
    tx.update(g, state, margins=jnp.zeros((0,)))
  from optim.normalized_gd import normalization
  # σ(−80) ≈ 1.8e-35 is above float32's tiny: exact in log space; σ(−200) underflows: the clamp
  np.testing.assert_allclose(normalization(jnp.array([80.0, 80.0])), 1.0 + np.exp(80.0), rtol=1e-5)
  np.testing.assert_allclose(normalization(jnp.full((4,), 200.0)), 1.0 / np.finfo(np.float32).tiny, rtol=1e-6)
