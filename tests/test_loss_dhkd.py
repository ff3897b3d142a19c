"""DHKD losses vs numpy Bernoulli-KL loops, torch-clamped transcription, optax KL, closed forms."""
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import optax
import pytest

from losses import binary_kl_loss, binary_kl_norm_loss, dual_head_kd_loss, gradient_alignment, kd_loss

from losses.dhkd import tempered_kl
import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

binary_kl_loss = _jitted('binary_kl_loss', 'clamp_eps')
binary_kl_norm_loss = _jitted('binary_kl_norm_loss', 'clamp_eps')
dual_head_kd_loss = _jitted('dual_head_kd_loss', 'clamp_eps')
kd_loss = _jitted('kd_loss')


RNG = np.random.default_rng(0)
S1, S2, T = (RNG.normal(size=(5, 4)) * 3 for _ in range(3))
Y = RNG.integers(0, 4, 5)


def sig(x):
  return 1 / (1 + np.exp(-x))


def np_bkl(s, t, T, clamp=None, norm=False):
  tot = 0.
  for b in range(s.shape[0]):
    for c in range(s.shape[1]):
      if norm:
        p, q = 0.5, sig((s[b, c] - t[b, c]) / T)
      else:
        p, q = sig(t[b, c] / T), sig(s[b, c] / T)
      if clamp is not None:
        q = min(max(q, clamp), 1 - clamp)
        p = p if norm else min(max(p, clamp), 1 - clamp)
      tot += p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
  return T ** 2 * tot / s.shape[0]


@pytest.mark.parametrize("clamp", [None, 1e-8])
def test_numpy_loops(clamp):
  with jax.enable_x64(True):
    J = jnp.asarray
    np.testing.assert_allclose(float(binary_kl_loss(J(S2), J(T), clamp_eps=clamp)), np_bkl(S2, T, 2., clamp), rtol=1e-10)
    np.testing.assert_allclose(float(binary_kl_norm_loss(J(S2), J(T), clamp_eps=clamp)),
                               np_bkl(S2, T, 2., clamp, norm=True), rtol=1e-10)
    for temp in (0.5, 3.):   # the T^2 factor (T = 2 cannot tell T^2 from 2T)
      np.testing.assert_allclose(float(binary_kl_loss(J(S2), J(T), temperature=temp, clamp_eps=clamp)),
                                 np_bkl(S2, T, temp, clamp), rtol=1e-10)
      np.testing.assert_allclose(float(binary_kl_norm_loss(J(S2), J(T), temperature=temp, clamp_eps=clamp)),
                                 np_bkl(S2, T, temp, clamp, norm=True), rtol=1e-10)
    ce = np.mean([-np.log(np.exp(S1[b, Y[b]]) / np.exp(S1[b]).sum()) for b in range(5)])
    for g, a in ((1., 1.), (0.5, 0.1)):
      got = dual_head_kd_loss(J(S1), J(S2), J(T), J(Y), gamma=g, alpha=a, clamp_eps=clamp)
      np.testing.assert_allclose(float(got), g * ce + a * np_bkl(S2, T, 2., clamp, norm=True), rtol=1e-10)


def test_kd_vs_optax_and_closed_forms():
  with jax.enable_x64(True):
    J = jnp.asarray
    ref = 16 * optax.losses.kl_divergence(jax.nn.log_softmax(J(S1) / 4), jax.nn.softmax(J(T) / 4)).mean()
    np.testing.assert_allclose(float(kd_loss(J(S1), J(T))), float(ref), rtol=1e-10)
    # BinaryKLNorm: 0 iff z_s = z_t; gradient T (sigmoid(D/T) - 1/2) / B
    assert abs(float(binary_kl_norm_loss(J(T), J(T)))) < 1e-15
    g = jax.grad(binary_kl_norm_loss)(J(S2), J(T))
    np.testing.assert_allclose(g, 2 * (sig((S2 - T) / 2) - 0.5) / 5, rtol=1e-10)
    jtu.check_grads(lambda a, b: dual_head_kd_loss(a, b, J(T), J(Y)), (J(S1), J(S2)), order=1, modes=["rev"])
    jtu.check_grads(lambda a: binary_kl_loss(a, J(T)), (J(S2),), order=1, modes=["rev"])
    # teacher detached
    assert np.all(jax.grad(dual_head_kd_loss, argnums=2)(J(S1), J(S2), J(T), J(Y)) == 0)


