"""fedld_margin_loss and principal_gradient_aggregate vs numpy transcriptions of the official code."""
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest

from losses import fedld_margin_loss, principal_gradient_aggregate

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

fedld_margin_loss = _jitted('fedld_margin_loss', 'reduction')
principal_gradient_aggregate = _jitted('principal_gradient_aggregate', 'k_proportion')


RNG = np.random.default_rng(0)
Z, Y = RNG.normal(size=(6, 4)), RNG.integers(0, 4, 6)


def np_margin(z, y, lam=0.03, per_sample=False):
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  ce = np.mean([-np.log(p[i, y[i]]) for i in range(len(y))])
  reg = np.mean(np.log1p((p ** 2).sum(1))) if per_sample else np.log1p(np.linalg.norm(p) ** 2)
  return ce + lam * reg


def np_pcgrad_svd(G, k_prop=0.8):
  """Transcription of the official pcgrad_svd for one layer (torch.svd -> numpy svd), with 0/0 guards."""
  m = G.shape[0]
  H = G @ G.T / m
  U, s, Vt = np.linalg.svd(H)
  E = Vt.T
  V = (G.T @ E).T
  k = int(m * k_prop)
  ws = []
  for j in range(k):
    pos = sum(1 for i in range(m) if G[i] @ V[j] >= 0)
    ws.append(V[j] if pos >= m - pos else -V[j])
  out = np.zeros(G.shape[1])
  for i in range(m):
    gh = np.zeros(G.shape[1])
    for j in range(k):
      den = ws[j] @ ws[j]
      if den == 0:
        continue
      r = (G[i] @ ws[j] / den) * ws[j]
      nr = np.linalg.norm(r)
      if nr == 0:
        continue
      gh += r * (s[j] / s.sum()) * np.linalg.norm(G[i]) / nr
    out += gh
  return out / m


@pytest.mark.parametrize("per_sample", [False, True])
def test_margin_loss_numpy(per_sample):
  with jax.enable_x64(True):
    red = "per_sample" if per_sample else "batch_frobenius"
    got = fedld_margin_loss(jnp.asarray(Z), jnp.asarray(Y), reduction=red)
    np.testing.assert_allclose(float(got), np_margin(Z, Y, per_sample=per_sample), rtol=1e-10)
    jtu.check_grads(lambda z: fedld_margin_loss(z, jnp.asarray(Y), reduction=red), (jnp.asarray(Z),), order=1, modes=["rev"])
  # the code's Frobenius reduction grows with batch size; per-sample does not
  z2, y2 = jnp.concatenate([jnp.asarray(Z)] * 2), jnp.concatenate([jnp.asarray(Y)] * 2)
  a, b = fedld_margin_loss(jnp.asarray(Z), jnp.asarray(Y), reduction=red), fedld_margin_loss(z2, y2, reduction=red)
  assert (abs(float(a) - float(b)) > 1e-4) != per_sample


def test_margin_edges():
  z, y = jnp.asarray(Z, jnp.float32), jnp.asarray(Y)
  f = lambda a: fedld_margin_loss(a, y)
  for x in (1e3 * z, jnp.zeros_like(z), z.astype(jnp.bfloat16)):
    assert np.isfinite(float(f(x))) and np.all(np.isfinite(jax.grad(f)(x).astype(jnp.float32)))
  np.testing.assert_allclose(jax.jit(f)(z), f(z), rtol=1e-6)
  w = jnp.arange(6) < 3
  np.testing.assert_allclose(fedld_margin_loss(z, y, where=w), fedld_margin_loss(z[:3], y[:3]), rtol=1e-6)
  np.testing.assert_allclose(float(fedld_margin_loss(z[:, :1], jnp.zeros(6, int), penalty=0.)), 0., atol=1e-7)
  with pytest.raises(ValueError, match="reduction"):
    fedld_margin_loss(z, y, reduction="sum")
  np.testing.assert_allclose(_L.fedld_margin_loss(z[:, :1], jnp.zeros(6, int), penalty=0.), 0., atol=1e-7)  # eager: checks run
  with pytest.raises(ValueError, match="penalty"):
    _L.fedld_margin_loss(z, y, penalty=-0.1)


