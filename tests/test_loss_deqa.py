"""DeQA soft labels vs a scipy transcription; soft-KL vs optax; fidelity vs a numpy loop."""
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import optax
import pytest
from scipy.stats import norm

from losses import deqa_score, deqa_soft_labels, deqa_softkl_loss, fidelity_loss

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

deqa_soft_labels = _jitted('deqa_soft_labels', 'mos_min', 'mos_max', 'method', 'thre_std', 'thre_diff')
fidelity_loss = _jitted('fidelity_loss', 'use_fix_std', 'continuous', 'eps')
deqa_score = _jitted('deqa_score')
deqa_softkl_loss = _jitted('deqa_softkl_loss')


RNG = np.random.default_rng(0)
X = np.array([5., 4., 3., 2., 1.])


def np_soft(mos, std, lo, hi, method="pdf", thre_std=0.2, thre_diff=0.1):
  mu = 4 * (mos - lo) / (hi - lo) + 1
  sig = 4 * std / (hi - lo)
  if method == "pdf":
    p = norm.pdf(X, mu, sig)
  else:
    p = norm.cdf(X + 0.5, mu, sig) - norm.cdf(X - 0.5, mu, sig)
  A, B = p.sum(), (X * p).sum()
  a = (mu - 3) / (B - 3 * A + 1e-9)
  b = (1 - a * A) / 5
  pt = np.maximum(a * p + b, 0)
  if sig < thre_std or abs((X * pt).sum() - mu) > thre_diff:
    pt = np.zeros(5)
    k = min(max(int(np.ceil(mu)) - 1, 1), 4)
    pt[X == k] = k + 1 - mu
    pt[X == k + 1] = mu - k
  return pt


@pytest.mark.parametrize("method", ["pdf", "cdf"])
def test_soft_labels_scipy(method):
  mos = np.array([1.0, 2.3, 3.1, 4.7, 5.0, 3.0, 2.0, 4.5])
  std = np.array([0.5, 0.4, 0.9, 0.3, 0.6, 0.05, 1.5, 0.01])
  with jax.enable_x64(True):
    got = np.asarray(deqa_soft_labels(jnp.asarray(mos), jnp.asarray(std), 1., 5., method=method))
  for i in range(len(mos)):
    want = np_soft(mos[i], std[i], 1., 5., method)
    np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got[i].sum(), 1., atol=1e-6)
    np.testing.assert_allclose((X * got[i]).sum(), 4 * (mos[i] - 1) / 4 + 1, atol=0.1 + 1e-9)


def test_softkl_vs_optax():
  logits = RNG.normal(size=(3, 11))
  ids = np.array([7, 2, 9, 0, 4])
  t = np.abs(RNG.normal(size=(3, 5)))
  t /= t.sum(1, keepdims=True)
  full = np.zeros((3, 11))
  full[:, ids] = t
  with jax.enable_x64(True):
    got = deqa_softkl_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(t))
    ref = optax.losses.kl_divergence(jax.nn.log_softmax(jnp.asarray(logits)), jnp.asarray(full)).mean()
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-10)


def np_fid(za, zb, ma, mb, sa, sb, fix=True, cont=True, eps=1e-8):
  out = []
  for i in range(len(za)):
    qa, qb = np.exp(za[i]) / np.exp(za[i]).sum(), np.exp(zb[i]) / np.exp(zb[i]).sum()
    s_a, s_b = (qa * X).sum(), (qb * X).sum()
    v_a, v_b = (qa * (X - s_a) ** 2).sum(), (qb * (X - s_b) ** 2).sum()
    ph = norm.cdf((s_a - s_b) / np.sqrt(2)) if fix else norm.cdf((s_a - s_b) / np.sqrt(v_a + v_b + eps))
    if cont:
      g = norm.cdf((ma[i] - mb[i]) / np.sqrt(sa[i] ** 2 + sb[i] ** 2 + eps))
      out.append(1 - np.sqrt(ph * g + eps) - np.sqrt((1 - ph) * (1 - g) + eps))
    else:
      out.append(1 - np.sqrt(ph + eps) if ma[i] > mb[i] else 1 - np.sqrt(1 - ph + eps))
  return np.mean(out)


ZA, ZB = RNG.normal(size=(6, 5)), RNG.normal(size=(6, 5))
MA, MB, SA, SB = RNG.uniform(1, 5, 6), RNG.uniform(1, 5, 6), RNG.uniform(0.1, 1, 6), RNG.uniform(0.1, 1, 6)


