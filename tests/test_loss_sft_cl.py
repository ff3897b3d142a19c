"""SFT / CL weight-direction decomposition: gradient identities of the unified reranking loss."""
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import optax
import pytest

from losses import cl_loss, sft_cl_decomposition, sft_loss, unified_reranking_loss

import losses as _L  # eager originals, used by test_jit_matches_eager
from oracle_utils import np_fd_grad

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

sft_loss = _jitted('sft_loss')
cl_loss = _jitted('cl_loss')
sft_cl_decomposition = _jitted('sft_cl_decomposition')
unified_reranking_loss = _jitted('unified_reranking_loss')


RNG = np.random.default_rng(0)
B, N1, H = 3, 4, 6
HID, WY, WN = RNG.normal(size=(B, N1, H)), RNG.normal(size=H), RNG.normal(size=H)


def logits(h, wy=WY, wn=WN):
  return h @ wy, h @ wn


def sig(x):
  return 1 / (1 + np.exp(-x))


def test_losses_numpy_and_optax():
  zy, zn = logits(HID)
  want_sft = np.mean([-np.log(sig(zy[b, 0] - zn[b, 0])) - sum(np.log(1 - sig(zy[b, i] - zn[b, i])) for i in range(1, N1))
                      for b in range(B)])
  with jax.enable_x64(True):
    np.testing.assert_allclose(float(sft_loss(jnp.asarray(zy), jnp.asarray(zn))), want_sft, rtol=1e-10)
    ref = optax.losses.sigmoid_binary_cross_entropy(jnp.asarray(zy - zn), jnp.asarray(np.eye(N1)[0])).sum(-1).mean()
    np.testing.assert_allclose(float(sft_loss(jnp.asarray(zy), jnp.asarray(zn))), float(ref), rtol=1e-10)
    for tau in (1.0, 0.2):
      ce = optax.losses.softmax_cross_entropy_with_integer_labels(jnp.asarray(zy) / tau, jnp.zeros(B, int)).mean()
      np.testing.assert_allclose(float(cl_loss(jnp.asarray(zy), temperature=tau)), float(ce), rtol=1e-10)
    # leading axes [..., 1 + n] and the default temperature 1
    zy3 = np.stack([zy, zy[::-1]])
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(jnp.asarray(zy3.reshape(-1, N1)), jnp.zeros(2 * B, int))
    np.testing.assert_allclose(float(cl_loss(jnp.asarray(zy3))), float(ce.mean()), rtol=1e-10)
    p = np.exp(zy) / np.exp(zy).sum(-1, keepdims=True)
    np.testing.assert_allclose(sft_cl_decomposition(jnp.asarray(zy), jnp.asarray(zn))["cl_weight"],
                               np.where(np.arange(N1) == 0, 1 - p, p), rtol=1e-10)


@pytest.mark.parametrize("tau", [0.3, pytest.param(1.0, marks=pytest.mark.slow)])
def test_gradient_identities(tau):
  with jax.enable_x64(True):
    h = jnp.asarray(HID)
    def url(hh, kind):
      zy, zn = logits(hh)
      dec = sft_cl_decomposition(zy, zn, temperature=tau)
      return unified_reranking_loss(dec[f"{kind}_weight"], dec[f"{kind}_score"])
    g_sft = jax.grad(lambda hh: sft_loss(*logits(hh)))(h)
    g_cl = jax.grad(lambda hh: cl_loss(logits(hh)[0], temperature=tau))(h)
    np.testing.assert_allclose(jax.grad(lambda hh: url(hh, "sft"))(h), g_sft, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jax.grad(lambda hh: url(hh, "cl"))(h), g_cl, rtol=1e-10, atol=1e-14)
    # mixed: SFT weight with CL direction -- gradient is W_SFT * c * grad(z_y), checked per element
    zy, zn = logits(h)
    dec = sft_cl_decomposition(zy, zn, temperature=tau)
    gz = jax.grad(lambda z: unified_reranking_loss(dec["sft_weight"], z))(zy)
    np.testing.assert_allclose(gz, dec["sign"] * dec["sft_weight"] / B, rtol=1e-12)
    # closed-form weights
    d = np.asarray(zy - zn)
    np.testing.assert_allclose(dec["sft_weight"][:, 0], 1 - sig(d[:, 0]), rtol=1e-10)
    np.testing.assert_allclose(dec["sft_weight"][:, 1:], sig(d[:, 1:]), rtol=1e-10)
    p = np.exp(np.asarray(zy) / tau) / np.exp(np.asarray(zy) / tau).sum(-1, keepdims=True)
    np.testing.assert_allclose(dec["cl_weight"][:, 0], (1 - p[:, 0]) / tau, rtol=1e-10)
    jtu.check_grads(lambda a, b: sft_loss(a, b), (zy, zn), order=1, modes=["rev"])
    # weights are detached
    assert np.all(jax.grad(lambda z: dec["sft_weight"].sum() + sft_cl_decomposition(z, zn)["cl_weight"].sum())(zy) == 0)


