"""Tests for lostjax.kernels.lost_matmul: y = gamma*act(x A) B + (1-gamma)*x[..., I] W_s (arXiv 2508.02668).

Oracles: a NumPy float64 evaluation of the LOST formula (arXiv 2508.02668, eq. of the layer), and JAX
autodiff of the plain unfused expression for the gradients w.r.t. x, A, B, W_s and gamma.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax.kernels import IMPLS as REGISTRY, lost_group_matmul, lost_matmul


def _np_silu(h):
  return h / (1.0 + np.exp(-h))


def _data(lead, d_in, r, k, d_out, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(lead + (d_in,)).astype(np.float32)
  a = (rng.standard_normal((d_in, r)) / np.sqrt(d_in)).astype(np.float32)
  b = (rng.standard_normal((r, d_out)) / np.sqrt(r)).astype(np.float32)
  idx = np.sort(rng.choice(d_in, k, replace=False)).astype(np.int32)
  ws = rng.standard_normal((k, d_out)).astype(np.float32)
  return x, a, b, idx, ws


def _np_lost(x, a, b, idx, ws, gamma, act):
  x64 = x.astype(np.float64)
  h = x64 @ a
  h = _np_silu(h) if act == "silu" else h
  sparse = np.zeros(x.shape[:-1] + (ws.shape[1],))
  for j, c in enumerate(idx):
    sparse += x64[..., c:c + 1] * ws[j].astype(np.float64)
  return gamma * (h @ b) + (1 - gamma) * sparse


def _plain(x, a, b, idx, ws, gamma, act):
  h = x @ a
  h = jax.nn.silu(h) if act == "silu" else h
  return gamma * (h @ b) + (1 - gamma) * (x[..., idx] @ ws)


IMPLS = list(REGISTRY)  # every registry entry, the Pallas ones in interpret mode


@pytest.mark.parametrize("impl,act", [(i, a) for i in IMPLS for a in (None, "silu")
                                      if (i, a) != ("pallas_tpu", "silu")])  # the TPU kernel once (slow)
def test_forward_and_grads_float32(impl, act):
  x, a, b, idx, ws = _data((2, 9), 37, 6, 5, 21)  # odd d_out, d_in not a power of two
  gamma = 0.3
  y = lost_matmul(x, a, b, idx, ws, gamma, act=act, impl=impl)
  np.testing.assert_allclose(np.asarray(y), _np_lost(x, a, b, idx, ws, gamma, act), rtol=1e-5,
                             atol=1e-5)
  loss = lambda *p: jnp.sum(jnp.sin(lost_matmul(p[0], p[1], p[2], idx, p[3], p[4], act=act,
                                                impl=impl)))
  ref_loss = lambda *p: jnp.sum(jnp.sin(_plain(p[0], p[1], p[2], idx, p[3], p[4], act)))
  args = (x, a, b, ws, jnp.float32(gamma))
  got = jax.jit(jax.grad(loss, argnums=range(5)))(*args)
  ref = jax.grad(ref_loss, argnums=range(5))(*args)
  for name, g, rr in zip(["x", "a", "b", "ws", "gamma"], got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(rr), rtol=2e-5, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("impl", ["fused_concat", "fused_onehot"])
def test_bf16_close_to_float64(impl):
  x, a, b, idx, ws = _data((3, 2, 8), 48, 8, 6, 17, seed=1)  # 3 batch dims
  cast = lambda t: jnp.asarray(t, jnp.bfloat16)
  y = lost_matmul(cast(x), cast(a), cast(b), idx, cast(ws), 0.5, act="silu", impl=impl)
  assert y.dtype == jnp.bfloat16
  xs = [np.asarray(cast(t).astype(jnp.float32)) for t in (x, a, b, ws)]
  ref = _np_lost(xs[0], xs[1], xs[2], idx, xs[3], 0.5, "silu")
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, rtol=3e-2, atol=5e-2)
  gx, gws = jax.grad(lambda x_, w_: lost_matmul(x_, cast(a), cast(b), idx, w_, 0.5, act="silu",
                                                impl=impl).astype(jnp.float32).sum(),
                     (0, 1))(cast(x), cast(ws))
  assert gx.dtype == jnp.bfloat16 and gws.dtype == jnp.bfloat16
  # d/dW_s of sum(y) = (1 - gamma) * sum over tokens of x[..., idx]
  ref_gws = 0.5 * xs[0].reshape(-1, 48)[:, idx].sum(0)[:, None] * np.ones((1, 17))
  np.testing.assert_allclose(np.asarray(gws.astype(jnp.float32)), ref_gws, rtol=2e-2, atol=0.15)


def test_gamma_limits_and_callable_act():
  x, a, b, idx, ws = _data((7,), 20, 4, 3, 16, seed=2)
  # gamma = 1: pure low-rank branch; gamma = 0: pure sparse branch.
  y1 = lost_matmul(x, a, b, idx, ws, 1.0, act=jnp.tanh)
  np.testing.assert_allclose(y1, np.tanh(x.astype(np.float64) @ a) @ b, rtol=1e-5, atol=1e-5)
  y0 = lost_matmul(x, a, b, idx, ws, 0.0, act=jnp.tanh)
  np.testing.assert_allclose(y0, x.astype(np.float64)[:, idx] @ ws, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(a=np.ones((19, 4), np.float32)), "a must have shape"),
    (dict(b=np.ones((5, 16), np.float32)), "b must have shape"),
    (dict(ws=np.ones((3, 15), np.float32)), "w_sparse must have shape"),
    (dict(idx=np.array([1, 2], np.int32)), "idx must have shape"),
    (dict(gamma=np.ones(2)), "gamma must be a scalar"),
    (dict(act="swish2"), "unknown activation .swish2."),
    (dict(impl="fused2"), "unknown sparse_impl 'fused2'"),
])
def test_bad_input_raises(kwargs, match):
  x, a, b, idx, ws = _data((4,), 20, 4, 3, 16)
  args = dict(x=x, a=a, b=b, idx=idx, ws=ws, gamma=0.5, act=None, impl="auto")
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    lost_matmul(args["x"], args["a"], args["b"], args["idx"], args["ws"], args["gamma"],
                act=args["act"], impl=args["impl"])


# ----------------------------------------------------------------------------- lost_group_matmul

def _group_data(seed=3):
  """Three layers reading one x [2, 5, 30]: different ranks, k and d_out; overlapping channel sets."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 5, 30)).astype(np.float32)
  shapes = [(4, 6, 11), (7, 3, 11), (5, 6, 9)]  # (r, k, d_out)
  layers = []
  for j, (r, k, d_out) in enumerate(shapes):
    _, a, b, idx, ws = _data((1,), 30, r, k, d_out, seed=seed + j + 1)
    layers.append((a, b, idx, ws))
  layers[1] = layers[1][:2] + (np.sort(np.concatenate([layers[0][2][:2], [29]])).astype(np.int32),) + layers[1][3:]
  return x, layers