@pytest.mark.parametrize("fix, cont", [(True, True), (False, False), pytest.param(True, False, marks=pytest.mark.slow),
                                       pytest.param(False, True, marks=pytest.mark.slow)])
def test_fidelity_numpy(fix, cont):
  with jax.enable_x64(True):
    J = jnp.asarray
    got = fidelity_loss(J(ZA), J(ZB), J(MA), J(MB), J(SA), J(SB), use_fix_std=fix, continuous=cont)
    np.testing.assert_allclose(float(got), np_fid(ZA, ZB, MA, MB, SA, SB, fix, cont), rtol=1e-10)
    jtu.check_grads(lambda a, b: fidelity_loss(a, b, J(MA), J(MB), J(SA), J(SB), use_fix_std=fix, continuous=cont),
                    (J(ZA), J(ZB)), order=1, modes=["rev"])
    # symmetric under swapping A and B
    sw = fidelity_loss(J(ZB), J(ZA), J(MB), J(MA), J(SB), J(SA), use_fix_std=fix, continuous=cont)
    if cont:
      np.testing.assert_allclose(float(sw), float(got), rtol=1e-10)


def test_score_edges_and_deviation():
  s, sd = deqa_score(jnp.array([[100., 0, 0, 0, 0], [0., 0, 0, 0, 0]]))
  np.testing.assert_allclose(s, [5., 3.], rtol=1e-6)
  np.testing.assert_allclose(sd, [0., np.sqrt(2.)], atol=1e-6)
  # deterministic predictions (sd = 0) and identical images: finite loss and gradients
  z = jnp.array([[100., 0, 0, 0, 0]])
  f = lambda a, b, **k: fidelity_loss(a, b, jnp.array([4.]), jnp.array([4.]), jnp.array([0.]), jnp.array([0.]),
                                      use_fix_std=False, **k)
  assert np.isfinite(float(f(z, z)))
  assert all(np.all(np.isfinite(g)) for g in jax.grad(f, argnums=(0, 1))(z, z))
  # deviation: binary variant keeps eps inside sqrt -> finite gradient when p_hat -> 0 with g = 1
  za, zb = jnp.array([[-50., 0, 0, 0, 50.]]), jnp.array([[50., 0, 0, 0, -50.]])
  fb = lambda a: fidelity_loss(a, zb, jnp.array([5.]), jnp.array([1.]), use_fix_std=False, continuous=False)
  assert np.all(np.isfinite(jax.grad(fb)(za)))
  # bf16, huge logits, jit, mask
  J = lambda x: jnp.asarray(x, jnp.float32)
  fn = lambda a: fidelity_loss(a, J(ZB), J(MA), J(MB), J(SA), J(SB))
  for x in (J(ZA).astype(jnp.bfloat16), 1e3 * J(ZA)):
    assert np.isfinite(float(fn(x))) and np.all(np.isfinite(jax.grad(fn)(x).astype(jnp.float32)))
  np.testing.assert_allclose(jax.jit(fn)(J(ZA)), fn(J(ZA)), rtol=1e-6)
  w = jnp.arange(6) < 4
  np.testing.assert_allclose(fidelity_loss(J(ZA), J(ZB), J(MA), J(MB), J(SA), J(SB), where=w),
                             fidelity_loss(J(ZA)[:4], J(ZB)[:4], J(MA)[:4], J(MB)[:4], J(SA)[:4], J(SB)[:4]), rtol=1e-6)
  with pytest.raises(ValueError, match="std_a"):
    fidelity_loss(J(ZA), J(ZB), J(MA), J(MB))
  with pytest.raises(ValueError, match="mos_max"):
    deqa_soft_labels(jnp.ones(2), jnp.ones(2), 5., 1.)
  with pytest.raises(ValueError, match="level_logits"):
    deqa_score(jnp.ones((2, 4)))


def test_jit_matches_eager():
  J = lambda x: jnp.asarray(x, jnp.float32)
  args = (J(ZA), J(ZB), J(MA), J(MB), J(SA), J(SB))
  np.testing.assert_allclose(fidelity_loss(*args), _L.fidelity_loss(*args), rtol=1e-6)
  np.testing.assert_allclose(deqa_soft_labels(J(MA), J(SA), 1., 5.), _L.deqa_soft_labels(J(MA), J(SA), 1., 5.), rtol=1e-5, atol=1e-6)
