"""Tests for the sparse-path registry (lostjax.kernels.registry): one resolver for every level of the LOST
sparse branch (arXiv 2508.02668), its per-backend 'auto' table, legacy aliases of old run configs, and that
every level (layer, grouped projections, lost_matmul, gather_matmul, model config) goes through it.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lostjax import kernels
from lostjax.kernels import registry
from lostjax.kernels.registry import ALIASES, AUTO, IMPLS, resolve_sparse_impl
from lostjax.layers import Lost
from lostjax.models import Llama, LlamaConfig, preset

OLD_NAMES = {"auto": "auto", "xla": "gather_xla", "xla_onehot": "gather_onehot_grad", "pallas": "pallas_gpu",
             "fused": "fused_concat", "fused_onehot": "fused_onehot"}  # model.sparse_impl before the registry


def test_auto_table_per_backend():
  assert resolve_sparse_impl("auto", "cpu").name == "fused_concat"
  assert resolve_sparse_impl("auto", "gpu").name == "gather_xla"
  assert resolve_sparse_impl("auto", "tpu").name == "gather_xla"  # until a TPU measurement favours pallas_tpu
  assert resolve_sparse_impl("auto", "rocm").name == "gather_xla"  # unlisted backend: the XLA gather
  assert resolve_sparse_impl("auto").name == AUTO[jax.default_backend()]  # default: this process's backend
  assert all(v in IMPLS for v in AUTO.values())


def test_entries_and_backends():
  for name, e in IMPLS.items():
    assert e.name == name and e.gather in ("xla", "pallas_gpu", "pallas_tpu") and e.dx in ("scatter", "onehot")
    assert e.fused in (None, "concat", "onehot")
    assert resolve_sparse_impl(name, "cpu") is e  # CPU runs everything (Pallas in interpret mode)
  for backend in ("gpu", "tpu"):
    ok = {n for n in IMPLS if not IMPLS[n].is_pallas or backend in IMPLS[n].backends}
    for name in IMPLS:
      if name in ok:
        assert resolve_sparse_impl(name, backend).name == name
      else:
        with pytest.raises(ValueError, match=f"not on backend '{backend}'"):
          resolve_sparse_impl(name, backend)
  assert {n for n in IMPLS if IMPLS[n].fused} == {"fused_concat", "fused_onehot"}


def test_aliases_map_old_names():
  for old, new in OLD_NAMES.items():
    assert registry.canonical_name(old) == new
  assert ALIASES["concat"] == "fused_concat" and ALIASES["separate"] == "gather_xla"
  assert all(v in IMPLS for v in ALIASES.values())


@pytest.mark.parametrize("bad", ["cuda", "", "Fused", None, 3])
def test_bad_names_raise(bad):
  with pytest.raises(ValueError, match="sparse_impl"):
    resolve_sparse_impl(bad)
  with pytest.raises(ValueError, match="model.sparse_impl"):
    preset("tiny", sparse_impl=bad)


def test_every_level_uses_the_resolver(monkeypatch):
  seen = []
  real = registry.resolve_sparse_impl

  def spy(name="auto", backend=None):
    seen.append(name)
    return real(name, backend)
  for mod in ("lostjax.kernels.gather_matmul", "lostjax.kernels.lost_matmul", "lostjax.layers.lost"):
    monkeypatch.setattr(__import__(mod, fromlist=["_"]), "resolve_sparse_impl", spy)
  x = jnp.ones((2, 8))
  idx = jnp.array([1, 4], jnp.int32)
  kernels.gather_matmul(x, idx, jnp.ones((2, 3)), impl="gather_onehot_grad")
  kernels.lost_matmul(x, jnp.ones((8, 2)), jnp.ones((2, 3)), idx, jnp.ones((2, 3)), 0.5, impl="fused_onehot")
  Lost(8, 6, rank=2, sparsity=0.25, rngs=nnx.Rngs(0), sparse_impl="xla_onehot")
  assert seen == ["gather_onehot_grad", "fused_onehot", "xla_onehot"]


def test_config_checks_the_name_without_starting_jax(monkeypatch):
  # LlamaConfig is built while configs load, before jax.distributed.initialize(): it checks the name in the
  # registry (aliases mapped) but must not query the backend; the layer resolves 'auto' when it is built.
  def no_backend():
    raise AssertionError("the config queried the JAX backend")
  monkeypatch.setattr(registry.jax, "default_backend", no_backend)
  assert LlamaConfig(sparse_impl="fused").sparse_impl == "fused_concat"  # stored under its registry name
  assert LlamaConfig(sparse_impl="auto").sparse_impl == "auto"
  assert LlamaConfig(sparse_impl="pallas_tpu").sparse_impl == "pallas_tpu"
  with pytest.raises(ValueError, match="model.sparse_impl: unknown sparse_impl 'cuda'"):
    LlamaConfig(sparse_impl="cuda")


def test_old_run_configs_build_the_same_model(tmp_path):
  # config.json of runs written before the registry: model.sparse_impl holds an old name
  base = dict(attn_kind="lost", mlp_kind="lost", attn_rank=8, mlp_rank=8, sparsity=0.1, n_layers=1)
  build = lambda cfg: nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))  # structure only, no compute
  for old, new in OLD_NAMES.items():
    fields = dict(vars(preset("tiny", **base)), sparse_impl=old)
    (tmp_path / "config.json").write_text(json.dumps({"model": fields}, default=dataclasses.asdict))
    stored = json.loads((tmp_path / "config.json").read_text())["model"]
    assert stored["sparse_impl"] == old
    model_old, model_new = build(LlamaConfig(**stored)), build(preset("tiny", sparse_impl=new, **base))
    lost_layers = [m for _, m in nnx.iter_graph(model_old) if isinstance(m, Lost)]
    assert lost_layers and all(m.sparse_impl == resolve_sparse_impl(new).name for m in lost_layers), old
    # same graph (static attributes included) and same state tree: the same model, checkpoints restore
    assert nnx.graphdef(model_old) == nnx.graphdef(model_new), old
    assert jax.tree.structure(nnx.state(model_old)) == jax.tree.structure(nnx.state(model_new)), old
