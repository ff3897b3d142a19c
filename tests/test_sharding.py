"""Sharding that does what it promises, on the 8 fake CPU devices of tests/conftest.py (a small LLaMA):

  * fsdp 8 spreads the train state over the 8 devices (⅛ of data parallelism's) and keeps no more temporaries
    than data parallelism (before activation sharding XLA gathered the whole batch's activations: 2.2× the
    temporaries): per device at most 1.1 × (data 8 − ⅞ of the state bytes), which needs each weight gathered
    layer by layer in the backward too (`lostjax.remat.checkpoint`; docs/benchmarks/sharding.md);
  * tensor 2 splits heads and the MLP hidden features: activations ≤ 0.6× data parallelism at the same rows per
    device;
  * XLA never falls back to replicating a tensor to reshard it ("Involuntary full rematerialization"), neither
    in the memory cases nor in the training runs (data 2 × fsdp 2 × tensor 2);
  * `--summary_only`'s estimate follows the mesh (±10 % of the compiled step);
  * training on fsdp / tensor meshes gives the losses and parameters of one device (1e-5 relative).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax import sharding
from train import state as state_lib
from train import summary
from train.configs.base import base_config, model_config


def _cfg(mesh: dict, *, devices=8, d=128, ff=344, layers=1, seq=128, batch=16, method="dense", opt="adamw"):
  c = base_config()
  c.model = model_config("small", method)
  c.model.update(dict(d_model=d, d_ff=ff, n_heads=4, n_layers=layers, attn_rank=d // 4, mlp_rank=d // 4,
                      sparsity=0.25, max_seq_len=seq, vocab_size=256))
  c.mesh.num_devices = devices
  c.mesh.data = mesh.get("data", -1)
  c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = mesh.get("fsdp", 1), mesh.get("tensor", 1), mesh.get("expert", 1)
  c.train.update(dict(global_batch=batch, seq_len=seq, steps=10))
  c.optim.name = opt
  return c


def _compiled(cfg):
  return state_lib.compiled_memory(cfg, mesh=state_lib.make_mesh(cfg))


def test_fsdp_and_tensor_memory_and_estimate():
  est = lambda c: summary.summarize(c)["memory_estimate_per_device_bytes"]
  d8, f8, d4t2, d4 = (_cfg({"data": 8}), _cfg({"fsdp": 8}), _cfg({"data": 4, "tensor": 2}),
                      _cfg({"data": 4}, devices=4))
  mem = {name: _compiled(c) for name, c in (("d8", d8), ("f8", f8), ("d4t2", d4t2), ("d4", d4))}
  for name, m in mem.items():
    assert m["involuntary_remat"] == 0, name
  e = {name: est(c) for name, c in (("d8", d8), ("f8", f8), ("d4t2", d4t2), ("d4", d4))}
  assert mem["f8"]["argument"] <= 1.1 * mem["d8"]["argument"] / 8, (mem["f8"], mem["d8"])
  assert mem["f8"]["temp"] <= 1.1 * mem["d8"]["temp"], (mem["f8"], mem["d8"])
  # ZeRO-3's promise: data parallelism less ⅞ of the parameter + gradient + optimizer bytes (within 10 %)
  state = e["d8"]["params"] + e["d8"]["grads"] + e["d8"]["optimizer"]
  assert mem["f8"]["total"] <= 1.1 * (mem["d8"]["total"] - 7 / 8 * state), (mem["f8"], mem["d8"], state)
  # activations = temporaries less the gradients (one per parameter byte held)
  act = lambda name: mem[name]["temp"] - e[name]["grads"]
  assert act("d4t2") <= 0.6 * act("d4"), (act("d4t2"), act("d4"))
  for name in mem:
    assert 0.9 <= e[name]["total"] / mem[name]["total"] <= 1.1, (name, e[name], mem[name])


@pytest.mark.parametrize("method,mesh,experts", [
    ("lost", {"fsdp": 8}, 0), pytest.param("lost", {"data": 4, "tensor": 2}, 0, marks=pytest.mark.slow),
    ("dense", {"data": 4, "expert": 2}, 4)])
def test_estimate_follows_the_mesh_lost_and_experts(method, mesh, experts):
  """LOST on fsdp and tensor meshes and a mixture of experts on an expert axis: the estimate within ±10 % of the
  compiled step (the experts' dispatch buffers, one group of rows per device, counted), no involuntary remat."""
  c = _cfg(mesh, method=method)
  if experts:
    c.model.update(dict(moe_experts=experts, moe_top_k=2))
  m = _compiled(c)
  e = summary.summarize(c)["memory_estimate_per_device_bytes"]
  assert m["involuntary_remat"] == 0, m
  assert 0.9 <= e["total"] / m["total"] <= 1.1, (method, mesh, e, m)


def test_embedding_lookup_never_holds_the_table_whole():
  """Under fsdp the lookup gathers the ids, not the [vocab, d] table: the compiled forward and backward keep less
  than one table's bytes of temporaries, and the values and the gradient are those of table[ids]."""
  from lostjax.layers import common
  mesh = sharding.make_mesh(fsdp=8)
  table = jnp.asarray(np.random.default_rng(0).normal(size=(4096, 64)), jnp.float32)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 4096, (16, 8)), jnp.int32)
  cot = jnp.asarray(np.random.default_rng(2).normal(size=(16, 8, 64)), jnp.float32)

  def loss(w, ids):
    return jnp.sum(sharding.sharded_lookup(common.param(w, ("vocab", "embed")), ids) * cot)
  w_sh = jax.NamedSharding(mesh, sharding.param_spec(("vocab", "embed"), table.shape, mesh))
  with jax.set_mesh(mesh):
    w = jax.device_put(table, w_sh)
    step = jax.jit(jax.value_and_grad(loss), in_shardings=(w_sh, sharding.batch_sharding(mesh)))
    compiled = step.lower(w, ids).compile()
    value, grad = step(w, ids)
  assert compiled.memory_analysis().temp_size_in_bytes < table.nbytes / 2, compiled.memory_analysis()
  assert grad.sharding.spec == w_sh.spec
  ref_value, ref_grad = jax.value_and_grad(lambda w: jnp.sum(jnp.take(w, ids, axis=0) * cot))(table)
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-6)