@pytest.mark.parametrize("impl", ["fused_concat", "fused_onehot", "gather_xla"])
@pytest.mark.parametrize("act", [None, "silu"])
def test_group_equals_separate_layers(impl, act):
  x, layers = _group_data()
  gamma = 0.35
  a, b, idx, ws = (tuple(l[i] for l in layers) for i in range(4))
  assert set(idx[0]) & set(idx[1])  # shared channels are gathered and scattered twice
  ys = lost_group_matmul(x, a, b, idx, ws, gamma, act=act, impl=impl)
  assert len(ys) == 3
  for y, l in zip(ys, layers):
    np.testing.assert_allclose(np.asarray(y), _np_lost(x, *l, gamma, act), rtol=1e-5, atol=1e-5)

  weights = [np.cos(np.arange(np.prod(y.shape))).reshape(y.shape) for y in ys]
  def loss(x_, a_, b_, ws_, g_):
    out = lost_group_matmul(x_, a_, b_, idx, ws_, g_, act=act, impl=impl)
    return sum(jnp.sum(w * jnp.sin(o)) for w, o in zip(weights, out))
  def ref_loss(x_, a_, b_, ws_, g_):
    return sum(jnp.sum(w * jnp.sin(_plain(x_, a_[j], b_[j], idx[j], ws_[j], g_, act)))
               for j, w in enumerate(weights))
  args = (x, a, b, ws, jnp.float32(gamma))
  got = jax.jit(jax.grad(loss, argnums=range(5)))(*args)
  ref = jax.grad(ref_loss, argnums=range(5))(*args)
  for name, g, rr in zip(["x", "a", "b", "ws", "gamma"], got, ref):
    for gl, rl in zip(jax.tree.leaves(g), jax.tree.leaves(rr)):
      np.testing.assert_allclose(np.asarray(gl), np.asarray(rl), rtol=2e-5, atol=2e-5, err_msg=name)


def test_group_of_one_is_lost_matmul_and_bf16():
  x, layers = _group_data(seed=5)
  cast = lambda t: jnp.asarray(t, jnp.bfloat16)
  a, b, idx, ws = layers[0]
  (y,) = lost_group_matmul(cast(x), [cast(a)], [cast(b)], [idx], [cast(ws)], 0.5, act="silu")
  ref = lost_matmul(cast(x), cast(a), cast(b), idx, cast(ws), 0.5, act="silu")
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32)))
  ys = lost_group_matmul(cast(x), *[[cast(l[i]) if i != 2 else l[i] for l in layers] for i in range(4)], 0.5)
  for y, l in zip(ys, layers):
    ref = _np_lost(np.asarray(cast(x).astype(jnp.float32)), *[np.asarray(cast(t).astype(jnp.float32))
                   if i != 2 else t for i, t in enumerate(l)], 0.5, None)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, rtol=3e-2, atol=5e-2)


@pytest.mark.parametrize("mutate,match", [
    (lambda s: (s[0], s[1][:2], s[2], s[3]), "equal non-zero length"),
    (lambda s: ((), (), (), ()), "equal non-zero length"),
    (lambda s: (s[0][:1] + (np.ones((29, 7), np.float32),) + s[0][2:], s[1], s[2], s[3]), r"a\[1\] must"),
    (lambda s: (s[0], s[1], s[2][:2] + (s[2][2][:-1],), s[3]), r"idx\[2\] must have shape"),
    (lambda s: (s[0], s[1], s[2][:2] + (s[2][2].astype(np.float32),), s[3]), r"idx\[2\] must be integer"),
])
def test_group_bad_input_raises(mutate, match):
  x, layers = _group_data()
  seqs = mutate(tuple(tuple(l[i] for l in layers) for i in range(4)))
  with pytest.raises(ValueError, match=match):
    lost_group_matmul(x, *seqs, 0.5)
  with pytest.raises(ValueError, match="unknown sparse_impl 'triton'"):
    lost_group_matmul(x, *(tuple(l[i] for l in layers) for i in range(4)), 0.5, impl="triton")
