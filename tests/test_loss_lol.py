"""lol_regularizer / lol_reformulation_loss vs numpy loops, rax.pairwise_loss with a hinge, optax CE."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import rax

from losses import lol_reformulation_loss, lol_regularizer

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

lol_regularizer = _jitted('lol_regularizer')
lol_reformulation_loss = _jitted('lol_reformulation_loss')


RNG = np.random.default_rng(0)
LQ = RNG.normal(size=(4, 3)) + 3


def np_lol(l, mask=None):
  mask = np.ones(l.shape, bool) if mask is None else mask
  vals = [max(0., l[q, r] - l[q, r2]) for q in range(l.shape[0]) for r in range(l.shape[1])
          for r2 in range(r + 1, l.shape[1]) if mask[q, r] and mask[q, r2]]
  return np.mean(vals) if vals else 0.


def test_regularizer_numpy_and_rax():
  with jax.enable_x64(True):
    got = lol_regularizer(jnp.asarray(LQ))
    np.testing.assert_allclose(float(got), np_lol(LQ), rtol=1e-10)
    effects = -jnp.asarray(LQ)
    labels = jnp.tile(jnp.arange(3, 0, -1.), (4, 1))
    # rax's public hinge has margin 1: relu(1 - K d)/K -> relu(1/K - d), i.e. margin 0 as K grows
    K = 1e9
    ref = rax.pairwise_hinge_loss(K * effects, labels) / K
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-7)
    m = np.ones_like(LQ, bool)
    m[1, 2] = m[3, 0] = False
    np.testing.assert_allclose(float(lol_regularizer(jnp.asarray(LQ), jnp.asarray(m))), np_lol(LQ, m), rtol=1e-10)


def test_reformulation_loss_numpy_and_optax():
  sim = RNG.normal(size=(3, 7))
  pos = np.zeros((3, 7), bool)
  pos[0, [1, 4]] = True
  pos[1, 2] = True
  with jax.enable_x64(True):
    got = lol_reformulation_loss(jnp.asarray(sim), jnp.asarray(pos))
    for r in range(2):
      p = [j for j in range(7) if pos[r, j]]
      t = min(p, key=lambda j: sim[r, j])
      keep = [j for j in range(7) if not pos[r, j] or j == t]
      want = -(sim[r, t] - np.log(np.sum(np.exp(sim[r, keep]))))
      np.testing.assert_allclose(float(got[r]), want, rtol=1e-10)
      masked = jnp.where(jnp.asarray(pos[r]) & (jnp.arange(7) != t), -jnp.inf, jnp.asarray(sim[r]))
      ref = optax.losses.softmax_cross_entropy_with_integer_labels(masked, jnp.asarray(t))
      np.testing.assert_allclose(float(got[r]), float(ref), rtol=1e-10)
    assert float(got[2]) == 0.0   # no positive
    # leading axes [..., P]: a [2, 3, 7] batch gives the rows' own losses
    got3 = lol_reformulation_loss(jnp.asarray(np.stack([sim, sim[::-1]])), jnp.asarray(np.stack([pos, pos[::-1]])))
    np.testing.assert_allclose(got3, np.stack([got, got[::-1]]), rtol=1e-12)
    g = jax.grad(lambda s: lol_reformulation_loss(s, jnp.asarray(pos)).sum())(jnp.asarray(sim))
    assert np.all(np.isfinite(g)) and np.all(g[2] == 0)


def test_edges_grads_jit():
  l = jnp.asarray(LQ, jnp.float32)
  g = jax.grad(lol_regularizer)(l)
  assert np.all(np.isfinite(g))
  # gradients flow through both sides of a violated pair (no detach)
  gg = jax.grad(lol_regularizer)(jnp.array([[2., 1.]]))
  np.testing.assert_allclose(gg, [[1., -1.]])
  assert float(lol_regularizer(jnp.array([[1., 2., 3.]]))) == 0.0   # ordered: no penalty
  assert float(lol_regularizer(l[:, :1])) == 0.0                    # one revision: no pairs
  assert float(lol_regularizer(l, jnp.zeros_like(l, bool))) == 0.0
  assert np.all(jax.grad(lol_regularizer)(l, jnp.zeros_like(l, bool)) == 0)
  for x in (1e3 * l, jnp.ones_like(l), l.astype(jnp.bfloat16)):
    assert np.isfinite(float(lol_regularizer(x))) and np.all(np.isfinite(jax.grad(lol_regularizer)(x).astype(jnp.float32)))
  np.testing.assert_allclose(jax.jit(lol_regularizer)(l), lol_regularizer(l), rtol=1e-6)
  sim = 1e3 * jnp.asarray(RNG.normal(size=(2, 5)), jnp.float32)
  pos = jnp.array([[True, False, False, False, False], [False] * 5])
  assert np.all(np.isfinite(jax.grad(lambda s: lol_reformulation_loss(s, pos).sum())(sim)))
  with pytest.raises(ValueError, match="positive_mask"):
    lol_reformulation_loss(jnp.ones((2, 3)), jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="revision_losses"):
    lol_regularizer(jnp.ones(3))


def test_jit_matches_eager():
  l = jnp.asarray(LQ, jnp.float32)
  np.testing.assert_allclose(lol_regularizer(l), _L.lol_regularizer(l), rtol=1e-6)
  sim, pos = l, l > 3
  np.testing.assert_allclose(lol_reformulation_loss(sim, pos), _L.lol_reformulation_loss(sim, pos), rtol=1e-6)
