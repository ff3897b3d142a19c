"""Mixture-of-experts MLP (lostjax.models.moe) against a float64 numpy loop over tokens and experts.

Oracle: for each token, softmax of the router logits, top-k, gates renormalised over the top-k, SwiGLU of each
chosen expert, gate-weighted sum; in capacity mode assignments are served first choices first, tokens in order,
and an expert takes at most min(T, ceil(cf·T·k/E)) of them. Aux loss: E · Σ_e f_e P_e with f over all T·k
assignments. Gradients: central finite differences of the numpy forward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lostjax import sharding
from lostjax.models import Llama, count_params, lost_closed_form, preset
from lostjax.models.config import LlamaConfig
from lostjax.models.moe import MoeMlp, dispatch_plan, dropless_capacities


def _cfg(**kw):
  base = dict(vocab_size=50, d_model=16, d_ff=24, n_heads=2, n_layers=2, max_seq_len=32, moe_experts=4,
              moe_top_k=2, attn_rank=4, mlp_rank=4, sparsity=0.25)
  base.update(kw)
  return LlamaConfig(**base)


def _np_weights(moe: MoeMlp):
  st = nnx.state(moe, nnx.Param)
  get = lambda *p: np.asarray(st[p[0]][p[1]][p[2]][...] if len(p) == 3 else st[p[0]][p[1]][...], np.float64)
  return dict(router=get("router", "kernel"), gate=get("experts", "gate", "kernel"),
              up=get("experts", "up", "kernel"), down=get("experts", "down", "kernel"))


def _np_moe(x, w, top_k, capacity_factor, expert_fn=None):
  """float64 loop: returns (y [T, d], aux, dropped count, ids [T, k])."""
  t_count, d = x.shape
  e_count = w["router"].shape[1]
  silu = lambda z: z / (1.0 + np.exp(-z))
  if expert_fn is None:
    expert_fn = lambda e, v: (silu(v @ w["gate"][e]) * (v @ w["up"][e])) @ w["down"][e]
  logits = x @ w["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ids = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
  kept = np.ones((t_count, top_k), bool)
  if capacity_factor > 0:
    cap = min(t_count, math.ceil(capacity_factor * t_count * top_k / e_count))
    load = np.zeros(e_count, int)
    for j in range(top_k):
      for t in range(t_count):
        e = ids[t, j]
        kept[t, j] = load[e] < cap
        load[e] += kept[t, j]
  y = np.zeros((t_count, d))
  for t in range(t_count):
    denom = sum(probs[t, ids[t, j]] for j in range(top_k))
    for j in range(top_k):
      if kept[t, j]:
        y[t] += probs[t, ids[t, j]] / denom * expert_fn(ids[t, j], x[t])
  f = np.array([(ids == e).sum() for e in range(e_count)]) / ids.size
  aux = e_count * np.sum(f * probs.mean(0))
  return y, aux, int((~kept).sum()), ids


def _build(cfg, seed=0):
  moe = MoeMlp(cfg, nnx.Rngs(seed))
  x = np.asarray(jax.random.normal(jax.random.key(seed + 1), (2, 5, cfg.d_model)), np.float32)
  return moe, x


def _apply(moe, x):
  graphdef, state = nnx.split(moe)
  return jax.jit(lambda st, v: nnx.merge(graphdef, st)(v))(state, jnp.asarray(x))


@pytest.mark.parametrize("cf,top_k", [(0.0, 1), (0.0, 2), (0.5, 2), (1.0, 1),
                                      pytest.param(100.0, 2, marks=pytest.mark.slow)])
def test_forward_matches_numpy_loop(cf, top_k):
  cfg = _cfg(moe_capacity_factor=cf, moe_top_k=top_k)
  moe, x = _build(cfg)
  y, aux = _apply(moe, x)
  w = _np_weights(moe)
  want, want_aux, dropped, ids = _np_moe(x.reshape(-1, cfg.d_model).astype(np.float64), w, top_k, cf)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.d_model), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(aux["aux_loss"]), want_aux, rtol=1e-5)
  assert float(aux["dropped_frac"]) == pytest.approx(dropped / ids.size, abs=1e-7)
  np.testing.assert_array_equal(np.asarray(aux["expert_ids"]).reshape(-1, top_k), ids)
  gates = np.asarray(aux["expert_gates"])
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
  if cf == 0.0 or cf == 100.0:
    assert dropped == 0
  if cf == 0.5:
    assert dropped > 0   # C = ceil(0.5·10·k/4) < the load of the busiest expert


def test_capacity_drops_exact_count_skewed_router():
  """A router that sends every token to expert 0 first: exactly T - C first choices are dropped."""
  cfg = _cfg(moe_capacity_factor=1.0, moe_top_k=1)
  moe, x = _build(cfg)
  kernel = np.zeros((cfg.d_model, cfg.moe_experts), np.float32)
  x = np.abs(x)
  kernel[:, 0] = 5.0
  moe.router.kernel[...] = jnp.asarray(kernel)
  y, aux = _apply(moe, x)
  t = x.shape[0] * x.shape[1]
  cap = math.ceil(1.0 * t * 1 / cfg.moe_experts)
  assert float(aux["dropped_frac"]) == pytest.approx((t - cap) / t)
  y = np.asarray(y).reshape(t, -1)
  assert np.all(y[cap:] == 0.0) and np.all(np.abs(y[:cap]).sum(-1) > 0)   # the first C tokens (in order) are served
  assert float(aux["aux_loss"]) == pytest.approx(cfg.moe_experts * 1.0, rel=1e-4)  # f = P = one-hot on expert 0


def test_dropless_buckets_and_skewed_router():
  """Dropless picks the smallest compiled capacity holding the busiest expert: still no drop when one expert
  takes every token (capacity T), and the output equals the loop oracle."""
  assert dropless_capacities(10, 2, 4) == (7, 10)            # ceil(1.25·5), min(T, ceil(2·5)) = T
  assert dropless_capacities(64, 1, 8) == (10, 16, 64)
  cfg = _cfg(moe_capacity_factor=0.0, moe_top_k=1)
  moe, x = _build(cfg)
  x = np.abs(x)
  for strength in (0.0, 5.0):   # balanced-ish random router, then everything to expert 0
    kernel = np.asarray(moe.router.kernel[...]).copy()
    kernel[:, 0] += strength
    moe.router.kernel[...] = jnp.asarray(kernel)
    y, aux = _apply(moe, x)
    want, _, dropped, ids = _np_moe(x.reshape(-1, cfg.d_model).astype(np.float64), _np_weights(moe), 1, 0.0)
    assert dropped == 0 and float(aux["dropped_frac"]) == 0.0
    np.testing.assert_allclose(np.asarray(y).reshape(want.shape), want, rtol=1e-5, atol=1e-6)
  assert np.all(ids == 0)
  plan = dispatch_plan(jnp.asarray(ids), cfg.moe_experts, 3)           # capacity 3: first 3 tokens kept
  np.testing.assert_array_equal(np.asarray(plan.kept), np.arange(ids.size) < 3)


def _np_loss(x, w, top_k, cf, c):
  return float(np.sum(c * _np_moe(x, w, top_k, cf)[0]))


@pytest.mark.parametrize("cf", [0.0, 0.5])
def test_gradients_vs_finite_differences(cf):
  cfg = _cfg(moe_capacity_factor=cf)
  moe, x = _build(cfg, seed=3)
  x2 = x.reshape(-1, cfg.d_model).astype(np.float64)
  c = np.asarray(jax.random.normal(jax.random.key(9), x2.shape), np.float64)
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

  def loss(p):
    y, _ = nnx.merge(graphdef, p, rest)(jnp.asarray(x))
    return jnp.sum(jnp.asarray(c, jnp.float32) * y.reshape(c.shape))

  grads = jax.jit(jax.grad(loss))(params)
  w = _np_weights(moe)
  rng = np.random.default_rng(0)
  for name, g in (("router", grads["router"]["kernel"][...]), ("gate", grads["experts"]["gate"]["kernel"][...]),
                  ("down", grads["experts"]["down"]["kernel"][...])):
    g = np.asarray(g)
    flat = np.arange(g.size) if name == "router" else rng.choice(g.size, 24, replace=False)
    for i in flat:
      idx = np.unravel_index(i, g.shape)
      wp = {k: v.copy() for k, v in w.items()}
      wm = {k: v.copy() for k, v in w.items()}
      wp[name][idx] += 1e-5
      wm[name][idx] -= 1e-5
      fd = (_np_loss(x2, wp, cfg.moe_top_k, cf, c) - _np_loss(x2, wm, cfg.moe_top_k, cf, c)) / 2e-5
      assert abs(g[idx] - fd) <= 2e-4 + 2e-3 * abs(fd), (name, idx, g[idx], fd)
  assert np.abs(np.asarray(grads["router"]["kernel"][...])).max() > 0


def test_load_balancing_loss_gradient_reaches_the_router():
  """d aux / d W_r against central finite differences of the float64 numpy aux loss. The routed counts f_e are
  piecewise constant, so the finite differences see exactly the gradient that flows through P_e (the router's
  balancing signal); a router detached from the aux loss would get zeros."""
  cfg = _cfg(moe_capacity_factor=0.0)
  moe, x = _build(cfg, seed=5)
  x2 = x.reshape(-1, cfg.d_model).astype(np.float64)
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
  aux_of = lambda p: nnx.merge(graphdef, p, rest)(jnp.asarray(x))[1]["aux_loss"]
  g = np.asarray(jax.jit(jax.grad(aux_of))(params)["router"]["kernel"][...], np.float64)
  w = _np_weights(moe)
  fd = np.zeros_like(g)
  for idx in np.ndindex(*g.shape):
    wp = {k: v.copy() for k, v in w.items()}
    wm = {k: v.copy() for k, v in w.items()}
    wp["router"][idx] += 1e-5
    wm["router"][idx] -= 1e-5
    fd[idx] = (_np_moe(x2, wp, cfg.moe_top_k, 0.0)[1] - _np_moe(x2, wm, cfg.moe_top_k, 0.0)[1]) / 2e-5
  assert np.abs(fd).max() > 1e-3                  # the oracle itself sees a balancing gradient
  np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("kind", ["lowrank", "lost"])
def test_factorised_experts_match_routed_oracle(kind):
  """Low-rank / LOST experts (built by make_linear): the routed combination of each expert's own output."""
  cfg = _cfg(mlp_kind=kind, moe_capacity_factor=0.75)
  moe, x = _build(cfg)
  y, aux = _apply(moe, x)
  graphdef, state = nnx.split(moe.experts)

  def expert_fn(e, v):
    one = nnx.merge(graphdef, jax.tree.map(lambda a: a[e], state))
    return np.asarray(one(jnp.asarray(v[None], jnp.float32))[0], np.float64)

  w = dict(router=np.asarray(moe.router.kernel[...], np.float64))
  want, want_aux, dropped, _ = _np_moe(x.reshape(-1, cfg.d_model).astype(np.float64), w, cfg.moe_top_k, 0.75,
                                       expert_fn)
  np.testing.assert_allclose(np.asarray(y).reshape(want.shape), want, rtol=1e-4, atol=1e-6)
  assert float(aux["dropped_frac"]) == pytest.approx(dropped / (want.shape[0] * cfg.moe_top_k), abs=1e-7)
  # experts are distinct draws, each LOST expert with its own channel set
  leaves = nnx.state(moe.experts, nnx.Param)
  a = np.asarray(leaves["gate"]["a"][...])
  assert a.shape[0] == cfg.moe_experts and not np.allclose(a[0], a[1])