@pytest.mark.parametrize("m", [5, pytest.param(3, marks=pytest.mark.slow), pytest.param(6, marks=pytest.mark.slow)])
def test_aggregation_numpy(m):
  G = RNG.normal(size=(m, 7))
  with jax.enable_x64(True):
    upd, hist = principal_gradient_aggregate({"w": jnp.asarray(G), "b": jnp.asarray(G[:, :1])},
                                             history={"w": jnp.ones(7), "b": jnp.ones(1)})
    np.testing.assert_allclose(upd["w"], np_pcgrad_svd(G), rtol=1e-8, atol=1e-12)
    small, _ = principal_gradient_aggregate({"w": jnp.asarray(1e-3 * G)}, history={"w": jnp.ones(7)})
    np.testing.assert_allclose(small["w"], np_pcgrad_svd(1e-3 * G), rtol=1e-8, atol=1e-15)   # |v_j|^2 < 1
    np.testing.assert_allclose(upd["b"], G[:, :1].mean(0), rtol=1e-12)   # scalar layer: plain mean
    np.testing.assert_allclose(hist["w"], 0.99 + 0.01 * np_pcgrad_svd(G), rtol=1e-8)
    # first round (no history) and zero history -> mean
    first, h1 = principal_gradient_aggregate({"w": jnp.asarray(G)})
    np.testing.assert_allclose(first["w"], G.mean(0), rtol=1e-12)
    np.testing.assert_allclose(h1["w"], 0.01 * G.mean(0), rtol=1e-12)
    zero, _ = principal_gradient_aggregate({"w": jnp.asarray(G)}, {"w": jnp.zeros(7)})
    np.testing.assert_allclose(zero["w"], G.mean(0), rtol=1e-12)


def test_aggregation_properties():
  with jax.enable_x64(True):
    g = RNG.normal(size=(4, 3))
    same = np.repeat(g[:1], 5, 0)   # identical clients -> the common update (rank-deficient, guarded)
    out, _ = principal_gradient_aggregate(jnp.asarray(same), jnp.ones(3))
    np.testing.assert_allclose(out, g[0], rtol=1e-8)
    np.testing.assert_allclose(np_pcgrad_svd(same), g[0], rtol=1e-8)
    # orthogonal client updates (|r_ij| = 0 traps) stay finite
    orth = np.eye(4)[:, :4] * np.array([[1.], [2.], [3.], [4.]])
    out, _ = principal_gradient_aggregate(jnp.asarray(orth), jnp.ones(4))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np_pcgrad_svd(orth), rtol=1e-8, atol=1e-12)
    zeros, _ = principal_gradient_aggregate(jnp.zeros((3, 4)), jnp.ones(4))
    assert np.all(zeros == 0)
    # jit and a 2-D parameter leaf
    G = jnp.asarray(RNG.normal(size=(5, 2, 3)))
    f = lambda u, h: principal_gradient_aggregate(u, h)[0]
    np.testing.assert_allclose(jax.jit(f)(G, jnp.ones((2, 3))), f(G, jnp.ones((2, 3))), rtol=1e-10)
    np.testing.assert_allclose(f(G, jnp.ones((2, 3))).reshape(-1), np_pcgrad_svd(np.asarray(G).reshape(5, 6)), rtol=1e-8)
  with pytest.raises(ValueError, match="client axis"):
    principal_gradient_aggregate({"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))})
  with pytest.raises(ValueError, match="k_proportion"):
    principal_gradient_aggregate(jnp.ones((3, 2)), k_proportion=0.)


def test_jit_matches_eager():
  z, y = jnp.asarray(Z, jnp.float32), jnp.asarray(Y)
  np.testing.assert_allclose(fedld_margin_loss(z, y), _L.fedld_margin_loss(z, y), rtol=1e-6)
  g = jnp.asarray(RNG.normal(size=(4, 5)), jnp.float32)
  np.testing.assert_allclose(principal_gradient_aggregate(g, jnp.ones(5))[0],
                             _L.principal_gradient_aggregate(g, jnp.ones(5))[0], rtol=1e-5, atol=1e-6)
