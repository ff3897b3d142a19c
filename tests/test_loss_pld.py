"""pld_loss vs a numpy loop, rax.listmle_loss (unit weights), CE reduction, invariances."""
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest
import rax

from losses import pld_loss

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

pld_loss = _jitted('pld_loss', 'weighting')


RNG = np.random.default_rng(0)
S, T, Y = RNG.normal(size=(6, 5)), RNG.normal(size=(6, 5)), RNG.integers(0, 5, 6)


def np_pld(s, t, y, T=1.0, unit=False):
  out = []
  for b in range(len(s)):
    others = sorted([c for c in range(s.shape[1]) if c != y[b]], key=lambda c: -t[b, c])
    perm = [y[b]] + others
    z = t[b] / T - np.max(t[b] / T)
    pt = np.exp(z) / np.exp(z).sum()
    tot = 0.
    for k in range(len(perm)):
      a = 1. if unit else pt[perm[k]]
      m = max(s[b, perm[l]] for l in range(k, len(perm)))
      tot += a * (m + np.log(sum(np.exp(s[b, perm[l]] - m) for l in range(k, len(perm)))) - s[b, perm[k]])
    out.append(tot)
  return np.mean(out)


@pytest.mark.parametrize("temp", [2.5, pytest.param(1.0, marks=pytest.mark.slow)])
def test_numpy_loop(temp):
  with jax.enable_x64(True):
    got = pld_loss(jnp.asarray(S), jnp.asarray(T), jnp.asarray(Y), temperature=temp)
  np.testing.assert_allclose(float(got), np_pld(S, T, Y, temp), rtol=1e-10)
  got32 = pld_loss(jnp.asarray(S, jnp.float32), jnp.asarray(T, jnp.float32), jnp.asarray(Y), temperature=temp)
  np.testing.assert_allclose(float(got32), np_pld(S, T, Y, temp), rtol=1e-5)


def test_unit_weights_equal_rax_listmle():
  C = S.shape[1]
  rel = np.zeros_like(S)
  for b in range(len(S)):
    perm = [Y[b]] + sorted([c for c in range(C) if c != Y[b]], key=lambda c: -T[b, c])
    for k, c in enumerate(perm):
      rel[b, c] = C - k
  with jax.enable_x64(True):
    got = pld_loss(jnp.asarray(S), jnp.asarray(T), jnp.asarray(Y), weighting="unit")
    ref = rax.listmle_loss(jnp.asarray(S), jnp.asarray(rel))
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-10)
  np.testing.assert_allclose(float(got), np_pld(S, T, Y, unit=True), rtol=1e-10)


def test_properties_ce_translation_ties_teacher_detached():
  with jax.enable_x64(True):
    s, t, y = jnp.asarray(S), jnp.asarray(T), jnp.asarray(Y)
    # translation invariance in the student logits
    np.testing.assert_allclose(pld_loss(s + 7.3, t, y), pld_loss(s, t, y), rtol=1e-12)
    # C = 2: a_1 * CE(s, y)
    s2, t2 = s[:, :2], t[:, :2]
    y2 = jnp.asarray(Y % 2)
    a1 = jax.nn.softmax(t2, 1)[jnp.arange(6), y2]
    ce = -jax.nn.log_softmax(s2, 1)[jnp.arange(6), y2]
    np.testing.assert_allclose(pld_loss(s2, t2, y2), jnp.mean(a1 * ce), rtol=1e-12)
    # teacher is detached; check_grads on the student
    assert np.all(jax.grad(pld_loss, argnums=1)(s, t, y) == 0)
    jtu.check_grads(lambda v: pld_loss(v, t, y), (s,), order=1, modes=["rev"])
    # ties in the teacher: stable order by class index
    tt = jnp.zeros((1, 4))
    np.testing.assert_allclose(pld_loss(s[:1, :4], tt, jnp.array([2])),
                               np_pld(S[:1, :4], np.zeros((1, 4)), [2]), rtol=1e-12)


def test_edge_cases_mask_bf16_jit():
  s, t, y = jnp.asarray(S, jnp.float32), jnp.asarray(T, jnp.float32), jnp.asarray(Y)
  f = lambda a: pld_loss(a, t, y)
  np.testing.assert_allclose(jax.jit(f)(s), f(s), rtol=1e-6)
  for x in (1e3 * s, jnp.zeros_like(s), s.astype(jnp.bfloat16)):
    assert np.isfinite(float(f(x)))
    assert np.all(np.isfinite(jax.grad(f)(x).astype(jnp.float32)))
  np.testing.assert_allclose(float(pld_loss(1e3 * s, 1e3 * t, y)), np_pld(1e3 * S.astype(np.float32), 1e3 * T, Y), rtol=1e-4)
  w = jnp.arange(6) < 4
  np.testing.assert_allclose(pld_loss(s, t, y, where=w), pld_loss(s[:4], t[:4], y[:4]), rtol=1e-6)
  assert float(pld_loss(s, t, y, where=jnp.zeros(6, bool))) == 0.0
  assert float(pld_loss(s[:, :1], t[:, :1], jnp.zeros(6, int))) == 0.0   # one class
  v = jax.vmap(lambda a: pld_loss(a[None], t[:1], y[:1]))(s)
  assert v.shape == (6,)


def test_bad_inputs():
  with pytest.raises(ValueError, match="teacher_logits"):
    pld_loss(jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.zeros(2, int))
  with pytest.raises(ValueError, match="weighting"):
    pld_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.zeros(2, int), weighting="x")


def test_jit_matches_eager():
  s, t, y = jnp.asarray(S, jnp.float32), jnp.asarray(T, jnp.float32), jnp.asarray(Y)
  np.testing.assert_allclose(pld_loss(s, t, y), _L.pld_loss(s, t, y), rtol=1e-6)
