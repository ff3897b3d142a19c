"""Rematerialisation (model.remat, model.remat_policy) for every layer kind: same training, less memory.

jax.checkpoint recomputes the forward inside the backward; the values are the same up to float re-association,
so two AdamW steps with and without remat must give the same losses and parameters (1e-5 relative). A remat that
silently did nothing would pass that check, hence the second test: the compiled step keeps fewer bytes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax.models.config import REMAT_POLICIES, LlamaConfig
from train import state as state_lib
from train.configs.base import base_config, model_config
from train.step import make_train_step

# name: (attention kind, MLP kind, experts). 'mixed' puts low-rank attention, LOST MLP experts and routing in one
# small model (the fast test); every kind alone runs in the slow set.
KINDS = {"dense": ("dense", "dense", 0), "lowrank": ("lowrank", "lowrank", 0), "lost": ("lost", "lost", 0),
         "moe_lost": ("dense", "lost", 4), "mixed": ("lowrank", "lost", 2)}


def _cfg(kind, remat=False, policy="nothing_saveable", seq=8, batch=4, layers=2):
  attn, mlp, experts = KINDS[kind]
  c = base_config()
  c.model = model_config("tiny", "dense")
  c.model.update(dict(d_model=32, d_ff=64, n_heads=2, n_layers=layers, attn_rank=4, mlp_rank=4, sparsity=0.25,
                      attn_kind=attn, mlp_kind=mlp, max_seq_len=seq, moe_experts=experts, moe_top_k=2,
                      moe_capacity_factor=2.0 if kind == "mixed" else 0.0, remat=remat, remat_policy=policy))
  c.mesh.num_devices = 1
  c.train.update(dict(global_batch=batch, seq_len=seq, steps=10))
  c.optim.name = "adamw"
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 0
  return c


def _train(cfg, steps=2):
  run = state_lib.create_train_state(cfg, mesh=state_lib.make_mesh(cfg))
  step = jax.jit(make_train_step(run.graphdef, run.tx, run.schedule, cfg))
  rng = np.random.default_rng(0)
  state, losses = run.state, []
  for _ in range(steps):
    b = cfg.train.global_batch
    batch = {"tokens": jnp.asarray(rng.integers(0, 257, (b, cfg.train.seq_len + 1)), jnp.int32),
             "ids": jnp.arange(b, dtype=jnp.int32)}
    state, metrics = step(state, run.rest, batch)
    losses.append(float(metrics["loss"]))
  return np.array(losses), state["params"]


def _check_same_training(kind, policies, layers=2):
  ref_losses, ref_params = _train(_cfg(kind, layers=layers))
  for policy in policies:
    losses, params = _train(_cfg(kind, remat=True, policy=policy, layers=layers))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f"{kind} remat {policy}")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_remat_trains_like_no_remat_lowrank_lost_moe():
  _check_same_training("mixed", ("nothing_saveable",), layers=1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "lowrank", "lost", "moe_lost"])
def test_remat_trains_like_no_remat_every_kind(kind):
  _check_same_training(kind, ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"))


def _remat_policies_in_grad(cfg):
  """The policies of the checkpoint (remat) equations in the jaxpr of the loss, one per block."""
  run = state_lib.abstract_train_state(cfg, mesh=state_lib.make_mesh(cfg),
                                       model_cfg=state_lib.llama_config(cfg))
  from train.step import next_token_losses
  tokens = jax.ShapeDtypeStruct((cfg.train.global_batch, cfg.train.seq_len + 1), jnp.int32)
  loss = lambda p, r, t: next_token_losses(run.graphdef, p, r, t)[0].mean()
  jaxpr = jax.make_jaxpr(loss)(run.state["params"], run.rest, tokens)
  found = []

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name.startswith(("checkpoint", "remat")):
        found.append(eqn.params["policy"])
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)
  walk(jaxpr.jaxpr)
  return found


def test_remat_wraps_each_block_with_the_named_policy():
  """Remat is really applied (one checkpoint per block, with the configured policy), none without it."""
  cfg = _cfg("lost", remat=True, policy="dots_saveable", layers=3)
  assert _remat_policies_in_grad(cfg) == [jax.checkpoint_policies.dots_saveable] * 3
  assert _remat_policies_in_grad(_cfg("lost", layers=3)) == []


def test_remat_policy_names():
  assert "nothing_saveable" in REMAT_POLICIES and "dots_saveable" in REMAT_POLICIES
  for name in REMAT_POLICIES:
    assert callable(getattr(jax.checkpoint_policies, name))
  with pytest.raises(ValueError, match="remat_policy='dots'"):
    LlamaConfig(remat_policy="dots")


def test_checkpoint_recomputes_in_the_backward_and_saves_memory():
  """lostjax.remat.checkpoint: the gradients of jax.checkpoint, and on XLA:CPU less memory than no remat (a plain
  jax.checkpoint is scheduled beside the forward pass there and keeps more than no remat)."""
  from lostjax import remat

  def layer(x, w):
    return jnp.tanh(jnp.tanh(x @ w) @ w)

  def grad_fn(wrap):
    def loss(ws, x):
      for w in ws:
        x = wrap(layer)(x, w)
      return jnp.sum(x * x)
    return jax.jit(jax.grad(loss))
  ws = [jax.ShapeDtypeStruct((128, 128), jnp.float32)] * 6
  x = jax.ShapeDtypeStruct((1024, 128), jnp.float32)
  temp = {name: grad_fn(wrap).lower(ws, x).compile().memory_analysis().temp_size_in_bytes
          for name, wrap in (("none", lambda f: f), ("tied", remat.checkpoint))}
  # no remat keeps two [1024, 128] activations per layer (12 in all), the tied checkpoint only each layer's input
  assert temp["tied"] < 0.75 * temp["none"], temp
  rng = np.random.default_rng(0)
  wv = [jnp.asarray(rng.normal(size=(128, 128)) / 12, jnp.float32) for _ in range(6)]
  xv = jnp.asarray(rng.normal(size=(1024, 128)), jnp.float32)
  plain = grad_fn(lambda f: jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable))(wv, xv)
  for a, b in zip(grad_fn(remat.checkpoint)(wv, xv), plain):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_switch_recomputes_only_the_chosen_branch():
  """lostjax.remat.switch: the values and gradients of lax.switch (float, integer and boolean operands and
  outputs), and a backward that keeps no branch's intermediates: lax.switch over branches of different widths
  keeps the residuals of all of them."""
  from lostjax import remat
  widths = (896, 960, 1024)

  def branch(n):
    def f(x, w, idx):   # a width-n hidden layer: [x @ w[:, :n]] kept for the backward
      h = jnp.tanh(x @ w[:, :n])
      return jnp.sum(h * h, axis=1) * x[:, idx].sum(1), h[:, 0] > 0
    return f

  def loss(switch):
    def f(x, w, idx, i):
      y, mask = switch(i, [branch(n) for n in widths], x, w, idx)
      return jnp.sum(jnp.where(mask, y, 2 * y))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  args = (jax.ShapeDtypeStruct((256, 64), jnp.float32), jax.ShapeDtypeStruct((64, 1024), jnp.float32),
          jax.ShapeDtypeStruct((3,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
  temp = {name: loss(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
          for name, fn in (("lax", jax.lax.switch), ("remat", remat.switch))}
  # lax.switch keeps [256, 896 + 960 + 1024] hidden values; remat.switch recomputes at most [256, 1024] of them
  assert temp["remat"] < 0.6 * temp["lax"], temp
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(256, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 1024)) / 8, jnp.float32)
  idx = jnp.array([0, 5, 7], jnp.int32)
  for i in range(3):
    (v, g), (v_ref, g_ref) = loss(remat.switch)(x, w, idx, i), loss(jax.lax.switch)(x, w, idx, i)
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-6)
    for a, b in zip(g, g_ref):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
