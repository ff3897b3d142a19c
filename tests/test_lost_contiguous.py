"""LOST MLP with down's sparse channels moved first (LOST, arXiv 2508.02668; `model.lost_contiguous_down`): the same
parameters up to a reordering of the d_ff channels, the same function and gradients, and a slice for the gather."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lostjax.layers import Lost
from lostjax.layers.lost import move_sparse_channels_first, permute_outputs
from lostjax.models import Llama, preset


def _cfg(**kw):
  base = dict(attn_kind="lost", mlp_kind="lost", attn_rank=8, mlp_rank=8, sparsity=0.1, n_layers=1)
  base.update(kw)
  return preset("tiny", **base)


@pytest.mark.parametrize("impl", ["gather_xla", "fused_concat"])
def test_layer_with_channels_first_is_the_formula_on_permuted_inputs(impl):
  layer = Lost(40, 24, rank=4, sparsity=0.1, gamma=0.3, activation="silu", sparse_impl=impl, rngs=nnx.Rngs(0))
  idx = np.asarray(layer.idx[...])
  a, b, ws = (np.asarray(v[...], np.float64) for v in (layer.a, layer.b, layer.w_sparse))
  perm = np.asarray(move_sparse_channels_first(layer))
  # oracle: the chosen channels in ascending order, then the others in ascending order
  np.testing.assert_array_equal(perm, np.concatenate([idx, np.setdiff1d(np.arange(40), idx)]))
  np.testing.assert_array_equal(np.asarray(layer.idx[...]), np.arange(4))
  assert layer.prefix
  x = np.asarray(jax.random.normal(jax.random.key(1), (3, 5, 40)), np.float64)
  h = x @ a
  expect = 0.3 * (h / (1 + np.exp(-h))) @ b + 0.7 * x[..., idx] @ ws     # the layer before the reordering
  y = layer(jnp.asarray(x[..., perm], jnp.float32))
  np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-4, atol=1e-6)
  # gradients: d/dx of the permuted layer = the permuted d/dx of the original formula (finite differences free)
  ref = Lost(40, 24, rank=4, sparsity=0.1, gamma=0.3, activation="silu", sparse_impl=impl, rngs=nnx.Rngs(0))
  xp = jnp.asarray(x, jnp.float32)
  g_ref = jax.grad(lambda v: jnp.sum(jnp.sin(ref(v))))(xp)
  g_new = jax.grad(lambda v: jnp.sum(jnp.sin(layer(v))))(xp[..., perm])
  np.testing.assert_allclose(np.asarray(g_new), np.asarray(g_ref)[..., perm], rtol=1e-4, atol=1e-6)


def test_permute_outputs():
  layer = Lost(16, 12, rank=4, sparsity=0.25, rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(0), (2, 16))
  y = layer(x)
  perm = jnp.asarray(np.random.default_rng(0).permutation(12), jnp.int32)
  permute_outputs(layer, perm)
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(y)[:, np.asarray(perm)], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", [pytest.param("gather_xla", marks=pytest.mark.slow), "fused_concat"])
def test_model_is_the_same_function_with_the_same_values(impl):
  models = [Llama(_cfg(sparse_impl=impl, lost_contiguous_down=f, attn_kind="dense"), rngs=nnx.Rngs(0))
            for f in (False, True)]
  old, new = (m.layers[0].mlp for m in models)
  idx = np.asarray(old.down.idx[...])
  perm = np.concatenate([idx, np.setdiff1d(np.arange(old.down.d_in), idx)])
  np.testing.assert_array_equal(np.asarray(new.down.a[...]), np.asarray(old.down.a[...])[perm])
  np.testing.assert_array_equal(np.asarray(new.down.w_sparse[...]), np.asarray(old.down.w_sparse[...]))
  for proj in ("gate", "up"):
    for leaf in ("b", "w_sparse"):
      np.testing.assert_array_equal(np.asarray(getattr(getattr(new, proj), leaf)[...]),
                                    np.asarray(getattr(getattr(old, proj), leaf)[...])[:, perm])
    np.testing.assert_array_equal(np.asarray(getattr(new, proj).a[...]), np.asarray(getattr(old, proj).a[...]))
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, models[0].cfg.vocab_size)
  out = []
  for m in models:
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(tokens))[..., 3])
    out.append(jax.jit(jax.value_and_grad(loss))(params))
  (v0, g0), (v1, g1) = out
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
  mlp0, mlp1 = g0["layers"][0]["mlp"], g1["layers"][0]["mlp"]
  np.testing.assert_allclose(np.asarray(mlp1["down"]["a"][...]), np.asarray(mlp0["down"]["a"][...])[perm],
                             rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(np.asarray(mlp1["up"]["b"][...]), np.asarray(mlp0["up"]["b"][...])[:, perm],
                             rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(np.asarray(mlp1["gate"]["a"][...]), np.asarray(mlp0["gate"]["a"][...]),
                             rtol=1e-4, atol=1e-8)


def test_config_checks():
  with pytest.raises(ValueError, match="lost_contiguous_down must be a bool"):
    _cfg(lost_contiguous_down=1)
  with pytest.raises(ValueError, match="mlp_kind='dense'"):
    preset("tiny", lost_contiguous_down=True)


@pytest.mark.slow
def test_import_from_hf_builds_the_same_function(tmp_path):
  """`train.export.hf_values` (HF import) writes the reordered values when the config asks for them."""
  from train import export
  folder = str(tmp_path / "hf")
  export.write_hf(Llama(preset("tiny", n_layers=1, max_seq_len=32), rngs=nnx.Rngs(0)), folder)
  _, tensors = export.read_hf(folder)
  tokens = jax.random.randint(jax.random.key(4), (2, 10), 0, 257)
  logits = []
  for flag in (False, True):
    mcfg = _cfg(lost_contiguous_down=flag, max_seq_len=32)
    values = export.hf_values(tensors, mcfg, folder, method="lost", rank=8, sparsity=0.1)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    model = nnx.merge(graphdef, export.fill_state(params, values), export.fill_state(rest, values))
    assert model.layers[0].mlp.down.prefix == flag
    logits.append(np.asarray(model(tokens)))
  np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.down.idx[...]), np.arange(model.layers[0].mlp.down.k))
  np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5)
