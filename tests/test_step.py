"""train/step.py: gradient accumulation averages the microbatch gradients, the data's mask weights the loss.

Plain SGD (lr 1) makes the update equal to minus the gradient, so a wrong gradient scale cannot hide behind an
optimizer that normalises it (AdamW does, with or without clipping).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train import state as state_lib
from train.configs.base import base_config, model_config
from train.step import make_train_step, next_token_losses


def _setup(grad_accum=1, method="dense"):
  c = base_config()
  c.model = model_config("tiny", method)
  c.model.update(dict(d_model=32, d_ff=64, n_heads=2, n_layers=1, attn_rank=4, mlp_rank=4, sparsity=0.25,
                      max_seq_len=8))
  c.mesh.num_devices = 1
  c.optim.grad_clip = 0.0
  c.train.update(dict(global_batch=4, seq_len=8, grad_accum=grad_accum, steps=10))
  run = state_lib.create_train_state(c, mesh=state_lib.make_mesh(c))
  return c, run


def _batch(mask=None):
  rng = np.random.default_rng(0)
  b = {"tokens": jnp.asarray(rng.integers(0, 257, (4, 9)), jnp.int32), "ids": jnp.arange(4, dtype=jnp.int32)}
  if mask is not None:
    b["mask"] = jnp.asarray(mask, jnp.float32)
  return b


def _sgd_step(cfg, run, batch):
  step = jax.jit(make_train_step(run.graphdef, optax.sgd(1.0), lambda s: 1.0, cfg))
  state = dict(run.state, opt=optax.sgd(1.0).init(run.state["params"]))
  new, metrics = step(state, run.rest, batch)
  return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                      new["params"], run.state["params"]), metrics


def _reference_grad(run, batch, mask):
  """Autodiff of the masked mean token CE of the whole batch, written here from the definition."""
  def loss(p):
    per_token, _ = next_token_losses(run.graphdef, p, run.rest, batch["tokens"])
    return jnp.sum(per_token * mask) / jnp.sum(mask)
  return jax.grad(loss)(run.state["params"])


def test_sgd_update_is_minus_the_full_batch_gradient_with_and_without_accumulation():
  cfg1, run1 = _setup(1)
  cfg2, run2 = _setup(2)
  batch = _batch()
  ref = _reference_grad(run1, batch, jnp.ones((4, 8)))
  d1, m1 = _sgd_step(cfg1, run1, batch)
  d2, m2 = _sgd_step(cfg2, run2, batch)
  for a, b, g in zip(jax.tree.leaves(d1), jax.tree.leaves(d2), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, -np.asarray(g), rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(b, -np.asarray(g), rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)


def test_the_data_mask_weights_the_loss_and_gradient():
  cfg, run = _setup(1)
  mask = np.ones((4, 8), np.float32)
  mask[1, 5:] = 0.0
  mask[3, :] = 0.0
  batch = _batch(mask)
  d, metrics = _sgd_step(cfg, run, batch)
  ref = _reference_grad(run, batch, jnp.asarray(mask))
  for a, g in zip(jax.tree.leaves(d), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, -np.asarray(g), rtol=2e-4, atol=1e-7)
  per_token, _ = next_token_losses(run.graphdef, run.state["params"], run.rest, batch["tokens"])
  np.testing.assert_allclose(float(metrics["ce"]), float((np.asarray(per_token) * mask).sum() / mask.sum()),
                             rtol=1e-6)
  # masked-out tokens do not matter: changing them leaves the update unchanged
  tokens = np.asarray(batch["tokens"]).copy()
  tokens[3, :] = 7
  d_other, _ = _sgd_step(cfg, run, dict(batch, tokens=jnp.asarray(tokens)))
  for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(d_other)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_lost_model_accumulation_and_static_indices():
  cfg1, run1 = _setup(1, "lost")
  cfg4, run4 = _setup(4, "lost")
  d1, _ = _sgd_step(cfg1, run1, _batch())
  d4, _ = _sgd_step(cfg4, run4, _batch())
  for a, b in zip(jax.tree.leaves(d1), jax.tree.leaves(d4)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
  idx = [x for x in jax.tree.leaves(nnx.to_pure_dict(run1.rest)) if np.issubdtype(np.asarray(x).dtype, np.integer)]
  assert idx, "a LOST model keeps its channel indices outside the trained parameters"


def test_moe_aux_loss_is_part_of_the_train_loss_and_logged():
  c = base_config()
  c.model = model_config("tiny", "dense")
  c.model.update(dict(d_model=32, d_ff=64, n_heads=2, n_layers=1, max_seq_len=8, moe_experts=2, moe_top_k=1,
                      moe_aux_weight=0.5))
  c.mesh.num_devices = 1
  c.optim.grad_clip = 0.0
  c.train.update(dict(global_batch=4, seq_len=8, steps=10))
  run = state_lib.create_train_state(c, mesh=state_lib.make_mesh(c))
  _, metrics = _sgd_step(c, run, _batch())
  assert "moe_aux_loss" in metrics and float(metrics["moe_aux_loss"]) > 0
  np.testing.assert_allclose(float(metrics["loss"]), float(metrics["ce"]) + float(metrics["moe_aux_loss"]),
                             rtol=1e-6)


def test_adam_moments_are_sharded_like_their_parameters_under_fsdp():
  c = base_config()
  c.model = model_config("tiny", "dense")
  c.mesh.update(dict(num_devices=8, fsdp=4))
  c.train.update(dict(global_batch=8, seq_len=8))
  run = state_lib.create_train_state(c, mesh=state_lib.make_mesh(c))
  params = {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in p): x
            for p, x in jax.tree_util.tree_flatten_with_path(run.state["params"])[0]}
  checked = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(run.state["opt"])[0]:
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if "mu" in names or "nu" in names:
      p = params[names[names.index("mu" if "mu" in names else "nu") + 1:]]
      assert leaf.sharding.spec == p.sharding.spec, names
      checked += 1
  emb = run.state["params"]["embed"]["embedding"][...]
  assert checked >= 2 * 4 and emb.sharding.spec == jax.P(None, "fsdp")