def _train(cfg, steps=3):
  mesh = state_lib.make_mesh(cfg)
  run = state_lib.create_train_state(cfg, mesh=mesh)
  from train.step import make_train_step
  state_sh = jax.tree.map(lambda x: x.sharding, run.state)
  step = jax.jit(make_train_step(run.graphdef, run.tx, run.schedule, cfg), in_shardings=(state_sh, None, None),
                 out_shardings=(state_sh, None))
  rng = np.random.default_rng(0)
  state, losses = run.state, []
  with jax.set_mesh(mesh), state_lib._captured_stderr() as log:   # XLA's warnings while compiling the step
    for _ in range(steps):
      b = cfg.train.global_batch
      tokens = jax.device_put(jnp.asarray(rng.integers(0, 256, (b, cfg.train.seq_len + 1)), jnp.int32),
                              sharding.batch_sharding(mesh))
      state, metrics = step(state, run.rest, {"tokens": tokens, "ids": jnp.arange(b, dtype=jnp.int32)})
      losses.append(float(metrics["loss"]))
  assert log.getvalue().count("Involuntary full rematerialization") == 0, (cfg.mesh, log.getvalue()[:2000])
  return np.array(losses), jax.tree.map(np.asarray, state["params"]), state["params"]


# small ranks and refresh periods so that the projections are rebuilt within the 3 steps
OPT_OVERRIDES = {"frugal": {"update_gap": 2}, "galore": {"rank": 2, "update_gap": 2},
                 "lift": {"lora_rank": 2, "filter_rank": 2, "update_gap": 2}, "trp": {}}


@pytest.mark.parametrize("opt", ["adamw"] + [pytest.param(o, marks=pytest.mark.slow)
                                             for o in ("frugal", "galore", "trp", "lift")])
def test_sharded_training_equals_one_device(opt):
  small = dict(d=32, ff=64, layers=1, seq=16, batch=8, method="lost", opt=opt)

  def cfg(mesh, devices=8):
    c = _cfg(mesh, devices=devices, **small)
    if opt in OPT_OVERRIDES:
      c.optim[opt].update(OPT_OVERRIDES[opt])
    return c
  ref_losses, ref_params, _ = _train(cfg({}, devices=1))
  meshes = [{"data": 2, "fsdp": 2, "tensor": 2}] + ([{"fsdp": 8}, {"data": 4, "tensor": 2}] if opt != "adamw" else [])
  for mesh in meshes:
    losses, params, _ = _train(cfg(mesh))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(mesh))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(mesh))


