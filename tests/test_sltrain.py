"""lostjax/layers/sltrain.py (SLTrain, arXiv 2406.02214) against a float64 numpy transcription of W = A·B + S:
forward, gradients of A, B and the sparse values, the fixed random support, parameter counts, make_linear and a
LLaMA built of SLTrain projections (counted abstractly; the study's slow end-to-end grid trains one)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lostjax.layers import KINDS, SLTrain, make_linear
from lostjax.layers.sltrain import num_sparse_entries, sltrain_closed_form


def _np_weight(a, b, idx, values, d_in, d_out):
  s = np.zeros(d_in * d_out)
  s[idx] = values                                  # positions are distinct: assignment == scatter-add
  return a @ b + s.reshape(d_in, d_out)


def test_forward_and_gradients_match_numpy():
  d_in, d_out, r = 24, 40, 4
  layer = SLTrain(d_in, d_out, rank=r, density=0.03, rngs=nnx.Rngs(0))
  a, b = (np.asarray(layer.a[...], np.float64), np.asarray(layer.b[...], np.float64))
  idx, v = np.asarray(layer.idx[...]), np.asarray(layer.v[...], np.float64)
  assert layer.nnz == int(0.03 * d_in * d_out) == idx.size == v.size == 28
  x = np.random.default_rng(1).normal(size=(2, 5, d_in))
  c = np.random.default_rng(2).normal(size=(2, 5, d_out))
  w = _np_weight(a, b, idx, v, d_in, d_out)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))), x @ w, rtol=1e-5, atol=1e-6)
  # L = Σ c ⊙ y: ∂L/∂W = xᵀc summed over tokens; ∂A = G Bᵀ, ∂B = Aᵀ G, ∂v = G at the support.
  g = np.einsum("bti,bto->io", x, c)

  def loss(m, x):
    return jnp.sum(m(x) * jnp.asarray(c, jnp.float32))

  grads = nnx.grad(loss)(layer, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(grads.a[...]), g @ b.T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grads.b[...]), a.T @ g, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grads.v[...]), g.reshape(-1)[idx], rtol=1e-4, atol=1e-5)
  assert "idx" not in nnx.state(grads, nnx.Param)   # the support is not trained


def test_support_is_random_fixed_and_distinct():
  layer = SLTrain(64, 48, rank=8, density=0.05, rngs=nnx.Rngs(3))
  idx = np.asarray(layer.idx[...])
  assert idx.dtype == np.int32 and np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 64 * 48
  other = np.asarray(SLTrain(64, 48, rank=8, density=0.05, rngs=nnx.Rngs(4)).idx[...])
  assert not np.array_equal(idx, other)            # another key, another support
  rows = idx // 48
  assert len(np.unique(rows)) > 30                 # element-wise, spread over rows (not a column or row pattern)
  s = np.asarray(layer.sparse_matrix())
  assert np.count_nonzero(s) == idx.size and np.all(s.reshape(-1)[idx] == np.asarray(layer.v[...]))
  # One SGD step on a loss moves A, B and the values, never the support.
  params = nnx.state(layer, nnx.Param)
  graphdef, _, rest = nnx.split(layer, nnx.Param, ...)
  x = jnp.ones((3, 64))

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)

  g = jax.grad(loss)(params)
  new = jax.tree.map(lambda p, d: p - 0.1 * d, params, g)
  moved = nnx.merge(graphdef, new, rest)
  assert np.array_equal(np.asarray(moved.idx[...]), idx)
  assert not np.allclose(np.asarray(moved.v[...]), np.asarray(layer.v[...]))
  # Initial scale: the weight's entries have about the dense init's standard deviation (A·B) plus the sparse part.
  assert 0.015 < float(np.asarray(layer.weight()).std()) < 0.026


def test_counts_bad_input_and_make_linear():
  assert num_sparse_entries(512, 512, 0.03) == 7864 and num_sparse_entries(4, 4, 0.01) == 1
  assert sltrain_closed_form(512, 1376, 128, 0.03) == 128 * (512 + 1376) + int(0.03 * 512 * 1376)
  for bad in (0.0, 1.5, -0.1, True, "0.03"):
    with pytest.raises(ValueError, match="model.sparsity"):
      num_sparse_entries(8, 8, bad)
  with pytest.raises(ValueError, match="rank"):
    SLTrain(8, 8, rank=8, rngs=nnx.Rngs(0))
  assert "sltrain" in KINDS
  layer = make_linear("sltrain", 32, 16, rngs=nnx.Rngs(0), rank=4, sparsity=0.1)
  assert isinstance(layer, SLTrain) and layer.nnz == 51


def test_count_params_counts_sltrain_as_linear():
  from lostjax.models.accounting import count_params

  class Two(nnx.Module):
    def __init__(self):
      self.p = SLTrain(24, 40, rank=4, density=0.03, rngs=nnx.Rngs(0))

  counts = count_params(Two())
  assert counts["linear"] == counts["total"] == sltrain_closed_form(24, 40, 4, 0.03) == 4 * 64 + 28
  assert counts["index_count"] == 28 and counts["dense_equivalent"] == 24 * 40


@pytest.mark.slow
def test_llama_with_sltrain_projections():
  from lostjax.models import Llama, LlamaConfig
  from lostjax.models.accounting import count_params
  cfg = LlamaConfig(vocab_size=64, d_model=32, d_ff=64, n_heads=2, n_layers=1, max_seq_len=16, attn_kind="sltrain",
                    mlp_kind="sltrain", attn_rank=4, mlp_rank=4, sparsity=0.03)
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  counts = count_params(model)
  expect = 4 * sltrain_closed_form(32, 32, 4, 0.03) + 2 * sltrain_closed_form(32, 64, 4, 0.03) + sltrain_closed_form(
      64, 32, 4, 0.03)
  assert counts["linear"] == expect and counts["index_count"] == 4 * 30 + 3 * 61
