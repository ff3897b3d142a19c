"""The pure train and eval steps: (state, rest, batch) -> (state, metrics), jitted once with shardings.

`state` = {'params', 'opt', 'obj', 'step', 'bad_step'} is donated; `rest` holds the model's non-trainable
variables (the LOST channel indices), which no step changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train import objectives


def next_token_losses(graphdef, params, rest, tokens):
  """Per-token cross-entropy [B, T] and logits [B, T, V] for tokens [B, T+1]."""
  logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return per_token, logits


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, cfg):
  """Builds step(state, rest, batch) -> (state, metrics). cfg is the full training ConfigDict."""
  accum = int(cfg.train.grad_accum)
  skip_bad = cfg.train.nan_policy == "skip"
  obj_cfg = cfg.objectives

  def loss_fn(params, rest, obj_state, tokens, ids, step):
    def forward(p):
      return nnx.merge(graphdef, p, rest)(tokens[:, :-1])
    per_token, logits = next_token_losses(graphdef, params, rest, tokens)
    mask = jnp.ones(per_token.shape, jnp.float32)
    loss, obj_updates, obj_metrics = objectives.apply(
        obj_cfg, per_token_loss=per_token, mask=mask, logits=logits, ids=ids, step=step,
        obj_state=obj_state, forward=forward)
    ce = jnp.mean(per_token)
    return loss, (ce, obj_updates, obj_metrics)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state, rest, batch):
    params, step = state["params"], state["step"]
    tokens, ids = batch["tokens"], batch["ids"]
    if accum == 1:
      (loss, (ce, obj_updates, obj_metrics)), grads = grad_fn(params, rest, state["obj"], tokens, ids, step)
    else:
      micro = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

      def body(carry, mb):
        g_acc, l_acc, c_acc = carry
        (l, (c, upd, met)), g = grad_fn(params, rest, state["obj"], mb[0], mb[1], step)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        return (g_acc, l_acc + l, c_acc + c), (upd, met)

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, loss, ce), (obj_updates, obj_metrics) = jax.lax.scan(
          body, (zeros, 0.0, 0.0), (micro(tokens), micro(ids)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss, ce = loss / accum, ce / accum
      obj_updates = objectives.merge_microbatch_updates(obj_cfg, obj_updates)
      obj_metrics = jax.tree.map(jnp.mean, obj_metrics)

    grad_norm = optax.global_norm(grads)
    updates, new_opt = tx.update(grads, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    new_obj = objectives.post_update(obj_cfg, state["obj"], obj_updates, new_params, step)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # 'stop': once a step was non-finite, no later update is applied either (the run stops at the next check).
    take = finite if skip_bad else finite & (state["bad_step"] < 0)
    # lax.cond, not a per-leaf jnp.where: the where kept the old state alive next to the new one and made XLA
    # copy the donated state (60M dense on CPU: 1170 vs 1018 MiB of temporaries, BENCHMARKS.md §1c).
    kept_params, kept_opt, kept_obj = jax.lax.cond(
        take, lambda: (new_params, new_opt, new_obj), lambda: (params, state["opt"], state["obj"]))
    new_state = {
        "params": kept_params,
        "opt": kept_opt,
        "obj": kept_obj,
        "step": step + 1,
        "bad_step": jnp.where((~finite) & (state["bad_step"] < 0), step, state["bad_step"]),
    }
    metrics = {"loss": loss, "ce": ce, "grad_norm": grad_norm, "lr": schedule(step),
               "skipped": (~take).astype(jnp.int32), **obj_metrics}
    return new_state, metrics

  return step_fn


def make_eval_step(graphdef):
  """eval(params, rest, batch) -> (sum of masked nats, sum of mask)."""
  def eval_fn(params, rest, batch):
    per_token, _ = next_token_losses(graphdef, params, rest, batch["tokens"])
    mask = batch["mask"]
    return jnp.sum(per_token * mask), jnp.sum(mask)
  return eval_fn