@pytest.mark.parametrize("kind", ["dense", pytest.param("lowrank", marks=pytest.mark.slow),
                                  pytest.param("lost", marks=pytest.mark.slow)])
def test_llama_moe_every_kind_trains(kind):
  """value_and_grad of CE + aux through the whole model (low-rank/LOST experts' forward is checked by default in
  test_factorised_experts_match_routed_oracle; their full-model gradients run with -m slow)."""
  cfg = _cfg(attn_kind=kind, mlp_kind=kind, moe_aux_weight=0.1, n_layers=1)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits, aux = nnx.merge(graphdef, p, rest)(tokens, return_aux=True)
    return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["moe_aux_loss"], aux

  (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert np.isfinite(float(value)) and set(aux) == {"moe_aux_loss", "moe_dropped_frac"}
  assert all(a.dtype == jnp.float32 and a.shape == () for a in aux.values())
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.abs(np.asarray(grads["layers"][0]["mlp"]["router"]["kernel"][...])).max() > 0


def test_llama_aux_and_route_consistent():
  cfg = _cfg(moe_capacity_factor=0.0, moe_aux_weight=0.3, moe_top_k=2)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 7), 0, cfg.vocab_size)
  logits, aux = model(tokens, return_aux=True)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(model(tokens)))
  r = model.route(tokens)
  assert r.ids.shape == (cfg.n_layers, 3, 7, 2) and r.gates.shape == r.ids.shape
  assert r.probs.shape == (cfg.n_layers, 3, 7, cfg.moe_experts) and r.ids.dtype == jnp.int32
  probs = np.asarray(r.probs, np.float64)
  ids = np.argsort(-probs, -1, kind="stable")[..., :2]
  np.testing.assert_array_equal(np.asarray(r.ids), ids)
  top = np.take_along_axis(probs, ids, -1)
  np.testing.assert_allclose(np.asarray(r.gates), top / top.sum(-1, keepdims=True), rtol=1e-6)
  per_layer = []
  for layer in range(cfg.n_layers):
    p, i = probs[layer].reshape(-1, cfg.moe_experts), ids[layer].reshape(-1, 2)
    f = np.array([(i == e).sum() for e in range(cfg.moe_experts)]) / i.size
    per_layer.append(cfg.moe_experts * np.sum(f * p.mean(0)))
  np.testing.assert_allclose(float(aux["moe_aux_loss"]), 0.3 * np.mean(per_layer), rtol=1e-5)
  assert float(aux["moe_dropped_frac"]) == 0.0
  with pytest.raises(ValueError, match="moe_experts=0"):
    Llama(_cfg(moe_experts=0), rngs=nnx.Rngs(0)).route(tokens)


