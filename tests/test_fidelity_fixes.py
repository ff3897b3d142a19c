"""Fidelity fixes found with the reproduction study (docs/study.md), each against an oracle written here from its definition.

(a) optim.decay_mask: 'all' decays every leaf (the reference scripts' single weight-decay group), 'matrices' only
    the projection matrices; (b) optim.name=trp applies TRP's step-0 projection to a fresh train state;
(c) loss-based reweighting with train.grad_accum > 1 normalises per microbatch (documented choice);
(d) gradient_spectra reads each LOST layer's γ from the model by default; (e) the llama.py presets clip nothing;
and, found by the study, checkpoints of states with zero-size leaves (FRUGAL ρ = 0).
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optim
from lostjax.models import Llama, preset
from lostjax.pytree import path_to_str
from train import optimizer as optim_lib
from train import state as state_lib
from train.configs import llama as llama_configs
from train.configs import quickstart
from train.configs.base import base_config, model_config
from train.step import make_train_step, next_token_losses

gs = importlib.import_module("lostjax.metrics.gradient_spectra")  # the package exports a function of that name


def _tiny_cfg(method="dense", name="adamw"):
  c = base_config()
  c.model = model_config("tiny", method)
  c.model.update(dict(d_model=32, d_ff=64, n_heads=2, n_layers=1, attn_rank=4, mlp_rank=4, sparsity=0.25,
                      max_seq_len=8))
  c.mesh.num_devices = 1
  c.optim.name = name
  c.optim.grad_clip = 0.0
  c.train.update(dict(global_batch=4, seq_len=8, steps=10))
  return c


def _params():
  c = _tiny_cfg()
  _, params, _ = state_lib.init_model(state_lib.llama_config(c), 0)
  return params


def _is_matrix(path: str, x) -> bool:
  return x.ndim == 2 and not any(s in path for s in ("embed", "lm_head", "norm"))


# ------------------------------------------------------------------------------------------------ (a) decay mask

@pytest.mark.parametrize("name", ["adamw", "galore", "frugal"])
@pytest.mark.parametrize("mask", ["all", "matrices"])
def test_decay_mask_with_zero_gradients_is_pure_decoupled_decay(name, mask):
  """Zero gradients: the whole update is −lr·wd·W on the decayed leaves and 0 elsewhere."""
  params = _params()
  oc = optim_lib.default_optim_config()
  oc.name, oc.weight_decay, oc.decay_mask, oc.grad_clip = name, 0.1, mask, 0.0
  oc.galore.rank = 4
  tx = optim_lib.build_optimizer(oc, 0.05)
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, tx.init(params), params)
  seen = set()
  for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(upd)[0], jax.tree.leaves(params)):
    name_ = path_to_str(path)
    decayed = mask == "all" or _is_matrix(name_, p)
    seen.add(decayed)
    ref = -0.05 * 0.1 * np.asarray(p, np.float64) if decayed else np.zeros(p.shape)
    np.testing.assert_allclose(np.asarray(u, np.float64), ref, rtol=1e-5, atol=1e-9, err_msg=name_)
  assert seen == ({True} if mask == "all" else {True, False})


def test_decay_mask_matrices_changes_only_the_non_matrix_leaves():
  """With real gradients and a schedule: 'matrices' equals 'all' on matrices; elsewhere it lacks lr(t)·wd·W."""
  params = _params()
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  sched = optax.linear_schedule(1e-2, 1e-3, 5)
  out = {}
  for mask in ("all", "matrices"):
    oc = optim_lib.default_optim_config()
    oc.weight_decay, oc.decay_mask = 0.3, mask
    tx = optim_lib.build_optimizer(oc, sched)
    st, p = tx.init(params), params
    for _ in range(3):
      u, st = tx.update(grads, st, p)
      p = optax.apply_updates(p, u)
    out[mask] = p
  # Oracle for the non-matrix leaves: AdamW without decay (lr 0.01, 0.0082, 0.0064; clip at 1.0 first).
  gn = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
  for (path, a), b, p0, g in zip(jax.tree_util.tree_flatten_with_path(out["all"])[0], jax.tree.leaves(out["matrices"]),
                                 jax.tree.leaves(params), jax.tree.leaves(grads)):
    name = path_to_str(path)
    if _is_matrix(name, p0):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7, err_msg=name)
      continue
    g = np.asarray(g, np.float64) * min(1.0, 1.0 / gn)
    w, m, v = np.asarray(p0, np.float64), 0.0, 0.0
    for t, lr in enumerate((1e-2, 1e-2 - 1.8e-3, 1e-2 - 3.6e-3), start=1):
      m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
      w = w - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(b, np.float64), w, rtol=1e-5, atol=5e-7, err_msg=name)  # decay term ~1e-4
    assert not np.allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-9), name


def test_decay_mask_bad_value_and_default():
  oc = optim_lib.default_optim_config()
  assert oc.decay_mask == "all"
  oc.decay_mask = "norms"
  with pytest.raises(ValueError, match="decay_mask='norms'"):
    optim_lib.build_optimizer(oc, 1e-3)


# ------------------------------------------------------------------------------------------------ (b) TRP step 0

def test_trp_fresh_state_is_projected_once_after_init():
  c = _tiny_cfg(name="trp")
  c.optim.trp.energy = 0.6
  run = state_lib.create_train_state(c, mesh=state_lib.make_mesh(c))
  _, init_params, _ = state_lib.init_model(state_lib.llama_config(c), c.train.seed)
  projected = optim.trp_project_params(init_params, 0.6, c.optim.trp.scheme)
  changed = 0
  for (path, got), want, p0 in zip(jax.tree_util.tree_flatten_with_path(run.state["params"])[0],
                                   jax.tree.leaves(projected), jax.tree.leaves(init_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    if not np.allclose(np.asarray(got), np.asarray(p0)):
      changed += 1
      # Oracle (float64): the projected kernel has the smallest rank k whose singular values keep ≥ 60 % energy.
      s0 = np.linalg.svd(np.asarray(p0, np.float64), compute_uv=False)
      frac = np.cumsum(s0 ** 2) / np.sum(s0 ** 2)
      s1 = np.linalg.svd(np.asarray(got, np.float64), compute_uv=False)
      assert np.sum(s1 > 1e-5 * s1[0]) <= int(np.searchsorted(frac, 0.6) + 1) < min(p0.shape), path_to_str(path)
  assert changed >= 4
  # Any other optimizer leaves the initial weights alone.
  c2 = _tiny_cfg(name="adamw")
  run2 = state_lib.create_train_state(c2, mesh=state_lib.make_mesh(c2))
  for a, b in zip(jax.tree.leaves(run2.state["params"]), jax.tree.leaves(init_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------ (c) reweighting, grad_accum

def _np_weights(losses, r):
  lo, hi = losses.min(), losses.max()
  den = max(hi - lo, 1e-6)
  h = 2 * losses / den - (hi + lo) / den
  f = np.minimum(h + 1, 1) / r
  e = np.exp(f - f.max())
  return e / e.sum()


def test_reweighting_with_grad_accum_normalises_per_microbatch():
  rng = np.random.default_rng(3)
  batch = {"tokens": jnp.asarray(rng.integers(0, 257, (4, 9)), jnp.int32), "ids": jnp.arange(4, dtype=jnp.int32),
           "mask": jnp.ones((4, 8), jnp.float32)}
  losses = {}
  for accum in (1, 2):
    c = _tiny_cfg()
    c.train.grad_accum = accum
    c.objectives.reweight.enabled = True
    c.objectives.reweight.warmup_steps = 0
    c.objectives.reweight.r = 0.4
    run = state_lib.create_train_state(c, mesh=state_lib.make_mesh(c))
    _, metrics = jax.jit(make_train_step(run.graphdef, run.tx, run.schedule, c))(run.state, run.rest, batch)
    losses[accum] = float(metrics["loss"])
  per_token, _ = next_token_losses(run.graphdef, run.state["params"], run.rest, batch["tokens"])
  seq = np.asarray(per_token, np.float64).mean(axis=1)
  global_ref = float(np.sum(_np_weights(seq, 0.4) * seq))
  micro_ref = float(np.mean([np.sum(_np_weights(seq[i:i + 2], 0.4) * seq[i:i + 2]) for i in (0, 2)]))
  np.testing.assert_allclose(losses[1], global_ref, rtol=1e-5)
  np.testing.assert_allclose(losses[2], micro_ref, rtol=1e-5)
  assert abs(global_ref - micro_ref) > 1e-4  # the two normalisations differ on this batch


# ------------------------------------------------------------------------------------- (d) gradient spectra γ

def test_gradient_spectra_reads_gamma_from_the_model():
  cfg = preset("tiny", attn_kind="lost", mlp_kind="dense", d_model=16, d_ff=32, n_heads=2, n_layers=1,
               attn_rank=2, sparsity=0.25, gamma=0.3, max_seq_len=8)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, ex):
    logits = nnx.merge(graphdef, p, rest)(ex["tokens"][None, :-1])[0]
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), ex["tokens"][1:, None], axis=-1))

  batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 6)), jnp.int32)}
  by_model = gs.analysed_matrices(loss_fn, params, batch, static=rest, model=model)
  explicit = gs.analysed_matrices(loss_fn, params, batch, static=rest, gamma=0.3)
  assert set(by_model) == {"layers/0/attn/q", "layers/0/attn/k", "layers/0/attn/v", "layers/0/attn/o"}
  for k in by_model:
    np.testing.assert_allclose(by_model[k], explicit[k], rtol=1e-6)
  # gradient_spectra with the model's γ: nuclear norms of those matrices (float64 numpy SVD as the oracle).
  spec = gs.gradient_spectra(loss_fn, params, batch, static=rest, model=model)
  for j, name in enumerate(spec.names):
    ref = [np.linalg.svd(np.asarray(m, np.float64), compute_uv=False).sum() for m in explicit[name]]
    np.testing.assert_allclose(spec.nuclear_norm[:, j], ref, rtol=1e-4)
  with pytest.raises(ValueError, match="gamma of LOST layer 'layers/0/attn/q' unknown"):
    gs.gradient_spectra(loss_fn, params, batch, static=rest)


# ------------------------------------------------------------------------------------------ (e) preset clipping

@pytest.mark.parametrize("size", sorted(llama_configs.STEPS))
def test_llama_presets_do_not_clip(size):
  c = llama_configs.get_config(f"{size},dense")
  assert c.optim.grad_clip == 0.0
  # Two AdamW steps, a huge gradient then a small one: clipping the first would change the second update.
  # Oracle: float64 AdamW without clipping.
  tx = optim_lib.build_optimizer(c.optim, 0.5)
  p = {"w": jnp.zeros((2,))}
  g1, g2 = np.array([300.0, -400.0]), np.array([0.3, 0.1])
  st = tx.init(p)
  _, st = tx.update({"w": jnp.asarray(g1, jnp.float32)}, st, p)
  u, _ = tx.update({"w": jnp.asarray(g2, jnp.float32)}, st, p)
  m = 0.1 * 0.9 * g1 + 0.1 * g2
  v = 0.001 * 0.999 * g1 ** 2 + 0.001 * g2 ** 2
  ref = -0.5 * (m / (1 - 0.9 ** 2)) / (np.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
  np.testing.assert_allclose(np.asarray(u["w"], np.float64), ref, rtol=1e-4)
  c.optim.grad_clip = 1.0  # the same steps with the old default differ (so the oracle above can fail)
  tx = optim_lib.build_optimizer(c.optim, 0.5)
  st = tx.init(p)
  _, st = tx.update({"w": jnp.asarray(g1, jnp.float32)}, st, p)
  u_clip, _ = tx.update({"w": jnp.asarray(g2, jnp.float32)}, st, p)
  assert not np.allclose(np.asarray(u_clip["w"]), ref, rtol=1e-2)


def test_other_configs_keep_clipping():
  assert quickstart.get_config().optim.grad_clip == 1.0
  assert base_config().optim.grad_clip == 1.0


# ------------------------------------------------------------- found by the study: empty optimizer-state leaves

def test_checkpoint_round_trip_with_zero_size_leaves(tmp_path):
  """FRUGAL at rho=0 has zero-size active-block state; orbax cannot save empty arrays, the Checkpointer can."""
  from train.checkpoint import Checkpointer
  c = _tiny_cfg(name="frugal")
  c.optim.frugal.rho = 0.0
  run = state_lib.create_train_state(c, mesh=state_lib.make_mesh(c))
  sizes = [x.size for x in jax.tree.leaves(run.state)]
  assert 0 in sizes
  state = jax.tree.map(lambda x: x + 1 if x.dtype != jnp.bool_ else x, run.state)
  ck = Checkpointer(str(tmp_path))
  ck.save(3, state, run.rest, {"pos": 7})
  fresh = state_lib.create_train_state(c, mesh=state_lib.make_mesh(c))
  got, _, data = ck.restore(3, fresh.state, fresh.rest)
  ck.close()
  assert data == {"pos": 7}
  assert jax.tree.structure(got) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
