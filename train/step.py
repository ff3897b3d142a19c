"""The pure train and eval steps: (state, rest, batch) -> (state, metrics), jitted once with shardings.

`state` = {'params', 'opt', 'obj', 'step', 'bad_step'} (train/state.py) is donated; `rest` holds the model's
non-trainable variables (the LOST channel indices), which no step changes. `batch` = {'tokens': int32[B, T+1],
'ids': [B] global example ids, 'mask': [B, T] (optional; 1 for real targets)}.

Loss = the objectives' combination of the per-token cross-entropy (train/objectives; the plain masked mean when
none is enabled) + the model's auxiliary losses (the mixture-of-experts load-balancing loss, when the model has
experts). With gradient accumulation the microbatch gradients are averaged (a scan over `grad_accum` slices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train import objectives


def _uses_aux(cfg) -> bool:
  return bool(cfg.model.get("moe_experts", 0))


def next_token_losses(graphdef, params, rest, tokens, *, with_aux: bool = False):
  """Per-token cross-entropy [B, T], logits [B, T, V] (and the model's aux dict) for tokens [B, T+1]."""
  model = nnx.merge(graphdef, params, rest)
  if with_aux:
    logits, aux = model(tokens[:, :-1], return_aux=True)
  else:
    logits, aux = model(tokens[:, :-1]), {}
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  if with_aux:
    return per_token, logits, aux
  return per_token, logits


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, cfg):
  """Builds step(state, rest, batch) -> (state, metrics). cfg is the full training ConfigDict."""
  accum = int(cfg.train.grad_accum)
  skip_bad = cfg.train.nan_policy == "skip"
  obj_cfg = cfg.objectives
  with_aux = _uses_aux(cfg)

  def loss_fn(params, rest, obj_state, tokens, ids, mask, step):
    def forward(p):  # the teacher's logits (no aux values needed)
      return nnx.merge(graphdef, p, rest)(tokens[:, :-1])
    per_token, logits, *aux = next_token_losses(graphdef, params, rest, tokens, with_aux=with_aux)
    if mask is None:
      mask = jnp.ones(per_token.shape, jnp.float32)
    loss, obj_updates, obj_metrics = objectives.apply(
        obj_cfg, per_token_loss=per_token, mask=mask, logits=logits, ids=ids, step=step,
        obj_state=obj_state, forward=forward)
    ce = jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    if with_aux:
      aux = aux[0]
      loss = loss + aux.get("moe_aux_loss", 0.0)
      obj_metrics = {**obj_metrics, **{k: jax.lax.stop_gradient(v) for k, v in aux.items()}}
    return loss, (ce, obj_updates, obj_metrics)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state, rest, batch):
    params, step = state["params"], state["step"]
    tokens, ids, mask = batch["tokens"], batch["ids"], batch.get("mask")
    if accum == 1:
      (loss, (ce, obj_updates, obj_metrics)), grads = grad_fn(params, rest, state["obj"], tokens, ids, mask, step)
    else:
      micro = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

      def body(carry, mb):
        g_acc, l_acc, c_acc = carry
        mb_tokens, mb_ids, mb_mask = mb
        (l, (c, upd, met)), g = grad_fn(params, rest, state["obj"], mb_tokens, mb_ids, mb_mask, step)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        return (g_acc, l_acc + l, c_acc + c), (upd, met)

      zeros = jax.tree.map(jnp.zeros_like, params)
      micro_mask = None if mask is None else micro(mask)
      (grads, loss, ce), (obj_updates, obj_metrics) = jax.lax.scan(
          body, (zeros, 0.0, 0.0), (micro(tokens), micro(ids), micro_mask))
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
    # lax.cond, not a per-leaf jnp.where: a where keeps the old state alive next to the new one, so XLA copies
    # the donated state (docs/benchmarks/train_step_cpu.md, "NaN guard").
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