@pytest.mark.slow   # two compiled runs each; the default set checks GaLore's state placement below
@pytest.mark.parametrize("opt", ["frugal", "galore"])
def test_projection_optimizers_on_data_fsdp_tensor_equal_one_device(opt):
  """FRUGAL / GaLore on data 2 × fsdp 2 × tensor 2: the losses and parameters of one device after 3 steps (the
  projections rebuilt at step 2) and no involuntary rematerialisation."""
  def cfg(mesh, devices=8):
    c = _cfg(mesh, devices=devices, d=32, ff=64, layers=1, seq=16, batch=8, method="dense", opt=opt)
    c.optim[opt].update(OPT_OVERRIDES[opt])
    return c
  ref_losses, ref_params, _ = _train(cfg({}, devices=1))
  c = cfg({"data": 2, "fsdp": 2, "tensor": 2})
  losses, params, _ = _train(c)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_galore_projection_states_are_split():
  """GaLore's projections [d, r] (a d_out-side one stored [d_out, r] too) and projected moments [r, d] on
  data 2 × fsdp 2 × tensor 2 take their parameter's split of the side they share: none is replicated whole."""
  c = _cfg({"data": 2, "fsdp": 2, "tensor": 2}, d=32, ff=64, layers=1, seq=16, batch=8, opt="galore")
  c.optim.galore.update(OPT_OVERRIDES["galore"])
  run = state_lib.abstract_train_state(c, mesh=state_lib.make_mesh(c), model_cfg=state_lib.llama_config(c))
  low = [leaf for leaf in jax.tree.leaves(run.state["opt"]) if getattr(leaf, "ndim", 0) == 2 and 2 in leaf.shape]
  assert len(low) == 21 and all(any(e is not None for e in leaf.sharding.spec) for leaf in low), low


@pytest.mark.slow   # tests/test_moe.py checks an expert mesh against one device in the default set
def test_mixture_of_experts_on_an_expert_axis_equals_one_device():
  """A mixture of experts on data 4 × expert 2: the experts' weights split over the expert axis, the losses and
  parameters of one device after 3 steps, no involuntary rematerialisation."""
  def cfg(mesh, devices=8):
    c = _cfg(mesh, devices=devices, d=32, ff=64, layers=1, seq=16, batch=8, method="dense")
    c.model.update(dict(moe_experts=4, moe_top_k=2))
    return c
  ref_losses, ref_params, _ = _train(cfg({}, devices=1))
  losses, params, placed = _train(cfg({"data": 4, "expert": 2}))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  experts = [leaf for leaf in jax.tree.leaves(placed) if leaf.ndim == 3 and leaf.shape[0] == 4]
  assert experts and all(leaf.sharding.spec[0] == "expert" for leaf in experts), [l.sharding for l in experts]


def test_activation_constraints_follow_the_rules():
  mesh = jax.sharding.AbstractMesh((2, 2, 2, 1), sharding.MESH_AXES)
  spec = lambda names, shape: sharding.logical_to_mesh(names, shape, mesh)
  # rows over data × fsdp, features whole (never over fsdp), heads and MLP features over tensor
  assert spec(("activation_batch", "activation_length", "activation_embed"), (8, 4, 16)) == \
      jax.P(("data", "fsdp"), None, None)
  # even where the rows cannot be split (1 row), features are never split over fsdp
  assert spec(("activation_batch", "activation_length", "activation_embed"), (1, 4, 16)) == jax.P(None, None, None)
  assert spec(("activation_batch", "activation_length", "activation_mlp"), (8, 4, 16)) == \
      jax.P(("data", "fsdp"), None, "tensor")
  assert spec(("activation_batch", "activation_length", "activation_heads", "activation_kv"), (8, 4, 2, 8)) == \
      jax.P(("data", "fsdp"), None, "tensor", None)
  assert spec(("activation_batch", "activation_length", "activation_rank"), (8, 4, 16)) == \
      jax.P(("data", "fsdp"), None, None)
  # a weight with no embed dimension is still spread over fsdp (ZeRO-3)
  assert sharding.param_spec(("rank", "heads"), (4, 16), mesh) == jax.P(None, ("tensor", "fsdp"))
  assert sharding.param_spec(("embed", "heads"), (16, 16), mesh) == jax.P("fsdp", "tensor")
  x = jnp.ones((8, 4, 16))
  assert sharding.constrain(x, ("activation_batch", None, None)) is x     # no mesh: untouched
  with pytest.raises(ValueError, match="logical axis names"):
    sharding.constrain(x, ("activation_batch",))