def test_deviation_clamp_saturation():
  """Official clamp at 1e-8: terms saturate (zero gradient) for |D|/T > ~18.4; default form does not."""
  s, t = jnp.array([[50.]]), jnp.array([[0.]])
  assert float(jax.grad(binary_kl_norm_loss)(s, t, clamp_eps=1e-8)[0, 0]) == 0.0
  assert float(jax.grad(binary_kl_norm_loss)(s, t)[0, 0]) > 0.9
  np.testing.assert_allclose(float(binary_kl_norm_loss(s, t, clamp_eps=1e-8)), np_bkl(np.array([[50.]]), np.zeros((1, 1)), 2., 1e-8, True),
                             rtol=1e-5)


def test_edges_bf16_mask_jit():
  J = lambda x: jnp.asarray(x, jnp.float32)
  f = lambda a, b: dual_head_kd_loss(a, b, J(T), jnp.asarray(Y))
  for x in (1e3 * J(S1), jnp.zeros((5, 4)), J(S1).astype(jnp.bfloat16)):
    assert np.isfinite(float(f(x, x)))
    gs = jax.grad(f, argnums=(0, 1))(x, x)
    assert all(np.all(np.isfinite(g.astype(jnp.float32))) for g in gs)
  np.testing.assert_allclose(jax.jit(f)(J(S1), J(S2)), f(J(S1), J(S2)), rtol=1e-6)
  w = jnp.arange(5) < 2
  np.testing.assert_allclose(dual_head_kd_loss(J(S1), J(S2), J(T), jnp.asarray(Y), where=w),
                             dual_head_kd_loss(J(S1)[:2], J(S2)[:2], J(T)[:2], jnp.asarray(Y)[:2]), rtol=1e-6)
  assert float(dual_head_kd_loss(J(S1), J(S2), J(T), jnp.asarray(Y), where=jnp.zeros(5, bool))) == 0.0
  assert float(kd_loss(J(S1)[:, :1], J(T)[:, :1])) == 0.0   # one class


def test_gradient_alignment():
  gce = {"a": jnp.array([1., 0.]), "b": jnp.array([[0., 2.]])}
  gkd = {"a": jnp.array([-1., 1.]), "b": jnp.array([[0., -1.]])}
  out = gradient_alignment(gce, gkd)
  fce = np.array([1., 0., 0., 2.])
  fkd = np.array([-1., 1., 0., -1.])
  proj = fkd - fkd @ fce / (fce @ fce) * fce
  assert abs(proj @ fce) < 1e-6
  np.testing.assert_allclose(np.concatenate([out["a"], out["b"].ravel()]), fce + proj, rtol=1e-6)
  same = gradient_alignment(gce, gce)   # no conflict: plain sum
  np.testing.assert_allclose(same["a"], 2 * gce["a"])
  zero = gradient_alignment({"a": jnp.zeros(2)}, {"a": jnp.array([1., -1.])})
  np.testing.assert_allclose(zero["a"], [1., -1.])
  with pytest.raises(ValueError, match="same structure"):
    gradient_alignment({"a": jnp.zeros(2)}, {"a": jnp.zeros(3)})


def test_bad_inputs():
  with pytest.raises(ValueError, match="teacher_logits"):
    _L.binary_kl_loss(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="temperature"):
    _L.kd_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=-1.)


def test_jit_matches_eager():
  a = [jnp.asarray(x, jnp.float32) for x in (S1, S2, T)]
  np.testing.assert_allclose(dual_head_kd_loss(*a, jnp.asarray(Y)), _L.dual_head_kd_loss(*a, jnp.asarray(Y)), rtol=1e-6)
  np.testing.assert_allclose(binary_kl_loss(a[1], a[2]), _L.binary_kl_loss(a[1], a[2]), rtol=1e-6)


def test_kd_and_tempered_kl_gradient_numpy_oracle():
  # d/dz_s [T^2 mean_b KL(softmax(z_t/T) || softmax(z_s/T))] = T (softmax(z_s/T) - softmax(z_t/T)) / B (float64)
  temp = 3.0
  sm = lambda z: np.exp(z / temp - (z / temp).max(1, keepdims=True)) / np.exp(
      z / temp - (z / temp).max(1, keepdims=True)).sum(1, keepdims=True)
  want = temp * (sm(S1) - sm(T)) / S1.shape[0]
  J = jnp.asarray
  with jax.enable_x64(True):
    g_s, g_t = jax.grad(lambda a, b: kd_loss(a, b, temperature=temp), argnums=(0, 1))(J(S1), J(T))
    g_kl = jax.grad(lambda a: temp ** 2 * jnp.mean(tempered_kl(J(T), a, temp)))(J(S1))
  np.testing.assert_allclose(np.asarray(g_s), want, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(np.asarray(g_kl), want, rtol=1e-10, atol=1e-14)
  assert not np.asarray(g_t).any()   # teacher detached
