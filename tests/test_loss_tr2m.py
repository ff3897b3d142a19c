"""TR2M scale-oriented contrast vs float64 numpy loops (coarse ranking window, fine depth classes)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest

import losses as L
from losses import tr2m as T

coarse = jax.jit(T.tr2m_coarse_loss, static_argnames=("window",))
fine = jax.jit(T.tr2m_fine_loss, static_argnames=("detach_keys",))

RNG = np.random.default_rng(0)
B, D, N = 6, 4, 10
EMB, SCALES = RNG.normal(size=(B, D)), RNG.uniform(0.1, 3.0, B)
Q, K, LAB = RNG.normal(size=(N, D)), RNG.normal(size=(N, D)), RNG.integers(0, 3, N)


def _cos(u, v):
  return u @ v / (np.linalg.norm(u) * np.linalg.norm(v))


def np_coarse(e, s, window=2, tau=0.1, valid=None):
  idx = [i for i in range(len(e)) if valid is None or valid[i]]
  order = sorted(idx, key=lambda i: (s[i], i))
  rank = {i: r for r, i in enumerate(order)}
  out = []
  for i in idx:
    others = [j for j in idx if j != i]
    pos = [j for j in others if abs(rank[i] - rank[j]) < window]
    if not pos:
      continue
    den = np.log(sum(np.exp(_cos(e[i], e[a]) / tau) for a in others))
    out.append(-np.mean([_cos(e[i], e[p]) / tau - den for p in pos]))
  return np.mean(out) if out else 0.


def np_fine(q, k, y, tau=0.1, valid=None):
  idx = [i for i in range(len(q)) if valid is None or valid[i]]
  out = []
  for i in idx:
    pos = [p for p in idx if y[p] == y[i]]
    den = np.log(sum(np.exp(_cos(q[i], k[a]) / tau) for a in idx))
    out.append(-np.mean([_cos(q[i], k[p]) / tau - den for p in pos]))
  return np.mean(out) if out else 0.


@pytest.mark.parametrize("window", [1, 2, 3, 10])
def test_coarse_vs_numpy(window):
  with jax.enable_x64(True):
    got = coarse(jnp.asarray(EMB), jnp.asarray(SCALES), window=window)
    np.testing.assert_allclose(float(got), np_coarse(EMB, SCALES, window), rtol=1e-10, atol=1e-12)


def test_fine_vs_numpy_defaults_and_grads():
  with jax.enable_x64(True):
    q, k, y = jnp.asarray(Q), jnp.asarray(K), jnp.asarray(LAB)
    np.testing.assert_allclose(float(fine(q, k, y)), np_fine(Q, K, LAB), rtol=1e-10)
    np.testing.assert_allclose(float(fine(q, k, y, tau=0.5)), np_fine(Q, K, LAB, 0.5), rtol=1e-10)
    # documented defaults: tau = 0.1 (both levels), window t = 2
    np.testing.assert_allclose(float(fine(q, k, y)), float(fine(q, k, y, tau=0.1)), rtol=1e-12)
    e, s = jnp.asarray(EMB), jnp.asarray(SCALES)
    np.testing.assert_allclose(float(coarse(e, s)), np_coarse(EMB, SCALES, 2, 0.1), rtol=1e-10)
    np.testing.assert_allclose(float(L.tr2m_soc_loss(e, s, q, k, y)),
                               np_coarse(EMB, SCALES) + np_fine(Q, K, LAB), rtol=1e-10)
    jtu.check_grads(jax.jit(lambda e: T.tr2m_coarse_loss(e, s)), (e,), order=1, modes=("rev",), atol=1e-6,
                    rtol=1e-6)
    jtu.check_grads(jax.jit(lambda q, k: T.tr2m_fine_loss(q, k, y, detach_keys=False)), (q, k), order=1,
                    modes=("rev",), atol=1e-6, rtol=1e-6)
    # keys are a momentum branch: no gradient by default; scales are only ranked
    gk = jax.grad(lambda k: T.tr2m_fine_loss(q, k, y))(k)
    gs = jax.grad(lambda s: T.tr2m_coarse_loss(e, s))(s)
    assert np.all(np.asarray(gk) == 0) and np.all(np.asarray(gs) == 0)


def test_pseudo_scale_depth_classes_ema():
  rel = RNG.uniform(0.1, 1.0, (3, 4, 5))
  tgt = 2.5 * rel + 0.3 + 0.01 * RNG.normal(size=rel.shape)
  mask = RNG.uniform(size=rel.shape) > 0.3
  with jax.enable_x64(True):
    got = L.tr2m_pseudo_scale(jnp.asarray(rel), jnp.asarray(tgt), where=jnp.asarray(mask))
    for b in range(3):
      ref = np.polyfit(rel[b][mask[b]], tgt[b][mask[b]], 1)[0]
      np.testing.assert_allclose(float(got[b]), ref, rtol=1e-8)
  assert float(L.tr2m_pseudo_scale(jnp.ones((1, 4)), jnp.arange(4.)[None])[0]) == 0.0   # constant input
  d = np.array([0.5, 1.0, 2.0, 5.0, 7.3, 10.0, 12.0, -1.0])
  got = np.asarray(L.tr2m_depth_classes(jnp.asarray(d), 1.0, 10.0, num_classes=4))
  ref = [min(max(round((10.0 - x) / 9.0 * 4), 0), 4) for x in d]
  np.testing.assert_array_equal(got, ref)
  assert L.tr2m_depth_classes(jnp.asarray(d), 1.0, 10.0).max() <= 10        # default |C| = 10
  kp = {"w": jnp.ones(3)}
  np.testing.assert_allclose(L.tr2m_ema(kp, {"w": jnp.zeros(3)})["w"], 0.99 * np.ones(3), rtol=1e-6)


def test_edge_cases_masks_vmap_bf16():
  e, s = jnp.asarray(EMB, jnp.float32), jnp.asarray(SCALES, jnp.float32)
  q, k, y = jnp.asarray(Q, jnp.float32), jnp.asarray(K, jnp.float32), jnp.asarray(LAB)
  np.testing.assert_allclose(coarse(e, s), T.tr2m_coarse_loss(e, s), rtol=1e-6)     # jit == eager
  # window 1: no positives -> 0 with zero (finite) gradient; one sample -> 0
  assert float(coarse(e, s, window=1)) == 0.0
  assert np.all(np.asarray(jax.jit(jax.grad(lambda x: T.tr2m_coarse_loss(x, s, window=1)))(e)) == 0)
  assert float(coarse(e[:1], s[:1])) == 0.0
  # one class: every key is a positive
  one = jnp.zeros(N, jnp.int32)
  with jax.enable_x64(True):
    np.testing.assert_allclose(float(fine(jnp.asarray(Q), jnp.asarray(K), one)), np_fine(Q, K, np.zeros(N, int)),
                               rtol=1e-10)
    valid = np.arange(B) != 2
    np.testing.assert_allclose(float(coarse(jnp.asarray(EMB), jnp.asarray(SCALES), where=jnp.asarray(valid))),
                               np_coarse(EMB, SCALES, valid=valid), rtol=1e-10)
    pv = np.arange(N) < 7
    np.testing.assert_allclose(float(fine(jnp.asarray(Q), jnp.asarray(K), jnp.asarray(LAB), where=jnp.asarray(pv))),
                               np_fine(Q, K, LAB, valid=pv), rtol=1e-10)
  # ties in the scales are broken by index
  with jax.enable_x64(True):
    tied = np.array([1., 1., 1., 2., 2., 0.5])
    np.testing.assert_allclose(float(coarse(jnp.asarray(EMB), jnp.asarray(tied))), np_coarse(EMB, tied), rtol=1e-10)
  # per-image pixel contrast with vmap
  qs, ks, ys = jnp.stack([q, 2 * q]), jnp.stack([k, k + 1]), jnp.stack([y, one])
  vm = jax.vmap(T.tr2m_fine_loss)(qs, ks, ys)
  for i in range(2):
    np.testing.assert_allclose(vm[i], fine(qs[i], ks[i], ys[i]), rtol=1e-5)
  for scale in (1e-30, 1e20):
    assert np.isfinite(float(coarse(scale * e, s))) and np.isfinite(float(fine(scale * q, scale * k, y)))
    assert np.all(np.isfinite(jax.jit(jax.grad(lambda x: T.tr2m_coarse_loss(x, s)))(scale * e)))
  zero = jnp.zeros_like(q)
  assert np.all(np.isfinite(jax.jit(jax.grad(lambda x: T.tr2m_fine_loss(x, zero, y)))(zero)))
  bf = fine(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), y)
  assert bf.dtype == jnp.float32
  np.testing.assert_allclose(float(bf), float(fine(q, k, y)), rtol=5e-2)
  np.testing.assert_allclose(float(coarse(e.astype(jnp.bfloat16), s.astype(jnp.bfloat16))), float(coarse(e, s)),
                             rtol=5e-2)


def test_bad_inputs():
  e, s = jnp.asarray(EMB, jnp.float32), jnp.asarray(SCALES, jnp.float32)
  q, k, y = jnp.asarray(Q, jnp.float32), jnp.asarray(K, jnp.float32), jnp.asarray(LAB)
  with pytest.raises(ValueError, match="window"):
    T.tr2m_coarse_loss(e, s, window=0)
  with pytest.raises(ValueError, match="scales"):
    T.tr2m_coarse_loss(e, s[:3])
  with pytest.raises(ValueError, match="tau"):
    T.tr2m_coarse_loss(e, s, tau=-1.)
  with pytest.raises(ValueError, match="keys"):
    T.tr2m_fine_loss(q, k[:, :2], y)
  with pytest.raises(ValueError, match="labels"):
    T.tr2m_fine_loss(q, k, y.astype(jnp.float32))
  with pytest.raises(ValueError, match="d_max"):
    L.tr2m_depth_classes(jnp.ones(3), 2.0, 1.0)
  with pytest.raises(ValueError, match="num_classes"):
    L.tr2m_depth_classes(jnp.ones(3), 1.0, 2.0, num_classes=0)
  with pytest.raises(ValueError, match="target"):
    L.tr2m_pseudo_scale(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="momentum"):
    L.tr2m_ema({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, momentum=1.5)
