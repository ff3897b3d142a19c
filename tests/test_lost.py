"""LOST layer: init identity vs numpy SVD, channel choice, static indices, reference-code bugs not reproduced."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lostjax.layers import Lost, SparseIndex, decompose, make_linear
from lostjax.layers.common import dense_init


def _numpy_reference(w0, rank, sparsity):
  """Independent numpy transcription of LOST init (arXiv 2508.02668, §3), float64."""
  w0 = np.asarray(w0, np.float64)
  u, s, vt = np.linalg.svd(w0, full_matrices=False)
  w_r = (u[:, :rank] * s[:rank]) @ vt[:rank]
  resid = w0 - w_r
  scores = np.sqrt((resid ** 2).sum(axis=1))
  k = int(np.floor(sparsity * w0.shape[0] + 1e-9))
  idx = np.sort(np.argsort(-scores, kind="stable")[:k])
  return w_r, idx, w0[idx]


@pytest.mark.parametrize("d_in,d_out,rank,s", [(48, 40, 8, 0.25), (40, 64, 12, 0.1), (33, 17, 5, 0.3)])
def test_decompose_matches_numpy(d_in, d_out, rank, s):
  w0 = dense_init(jax.random.key(1), d_in, d_out, 0.02)
  dec = decompose(w0, rank, s)
  w_r, idx, ws = _numpy_reference(w0, rank, s)
  np.testing.assert_allclose(np.asarray(dec.a @ dec.b), w_r, atol=2e-6)
  np.testing.assert_array_equal(np.asarray(dec.idx), idx)
  np.testing.assert_allclose(np.asarray(dec.w_sparse), ws, atol=0)
  # A = U_r sqrt(S), B = sqrt(S) V_r^T: equal column/row norms (balanced factors)
  np.testing.assert_allclose(np.linalg.norm(dec.a, axis=0), np.linalg.norm(dec.b, axis=1), rtol=1e-5)
  assert dec.idx.dtype == jnp.int32 and np.all(np.diff(np.asarray(dec.idx)) > 0)


def test_layer_output_at_init_equals_formula():
  d_in, d_out, rank, s, gamma = 64, 48, 8, 0.25, 0.3
  layer = Lost(d_in, d_out, rank=rank, sparsity=s, gamma=gamma, rngs=nnx.Rngs(3), sparse_impl="gather_xla")
  # The layer drew W0 with the first params key of Rngs(3); redraw it independently.
  w0 = np.asarray(dense_init(nnx.Rngs(3).params(), d_in, d_out, 0.02), np.float64)
  w_r, idx, ws = _numpy_reference(w0, rank, s)
  x = np.asarray(jax.random.normal(jax.random.key(9), (5, d_in)), np.float64)
  expected = gamma * x @ w_r + (1 - gamma) * x[:, idx] @ ws
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))), expected, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(layer.idx[...]), idx)


def test_residual_rank_and_l1_and_residual_values():
  w0 = dense_init(jax.random.key(2), 40, 30, 1.0)
  u, s, vt = np.linalg.svd(np.asarray(w0, np.float64), full_matrices=False)
  resid = (u[:, 4:10] * s[4:10]) @ vt[4:10]
  dec = decompose(w0, 4, 0.2, score="l1", residual_rank=6, sparse_values="residual")
  idx = np.sort(np.argsort(-np.abs(resid).sum(1), kind="stable")[:8])
  np.testing.assert_array_equal(np.asarray(dec.idx), idx)
  np.testing.assert_allclose(np.asarray(dec.w_sparse), resid[idx], atol=1e-5)


def test_random_score_is_seeded_and_needs_key():
  w0 = dense_init(jax.random.key(2), 40, 30, 1.0)
  a = decompose(w0, 4, 0.2, score="random", key=jax.random.key(0))
  b = decompose(w0, 4, 0.2, score="random", key=jax.random.key(0))
  np.testing.assert_array_equal(a.idx, b.idx)
  with pytest.raises(ValueError, match="random"):
    decompose(w0, 4, 0.2, score="random")


def test_svd_is_of_full_rank_w0_not_of_lowrank_product():
  """Dev-code bug 1: the SVD must be of a full-rank draw, so residual singular values are far from 0."""
  d = 32
  layer = Lost(d, d, rank=4, sparsity=0.25, rngs=nnx.Rngs(0), sparse_impl="gather_xla")
  w0 = np.asarray(dense_init(nnx.Rngs(0).params(), d, d, 0.02))
  s = np.linalg.svd(w0, compute_uv=False)
  assert s[4] > 0.2 * s[0]  # a genuinely full-rank matrix
  # and the sparse rows are rows of that W0 (not of a rank-4 product)
  np.testing.assert_allclose(np.asarray(layer.w_sparse[...]), w0[np.asarray(layer.idx[...])])


def test_factors_not_rerandomised_and_no_bias():
  """Dev-code bugs 2 and 4: A·B is the truncated SVD of the W0 that W_s was taken from; no bias leaf."""
  layer = Lost(24, 20, rank=4, sparsity=0.25, rngs=nnx.Rngs(5), sparse_impl="gather_xla")
  w0 = np.asarray(dense_init(nnx.Rngs(5).params(), 24, 20, 0.02), np.float64)
  w_r, _, _ = _numpy_reference(w0, 4, 0.25)
  np.testing.assert_allclose(np.asarray(layer.a[...] @ layer.b[...]), w_r, atol=1e-7)
  names = {str(p[-1]) for p, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  assert names == {"a", "b", "w_sparse"}


def test_indices_static_and_factors_trained():
  layer = Lost(32, 16, rank=4, sparsity=0.25, rngs=nnx.Rngs(0), sparse_impl="gather_xla")
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  assert all(isinstance(v, SparseIndex) for v in jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable)))
  idx0 = np.asarray(layer.idx[...])
  tx = optax.adam(1e-2)
  opt = tx.init(params)
  x = jax.random.normal(jax.random.key(1), (64, 32))
  y = jax.random.normal(jax.random.key(2), (64, 16))

  @jax.jit
  def step(params, rest, opt):
    def loss(p):
      return jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)
    g = jax.grad(loss)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, g

  p0 = params
  for _ in range(3):
    params, opt, g = step(params, rest, opt)
  # gradients reach exactly the trainable leaves (the optimizer never sees the indices)
  assert set(nnx.to_pure_dict(g)) == {"a", "b", "w_sparse"}
  for name in ("a", "b", "w_sparse"):
    assert not np.allclose(nnx.to_pure_dict(params)[name], nnx.to_pure_dict(p0)[name])
  nnx.update(layer, params, rest)
  np.testing.assert_array_equal(np.asarray(layer.idx[...]), idx0)


def test_bf16_compute():
  layer = Lost(32, 16, rank=4, sparsity=0.25, rngs=nnx.Rngs(0), dtype="bfloat16", sparse_impl="gather_xla")
  x = jax.random.normal(jax.random.key(1), (4, 32))
  y = layer(x)
  assert y.dtype == jnp.bfloat16 and layer.a[...].dtype == jnp.float32
  ref = Lost(32, 16, rank=4, sparsity=0.25, rngs=nnx.Rngs(0), sparse_impl="gather_xla")(x)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=3e-2 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("impl", ["auto", "fused_concat", "fused_onehot", "gather_onehot_grad", "pallas_tpu"])
def test_sparse_impls_agree(impl):
  x = jax.random.normal(jax.random.key(1), (3, 5, 32))
  ref = Lost(32, 24, rank=4, sparsity=0.25, rngs=nnx.Rngs(0), activation="silu", sparse_impl="gather_xla")
  other = Lost(32, 24, rank=4, sparsity=0.25, rngs=nnx.Rngs(0), activation="silu", sparse_impl=impl)
  np.testing.assert_allclose(np.asarray(other(x)), np.asarray(ref(x)), atol=1e-6)
  grad = lambda m: jax.grad(lambda p: jnp.sum(nnx.merge(nnx.graphdef(m), p, nnx.state(m, SparseIndex))(x) ** 2))(
      nnx.state(m, nnx.Param))
  for a, b in zip(jax.tree.leaves(grad(other)), jax.tree.leaves(grad(ref))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_zero_sparsity_is_scaled_lowrank():
  layer = Lost(16, 16, rank=4, sparsity=0.0, gamma=0.5, rngs=nnx.Rngs(0), sparse_impl="gather_xla")
  assert layer.k == 0
  x = jnp.ones((2, 16))
  np.testing.assert_allclose(layer(x), 0.5 * x @ layer.a[...] @ layer.b[...], rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=16), "rank"), (dict(rank=20), "rank"), (dict(rank=0), "rank"),
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
    (dict(gamma=1.5), "gamma"), (dict(score="l3"), "l3"), (dict(activation="swish2"), "swish2"),
    (dict(sparse_impl="cuda"), "cuda"),
])
def test_bad_input(kwargs, match):
  args = dict(rank=4, sparsity=0.1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    Lost(16, 24, rngs=nnx.Rngs(0), **args)


def test_unknown_kind():
  with pytest.raises(ValueError, match="sparse_dense"):
    make_linear("sparse_dense", 4, 4, rngs=nnx.Rngs(0))
