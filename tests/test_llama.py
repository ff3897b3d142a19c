"""LLaMA decoder: shapes/dtypes, causality, presets, parameter counts, bad config, 8-device mesh."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lostjax import sharding
from lostjax.models import PRESETS, Llama, LlamaConfig, count_params, lost_closed_form, preset


def _tiny(**kw):
  base = dict(attn_rank=8, mlp_rank=8, sparsity=0.1, sparse_impl="xla")
  base.update(kw)
  return preset("tiny", **base)


@pytest.mark.parametrize("kind", ["dense", "lowrank", "lost"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_shapes_and_dtypes(kind, dtype):
  cfg = _tiny(attn_kind=kind, mlp_kind=kind, dtype=dtype)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
  logits = model(tokens)
  assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("kind", ["dense", "lost"])
def test_causal_mask(kind):
  cfg = _tiny(attn_kind=kind, mlp_kind=kind)
  model = Llama(cfg, rngs=nnx.Rngs(1))
  tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, cfg.vocab_size)
  changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % cfg.vocab_size)
  a, b = model(tokens), model(changed)
  np.testing.assert_array_equal(np.asarray(a[0, :6]), np.asarray(b[0, :6]))
  assert not np.allclose(a[0, 6:], b[0, 6:])


def test_rotary_matches_complex_rotation():
  from lostjax.models.llama import rotary
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 5, 2, 8)), np.float64)
  pos = np.arange(5)[None]
  out = np.asarray(rotary(jnp.asarray(x, jnp.float32), jnp.asarray(pos), 10000.0))
  half = 4
  freq = 1.0 / 10000.0 ** (np.arange(half) / half)
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * pos[0][None, :, None, None] * freq)
  np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], -1), atol=1e-5)


def _closed_form(cfg: LlamaConfig):
  d, ff, L, V = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size
  shapes = {"attn": [(d, d)] * 4, "mlp": [(d, ff), (d, ff), (ff, d)]}

  def count(kind, rank, din, dout):
    if kind == "dense":
      return din * dout
    if kind == "lowrank":
      return rank * (din + dout)
    return rank * (din + dout) + math.floor(cfg.sparsity * din + 1e-9) * dout

  linear = L * (sum(count(cfg.attn_kind, cfg.attn_rank, *s) for s in shapes["attn"])
                + sum(count(cfg.mlp_kind, cfg.mlp_rank, *s) for s in shapes["mlp"]))
  dense_linear = L * (4 * d * d + 3 * d * ff)
  other = 2 * V * d + (2 * L + 1) * d
  idx = 0
  if cfg.attn_kind == "lost":
    idx += L * 4 * math.floor(cfg.sparsity * d + 1e-9)
  if cfg.mlp_kind == "lost":
    idx += L * (2 * math.floor(cfg.sparsity * d + 1e-9) + math.floor(cfg.sparsity * ff + 1e-9))
  return dict(total=linear + other, linear=linear, dense_equivalent=dense_linear + other, index_count=idx)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("kind", ["dense", "lowrank", "lost"])
def test_param_counts_every_preset(name, kind):
  cfg = preset(name, attn_kind=kind, mlp_kind=kind)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  got = count_params(abstract)
  want = _closed_form(cfg)
  for key, value in want.items():
    assert got[key] == value, (key, got[key], value)
  assert got["index_bytes"] == 4 * want["index_count"]
  assert got["trainable"] == got["total"]


def test_published_sizes():
  # GaLore/LOST naming: dense 60M/130M/350M/1B have ~58M/134M/368M/1.34B parameters.
  expect = {"60m": 58.1e6, "130m": 134.1e6, "350m": 368.0e6, "1b": 1339e6}
  for name, n in expect.items():
    got = count_params(nnx.eval_shape(lambda: Llama(preset(name), rngs=nnx.Rngs(0))))["total"]
    assert abs(got - n) / n < 0.003, (name, got)
  lost350 = count_params(nnx.eval_shape(lambda: Llama(
      preset("350m", attn_kind="lost", mlp_kind="lost"), rngs=nnx.Rngs(0))))["total"]
  assert abs(lost350 - 200.3e6) / 200.3e6 < 0.003


def test_lost_closed_form_function():
  assert lost_closed_form(1024, 2736, 256, 0.05) == 256 * (1024 + 2736) + 51 * 2736


@pytest.mark.parametrize("kw,match", [
    (dict(n_heads=5), "n_heads"), (dict(attn_kind="sparse"), "sparse"), (dict(d_model=0), "d_model"),
    (dict(sparse_impl="cuda"), "cuda"), (dict(fuse_projections=1), "fuse_projections"),
])
def test_bad_config(kw, match):
  with pytest.raises(ValueError, match=match):
    preset("tiny", **kw)


def test_bad_preset_and_rank():
  with pytest.raises(ValueError, match="13m"):
    preset("13m")
  with pytest.raises(ValueError, match="rank"):
    Llama(preset("tiny", attn_kind="lost", attn_rank=64), rngs=nnx.Rngs(0))


def test_sequence_too_long():
  model = Llama(_tiny(max_seq_len=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_seq_len"):
    model(jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("sharded,impl", [(False, "xla"), pytest.param(False, "fused", marks=pytest.mark.slow),
                                          pytest.param(True, "xla", marks=pytest.mark.slow)])
def test_forward_under_8_device_mesh(sharded, impl):
  assert jax.device_count() == 8
  cfg = _tiny(attn_kind="lost", mlp_kind="lost", sparse_impl=impl)  # 'fused': grouped q/k/v, gate/up
  mesh = sharding.make_mesh(data=2, fsdp=4)
  graphdef, params, rest = sharding.init_module(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh, sharded=sharded)
  emb = params["embed"]["embedding"][...]
  assert emb.sharding.spec == jax.P(None, "fsdp") and len(emb.sharding.device_set) == 8
  assert params["layers"][0]["mlp"]["gate"]["a"][...].sharding.spec == jax.P("fsdp", None)
  tokens = jax.device_put(jax.random.randint(jax.random.key(0), (8, 16), 0, cfg.vocab_size),
                          sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda p, r, t: nnx.merge(graphdef, p, r)(t))(params, rest, tokens)
  assert len(logits.sharding.device_set) == 8
  single = jax.jit(lambda t: Llama(cfg, rngs=nnx.Rngs(0))(t))(jax.device_get(tokens))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(single), atol=1e-5)


def test_mesh_bad_shape():
  with pytest.raises(ValueError, match="fsdp=3"):
    sharding.make_mesh(fsdp=3)


@pytest.mark.parametrize("kind,impl", [("dense", "xla"), ("lowrank", "xla"), ("lost", "fused"),
                                       ("lost", "fused_onehot"), ("lost", "xla")])
def test_fused_projections_same_function(kind, impl):
  """q/k/v and gate/up computed together (lostjax.layers.group) == one by one: outputs and every gradient."""
  cfgs = [_tiny(attn_kind=kind, mlp_kind=kind, sparse_impl=impl, lowrank_act="silu", fuse_projections=f)
          for f in (True, False)]
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfgs[0].vocab_size)
  outs = []
  for cfg in cfgs:
    graphdef, params, rest = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(tokens))[..., 3])
    outs.append(jax.jit(jax.value_and_grad(loss))(params))
  (v1, g1), (v2, g2) = outs
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  assert jax.tree.structure(g1) == jax.tree.structure(g2)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_fused_dense_projections_under_tensor_parallel_mesh():
  cfg = _tiny(fuse_projections=True)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  graphdef, params, rest = sharding.init_module(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  tokens = jax.device_put(jax.random.randint(jax.random.key(0), (4, 16), 0, cfg.vocab_size),
                          sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda p, r, t: nnx.merge(graphdef, p, r)(t))(params, rest, tokens)
  single = jax.jit(lambda t: Llama(_tiny(fuse_projections=False), rngs=nnx.Rngs(0))(t))(jax.device_get(tokens))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(single), atol=1e-5)