def test_single_expert_is_the_dense_mlp():
  """E = 1, k = 1: the gate is 1 and the MoE MLP is the SwiGLU MLP with the expert's weights."""
  from lostjax.models.llama import Mlp
  cfg = _cfg(moe_experts=1, moe_top_k=1)
  moe, x = _build(cfg)
  dense = Mlp(_cfg(moe_experts=0), nnx.Rngs(5))
  nnx.update(dense, jax.tree.map(lambda a: a[0], nnx.state(moe.experts)))
  y, aux = _apply(moe, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(_apply(dense, x)), rtol=1e-6, atol=1e-7)
  assert float(aux["aux_loss"]) == pytest.approx(1.0)


@pytest.mark.parametrize("remat", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_moe_off_is_the_dense_model(remat):
  """moe_experts=0: the same parameter tree as the dense model, logits = the blocks composed by hand, aux = {}."""
  cfg = _cfg(moe_experts=0, remat=remat)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert {p for p in paths if "/mlp/" in p} == {f"layers/{i}/mlp/{n}/kernel" for i in range(2)
                                               for n in ("gate", "up", "down")}
  same = Llama(LlamaConfig(**{k: v for k, v in cfg.__dict__.items() if not k.startswith("moe_")}),
               rngs=nnx.Rngs(0))
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(same))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
  logits, aux = model(tokens, return_aux=True)
  assert aux == {}
  pos = jnp.broadcast_to(jnp.arange(9), tokens.shape)
  h = model.embed(tokens)
  for blk in model.layers:
    h = h + blk.attn(blk.attn_norm(h), pos)
    h = h + blk.mlp(blk.mlp_norm(h))
  manual = model.lm_head(model.final_norm(h))
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(manual))
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(manual))