def test_optimizer_state_follows_its_parameter():
  """Moments shaped like the parameter take its sharding; a projection [d_in, r] or [r, d_out] keeps the split of
  the side it shares with the parameter and is spread over fsdp if that side was not; counters are replicated."""
  mesh = sharding.make_mesh(2, 2, 2)
  sh = jax.sharding.NamedSharding(mesh, jax.P("fsdp", "tensor"))
  params = {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sh)}
  opt = {"mu": {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32)},
         "proj": {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32)},
         "low": {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
         "proj_t": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)},   # a d_out-side projection stored [d_out, r]
         "stacked": jax.ShapeDtypeStruct((2, 16, 8), jnp.float32),   # no parameter's path (FRUGAL's stacked moments)
         "count": jax.ShapeDtypeStruct((), jnp.int32)}
  got = state_lib.optimizer_shardings(opt, params, mesh)
  assert got["mu"]["w"].spec == jax.P("fsdp", "tensor")
  assert got["proj"]["w"].spec == jax.P("fsdp", None)
  # a side the parameter splits keeps that split; fsdp then spreads what it did not reach (ZeRO-3)
  assert got["low"]["w"].spec == jax.P("fsdp", "tensor")
  assert got["proj_t"]["w"].spec == jax.P(("tensor", "fsdp"), None)
  assert got["stacked"].spec == jax.P()
  assert got["count"].spec == jax.P()


def test_lost_residuals_are_split_over_tensor():
  """The fused LOST layer keeps its rank-r pre-activations h and gathered channels x[..., I] for the backward:
  on a tensor mesh they are stored split over `tensor` (the tensor devices hold the same rows), not whole."""
  from lostjax.kernels.lost_matmul import lost_matmul
  mesh = sharding.make_mesh(4, 1, 2)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 4, 16)), jnp.float32)
  a, b = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
  idx, w = jnp.array([1, 5], jnp.int32), jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)

  def residuals(x):
    _, vjp = jax.vjp(lambda x: lost_matmul(x, a, b, idx, w, 0.5, impl="fused_concat"), x)
    return [r for r in jax.tree.leaves(vjp) if r.shape in ((8, 4, 4), (8, 4, 2))]
  with jax.set_mesh(mesh):
    saved = jax.jit(residuals, in_shardings=sharding.batch_sharding(mesh, 3))(x)
  assert len(saved) == 2
  for r in saved:
    assert r.sharding.spec == jax.P("data", None, "tensor"), r.sharding


def test_lost_backward_reads_its_saved_values_after_the_cotangent():
  """The fused LOST layer's backward reads h and x[..., I] only through an exact zero computed from its cotangent:
  on a tensor mesh their all-gathers then wait for that layer's backward instead of all being issued (whole copies
  of every layer's values alive) before the first backward layer. Gradients are unchanged (the zero is exact);
  without a tensor split (nothing gathered) the backward reads them directly."""
  from lostjax.kernels.lost_matmul import lost_matmul
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 4, 16)), jnp.float32)
  a, b = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
  idx, w = jnp.array([1, 5], jnp.int32), jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
  with jax.set_mesh(sharding.make_mesh(4, 1, 2)):
    y, vjp = jax.vjp(lambda x: lost_matmul(x, a, b, idx, w, 0.5, impl="fused_concat"), x)
    closed = jax.make_jaxpr(vjp)(y)
  jaxpr = closed.jaxpr
  saved = [v for v, c in zip(jaxpr.constvars, closed.consts) if c.shape in ((8, 4, 4), (8, 4, 2))]
  assert len(saved) == 2
  from_ct = set(jaxpr.invars)   # everything computed from the cotangent
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jax.extend.core.Literal) and v in from_ct for v in eqn.invars):
      from_ct.update(eqn.outvars)
  for eqn in jaxpr.eqns:
    for v in saved:
      if v in eqn.invars:
        others = [u for u in eqn.invars if u is not v]
        assert eqn.primitive.name == "add" and all(u in from_ct for u in others), eqn
  _, vjp1 = jax.vjp(lambda x: lost_matmul(x, a, b, idx, w, 0.5, impl="fused_concat"), x)
  assert "gt" not in {e.primitive.name for e in jax.make_jaxpr(vjp1)(y).jaxpr.eqns}