def test_edges():
  zy, zn = (jnp.asarray(x, jnp.float32) for x in logits(HID))
  for a, b in ((1e3 * zy, 1e3 * zn), (jnp.zeros_like(zy), jnp.zeros_like(zn)), (zy.astype(jnp.bfloat16), zn.astype(jnp.bfloat16))):
    for f in (lambda x: sft_loss(x, b), lambda x: cl_loss(x)):
      assert np.isfinite(float(f(a))) and np.all(np.isfinite(jax.grad(f)(a).astype(jnp.float32)))
  # single document (no negatives): CL loss 0, SFT = -log sigma(d+)
  np.testing.assert_allclose(float(cl_loss(zy[:, :1])), 0., atol=1e-7)
  np.testing.assert_allclose(jax.jit(sft_loss)(zy, zn), sft_loss(zy, zn), rtol=1e-6)
  v = jax.vmap(lambda a, b: sft_loss(a[None], b[None]))(zy, zn)
  np.testing.assert_allclose(v.mean(), sft_loss(zy, zn), rtol=1e-6)
  with pytest.raises(ValueError, match="z_no"):
    sft_loss(zy, zn[:, :2])
  with pytest.raises(ValueError, match="score"):
    unified_reranking_loss(zy, zn[:, :2])


def test_jit_matches_eager():
  zy, zn = (jnp.asarray(x, jnp.float32) for x in logits(HID))
  np.testing.assert_allclose(sft_loss(zy, zn), _L.sft_loss(zy, zn), rtol=1e-6)
  np.testing.assert_allclose(cl_loss(zy), _L.cl_loss(zy), rtol=1e-6)


# ------------------------------------------------------------------ gradient values vs float64 numpy oracles

def np_sft(zy, zn):
  """L_SFT: -log sigma(d_+) - sum_neg log(1 - sigma(d_i)), d = z_y - z_n; mean over examples (loops)."""
  out = []
  for b in range(zy.shape[0]):
    d = zy[b] - zn[b]
    out.append(-np.log(sig(d[0])) - sum(np.log(1 - sig(d[i])) for i in range(1, len(d))))
  return np.mean(out)


def np_cl(zy, tau):
  """L_CL: -log softmax(z_y / tau)_0, mean over examples (loops)."""
  out = []
  for b in range(zy.shape[0]):
    s = zy[b] / tau
    out.append(-(s[0] - s.max() - np.log(np.exp(s - s.max()).sum())))
  return np.mean(out)


def np_url(w, s):
  """L_URL with the weights as constants: mean_b sum_i c_i w_i s_i, c = -1 for index 0, +1 otherwise."""
  c = np.where(np.arange(w.shape[-1]) == 0, -1., 1.)
  return np.mean(np.sum(c * w * s, -1))


def test_gradient_values_numpy_oracle():
  zy, zn = logits(HID)
  tau = 0.3
  r = RNG.normal(size=zy.shape)   # cotangents for the array-valued decomposition
  w = np.abs(RNG.normal(size=zy.shape))
  with jax.enable_x64(True):
    a, b = jnp.asarray(zy), jnp.asarray(zn)
    g_sft = jax.grad(sft_loss, argnums=(0, 1))(a, b)
    g_cl = jax.grad(lambda z: cl_loss(z, temperature=tau))(a)
    g_url = jax.grad(unified_reranking_loss, argnums=(0, 1))(jnp.asarray(w), a)
    dec_g = {key: jax.grad(lambda y, n: jnp.sum(jnp.asarray(r) * sft_cl_decomposition(y, n, temperature=tau)[key]),
                           argnums=(0, 1))(a, b)
             for key in ("sft_score", "cl_score", "sft_weight", "cl_weight")}
    for f, args in ((sft_loss, (a, b)), (lambda z: cl_loss(z, temperature=tau), (a,)),
                    (lambda s: unified_reranking_loss(jnp.asarray(w), s), (a,))):
      jtu.check_grads(f, args, order=1, modes=["rev"], eps=1e-6)
  # SFT: finite differences of the numpy loop, and the closed form c * W_SFT / B (d/dz_n = -d/dz_y)
  np.testing.assert_allclose(g_sft[0], np_fd_grad(lambda y: np_sft(y, zn), zy), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(g_sft[1], np_fd_grad(lambda n: np_sft(zy, n), zn), rtol=1e-6, atol=1e-9)
  d = zy - zn
  c = np.where(np.arange(N1) == 0, -1., 1.)
  w_sft = np.where(np.arange(N1) == 0, 1 - sig(d), sig(d))
  np.testing.assert_allclose(g_sft[0], c * w_sft / B, rtol=1e-10)
  # CL: finite differences and the closed form (p - onehot_0) / (tau B)
  np.testing.assert_allclose(g_cl, np_fd_grad(lambda y: np_cl(y, tau), zy), rtol=1e-6, atol=1e-9)
  p = np.exp(zy / tau) / np.exp(zy / tau).sum(-1, keepdims=True)
  np.testing.assert_allclose(g_cl, (p - np.eye(N1)[0]) / (tau * B), rtol=1e-10, atol=1e-14)
  # URL: d/dscore = c W / B (finite differences of the numpy form); the weight gets no gradient
  np.testing.assert_allclose(g_url[1], np_fd_grad(lambda s: np_url(w, s), zy), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(g_url[1], c * w / B, rtol=1e-12)
  assert not np.asarray(g_url[0]).any()
  # decomposition: sft_score = z_y - z_n, cl_score = z_y (identity Jacobians), weights detached
  np.testing.assert_allclose(dec_g["sft_score"][0], r, rtol=1e-12)
  np.testing.assert_allclose(dec_g["sft_score"][1], -r, rtol=1e-12)
  np.testing.assert_allclose(dec_g["cl_score"][0], r, rtol=1e-12)
  assert not np.asarray(dec_g["cl_score"][1]).any()
  for key in ("sft_weight", "cl_weight"):
    assert not np.asarray(dec_g[key][0]).any() and not np.asarray(dec_g[key][1]).any()