def test_bf16_moe_close_to_float32():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 50)
  out = {}
  for dt in ("float32", "bfloat16"):
    model = Llama(_cfg(dtype=dt, moe_capacity_factor=0.0, n_layers=1), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    logits, aux = jax.jit(lambda st: nnx.merge(graphdef, st)(tokens, return_aux=True))(state)
    assert logits.dtype == jnp.float32 and aux["moe_aux_loss"].dtype == jnp.float32
    out[dt] = np.asarray(logits)
  assert np.all(np.isfinite(out["bfloat16"]))
  np.testing.assert_allclose(out["bfloat16"], out["float32"], atol=0.05)


@pytest.mark.parametrize("cf", [0.0, pytest.param(1.0, marks=pytest.mark.slow)])
def test_expert_mesh_equals_single_device(cf):
  assert jax.device_count() == 8
  cfg = _cfg(moe_capacity_factor=cf, n_layers=1)
  mesh = sharding.make_mesh(data=2, expert=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}
  graphdef, params, rest = sharding.init_module(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  kernel = params["layers"][0]["mlp"]["experts"]["gate"]["kernel"][...]
  assert kernel.sharding.spec == jax.P("expert", None, None) and len(kernel.sharding.device_set) == 8
  tokens = jax.device_put(jax.random.randint(jax.random.key(0), (8, 6), 0, cfg.vocab_size),
                          sharding.batch_sharding(mesh))
  assert tokens.sharding.spec == jax.P(("data", "expert"), None)
  fwd = lambda p, r, t: nnx.merge(graphdef, p, r)(t, return_aux=True)
  with jax.set_mesh(mesh):
    logits, aux = jax.jit(fwd)(params, rest, tokens)
  single_logits, single_aux = jax.jit(lambda t: Llama(cfg, rngs=nnx.Rngs(0))(t, return_aux=True))(
      jax.device_get(tokens))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(single_logits), atol=1e-5)
  for k in aux:
    np.testing.assert_allclose(float(aux[k]), float(single_aux[k]), rtol=1e-5, atol=1e-7)


def test_dropless_experts_dispatch_each_devices_rows():
  """On data 8 each device routes, dispatches and combines its own rows (dropless mode, one group per batch
  shard): the compiled forward and backward of a layer keep the temporaries of one device running its ⅛ of the
  batch, not of the whole batch (8x). Values: test_expert_mesh_equals_single_device (forward) and
  tests/test_sharding.py's expert-mesh training (slow set)."""
  cfg = _cfg(d_model=32, d_ff=64, moe_capacity_factor=0.0)
  graphdef, state = nnx.split(MoeMlp(cfg, nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((16, 16, cfg.d_model), jnp.float32)

  def loss(st, v):
    y, aux = nnx.merge(graphdef, st)(v)
    return jnp.sum(y * y) + aux["aux_loss"]
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  temp = lambda *args: grad.lower(*args).compile().memory_analysis().temp_size_in_bytes
  one_row_share = temp(state, jax.ShapeDtypeStruct((2, 16, cfg.d_model), jnp.float32))
  mesh = sharding.make_mesh(data=8)
  with jax.set_mesh(mesh):
    sharded = temp(state, jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, 3)))
  assert sharded <= 1.5 * one_row_share, (sharded, one_row_share)


def test_make_mesh_expert_argument():
  assert sharding.make_mesh(fsdp=2, expert=2).shape["data"] == 2
  with pytest.raises(ValueError, match="expert=3"):
    sharding.make_mesh(expert=3)
  with pytest.raises(ValueError, match="mesh.expert"):
    sharding.make_mesh(expert=0)


def test_param_counts_total_and_active():
  for kind in ("dense", "lost"):
    cfg = preset("tiny", mlp_kind=kind, mlp_rank=16, moe_experts=8, moe_top_k=2)
    counts = count_params(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    dense = count_params(nnx.eval_shape(lambda: Llama(preset("tiny", mlp_kind=kind, mlp_rank=16),
                                                      rngs=nnx.Rngs(0))))
    d, ff, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    if kind == "dense":
      per_expert = 3 * d * ff
    else:
      per_expert = 2 * lost_closed_form(d, ff, 16, cfg.sparsity) + lost_closed_form(ff, d, 16, cfg.sparsity)
    assert lost_closed_form(d, ff, 16, cfg.sparsity, experts=8) == 8 * lost_closed_form(d, ff, 16, cfg.sparsity)
    router = d * 8
    assert counts["expert"] == L * 8 * per_expert
    assert counts["total"] == dense["total"] + L * (7 * per_expert + router)
    assert counts["active"] == dense["total"] + L * (per_expert + router)
    assert counts["active_non_embedding"] == counts["active"] - counts["embedding"]
    assert counts["dense_equivalent"] == dense["dense_equivalent"] + L * (7 * 3 * d * ff + router)
    assert dense["active"] == dense["total"] and dense["expert"] == 0


@pytest.mark.parametrize("kw,match", [
    (dict(moe_experts=-1), "moe_experts"), (dict(moe_experts=2.0), "moe_experts"),
    (dict(moe_top_k=0), "moe_top_k"), (dict(moe_experts=2, moe_top_k=3), "moe_top_k=3"),
    (dict(moe_capacity_factor=-0.5), "moe_capacity_factor"), (dict(moe_aux_weight=float("nan")), "moe_aux_weight"),
    (dict(moe_experts=True), "moe_experts"),
])
def test_bad_moe_config(kw, match):
  with pytest.raises(ValueError, match=match):
    _cfg(**kw)
