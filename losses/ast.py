"""AST: dataset distillation by trajectory matching with smooth expert trajectories.

Paper: Shen, Yang, Lam, "AST: Effective Dataset Distillation through Alignment with Smooth and High-Quality
Expert Trajectories", arXiv:2310.10541 (2023); official code shenjiyuan123/AST-Alignment-with-Smooth-Expert
(`buffer.py`, `utils.py`, `distill.py`). Trajectory matching itself is MTT (Cazenavette et al., "Dataset
Distillation by Matching Training Trajectories", arXiv:2203.11932).

Expert side (training the experts whose per-epoch checkpoints are matched):

* clipping loss: in the first `num_decay_epochs` = 10 epochs the expert's cross-entropy is scaled by
  `0.5 + 0.05 * epoch` (0.5, 0.55, ..., 0.95), then by 1 (`ast_loss_scale`). It down-weights early epochs;
  nothing is clipped element-wise.
* gradient penalty (`ast_gradient_penalty`), WGAN-GP style on the *un-augmented* input x:
    GP = lam * mean_{b, pixels} ( || d(sum_{b,k} f(x)_{b,k}) / dx ||_{2, over channels} - 1 )^2,  lam = 2.
  It is differentiated again by the outer `jax.grad` (double backward), as in the reference code.
* `ast_expert_loss` = loss_scale(epoch) * CE(f(x_aug), y) + GP(f, x).

Student side (learning the synthetic set):

* balanced inner loop (`ast_balance_factor`): with S = max_start_epoch and e the sampled start epoch, the inner
  cross-entropy is multiplied by log_5(e - S//2 + 8) when e >= S//2 and divided by log_5(S//2 - e + 8)
  otherwise.
* inner loop (`ast_unroll`): N student steps of SGD with heavy-ball momentum on the synthetic set,
  b_t = mom * b_{t-1} + g_t, theta <- theta - syn_lr * b_t (mom 0.9), with a learnable syn_lr.
* matching loss (`ast_matching_loss`), MTT's normalised distance plus intermediate matching: with M expert
  epochs, start theta*_e and the student after (N//M)*i steps for i = 1..M-1 and after N steps,
    l_i  = ||theta_hat_i - theta*_{e+i}||^2 / ||theta*_e - theta*_{e+i}||^2
    L    = l_M + sum_{i<M} beta_i l_i,    beta_i = 1 ("agg") or i/M ("adaptive"), or no middle terms ("none").
  Squared norms are summed over every leaf of the parameter pytree (MTT flattens all parameters).

Deliberate deviations / choices: the reference code samples a minibatch of synthetic images per inner step;
`ast_unroll` uses the full synthetic set every step (the typical IPC <= 10 sets fit in one batch). Weight
perturbation and the k-means ("avg") initialisation of the reference code are not implemented (the latter
selects int(ipc/10) = 0 images for ipc < 10 there). The ratio's denominator is clamped at 1e-12 (the reference
divides by it unguarded; it is 0 only when an expert did not move). Notes: docs/losses_amcl_repmtl_tr2m_ast.md.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from losses import _utils as U


def _FLOAT():
  """The default float dtype (float64 under jax_enable_x64, else float32)."""
  return jnp.asarray(0.0).dtype


def ast_loss_scale(epoch, *, num_decay_epochs: int = 10, start: float = 0.5, step: float = 0.05):
  """AST "clipping loss" factor of the expert cross-entropy at `epoch` (0-based): start + step*epoch, then 1."""
  U.check_positive("num_decay_epochs", num_decay_epochs, allow_zero=True)
  U.check_positive("start", start)
  epoch = jnp.asarray(epoch)
  if not (jnp.issubdtype(epoch.dtype, jnp.integer) or jnp.issubdtype(epoch.dtype, jnp.floating)):
    raise ValueError(f"epoch must be numeric, got dtype {epoch.dtype}")
  early = start + step * epoch.astype(_FLOAT())
  return jnp.where(epoch < num_decay_epochs, early, 1.0)


def _softmax_ce(logits, labels):
  logits = logits.astype(U.compute_dtype(logits))
  lse = jax.nn.logsumexp(logits, axis=-1)
  return jnp.mean(lse - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0])


def ast_gradient_penalty(apply_fn: Callable, x, *, weight: float = 2.0, channel_axis: int = -1):
  """WGAN-GP style input-gradient penalty of AST's experts (see module docstring).

  Args:
    apply_fn: x -> logits [B, K] (close over the parameters to differentiate w.r.t. them).
    x: [B, ...] inputs; the norm is taken over `channel_axis` (per pixel), the mean over every other axis.
    weight: lam (reference default 2).
  """
  x = U.check_float_array("x", x)
  if x.ndim < 2:
    raise ValueError(f"x must have a batch axis and at least one more axis, got shape {x.shape}")
  ax = channel_axis % x.ndim
  if ax == 0:
    raise ValueError(f"channel_axis must not be the batch axis, got {channel_axis}")
  U.check_positive("weight", weight, allow_zero=True)
  x = x.astype(U.compute_dtype(x))
  g = jax.grad(lambda xx: jnp.sum(apply_fn(xx).astype(x.dtype)))(x)
  norm = U.safe_sqrt(jnp.sum(g * g, axis=ax))
  return weight * jnp.mean((norm - 1.0) ** 2)


def ast_expert_loss(apply_fn: Callable, x, labels, epoch, *, x_aug=None, gp_weight: float = 2.0,
                    num_decay_epochs: int = 10, channel_axis: int = -1):
  """One AST expert objective: ast_loss_scale(epoch) * CE(apply_fn(x_aug), labels) + GP(apply_fn, x).

  `x_aug` (default `x`) is the augmented batch used for the cross-entropy; the penalty uses the clean `x`.
  `gp_weight=0` and `num_decay_epochs=0` give the plain MTT expert loss.
  """
  x = U.check_float_array("x", x)
  labels = U.check_int_array("labels", labels)
  U.check_shape("labels", labels, x.shape[:1])
  xa = x if x_aug is None else U.check_float_array("x_aug", x_aug)
  U.check_shape("x_aug", xa, x.shape)
  ce = _softmax_ce(apply_fn(xa), labels)
  loss = ast_loss_scale(epoch, num_decay_epochs=num_decay_epochs) * ce
  if gp_weight:
    loss = loss + ast_gradient_penalty(apply_fn, x, weight=gp_weight, channel_axis=channel_axis)
  return loss


def ast_balance_factor(start_epoch, max_start_epoch: int):
  """Balanced inner loop factor: log_5(e - S//2 + 8) if e >= S//2 else 1 / log_5(S//2 - e + 8)."""
  if not isinstance(max_start_epoch, int) or max_start_epoch < 0:
    raise ValueError(f"max_start_epoch must be an int >= 0, got {max_start_epoch!r}")
  e = jnp.asarray(start_epoch).astype(_FLOAT())
  half = float(max_start_epoch // 2)
  up = jnp.log(jnp.maximum(e - half, 0.) + 8.) / math.log(5.)
  down = math.log(5.) / jnp.log(jnp.maximum(half - e, 0.) + 8.)
  return jnp.where(e >= half, up, down)


def _sq_dist(a, b):
  """Sum over all leaves of ||a - b||^2, in at least float32."""
  sq = lambda u, v: jnp.sum((u.astype(jnp.promote_types(u.dtype, jnp.float32)) - v) ** 2)
  leaves = jax.tree.leaves(jax.tree.map(sq, a, b))
  return sum(leaves[1:], leaves[0])


def _check_trees(name_a, a, name_b, b):
  sa, sb = jax.tree.structure(a), jax.tree.structure(b)
  if sa != sb:
    raise ValueError(f"{name_a} and {name_b} must have the same pytree structure, got {sa} and {sb}")
  if not jax.tree.leaves(a):
    raise ValueError(f"{name_a} must have at least one leaf")


def ast_trajectory_loss(student_params, start_params, target_params, *, eps: float = 1e-12):
  """MTT's normalised matching loss ||student - target||^2 / ||start - target||^2 (sums over all leaves)."""
  _check_trees("student_params", student_params, "target_params", target_params)
  _check_trees("start_params", start_params, "target_params", target_params)
  num = _sq_dist(student_params, target_params)
  den = _sq_dist(start_params, target_params)
  return num / jnp.maximum(den, eps)


def ast_middle_weights(num_expert_epochs: int, kind: str = "agg"):
  """beta_i for i = 1..M-1: ones ("agg"), i/M ("adaptive") or zeros ("none")."""
  U.check_choice("middle", kind, ("agg", "adaptive", "none"))
  if not isinstance(num_expert_epochs, int) or num_expert_epochs < 1:
    raise ValueError(f"num_expert_epochs must be an int >= 1, got {num_expert_epochs!r}")
  i = jnp.arange(1, num_expert_epochs, dtype=_FLOAT())
  if kind == "agg":
    return jnp.ones_like(i)
  if kind == "adaptive":
    return i / num_expert_epochs
  return jnp.zeros_like(i)


def ast_matching_loss(student_traj, start_params, expert_traj, *, middle: str = "agg",
                      eps: float = 1e-12):
  """AST grand loss: MTT loss of the last student + sum_i beta_i * intermediate losses.

  Args:
    student_traj: pytree whose leaves have a leading axis M: the student after (N//M)*i steps, i = 1..M-1,
      then after N steps (what `ast_unroll` returns).
    start_params: pytree, the expert's parameters theta*_e the student started from.
    expert_traj: pytree like `student_traj`: theta*_{e+1}, ..., theta*_{e+M}.
    middle: "agg" (beta_i = 1), "adaptive" (beta_i = i/M) or "none" (plain MTT).
  """
  U.check_choice("middle", middle, ("agg", "adaptive", "none"))
  _check_trees("student_traj", student_traj, "expert_traj", expert_traj)
  _check_trees("start_params", start_params, "expert_traj", expert_traj)
  leaves = jax.tree.leaves(student_traj) + jax.tree.leaves(expert_traj)
  lead = {jnp.shape(l)[0] if jnp.ndim(l) else None for l in leaves}
  if len(lead) != 1 or None in lead:
    raise ValueError(f"student_traj and expert_traj leaves must share one leading axis M, got sizes {lead}")
  m = lead.pop()
  for a, s in zip(jax.tree.leaves(expert_traj), jax.tree.leaves(start_params)):
    if jnp.shape(a)[1:] != jnp.shape(s):
      raise ValueError(f"expert_traj leaf shape {jnp.shape(a)} does not match start_params leaf {jnp.shape(s)}")
  losses = jax.vmap(lambda st, ex: ast_trajectory_loss(st, start_params, ex, eps=eps))(student_traj, expert_traj)
  beta = ast_middle_weights(m, middle)
  return losses[-1] + jnp.sum(beta * losses[:-1])


def ast_record_steps(num_steps: int, num_expert_epochs: int):
  """Student steps at which `ast_unroll` records: (N//M)*i for i = 1..M-1, then N."""
  if not isinstance(num_steps, int) or not isinstance(num_expert_epochs, int) or num_expert_epochs < 1:
    raise ValueError(f"num_expert_epochs must be an int >= 1, got {num_expert_epochs!r}")
  if num_steps < num_expert_epochs:
    raise ValueError(f"num_steps must be >= num_expert_epochs ({num_expert_epochs}), got {num_steps}")
  return [(num_steps // num_expert_epochs) * i for i in range(1, num_expert_epochs)] + [num_steps]


def ast_unroll(loss_fn: Callable, params, syn_x, syn_y, syn_lr, *, num_steps: int, num_expert_epochs: int,
               start_epoch=None, max_start_epoch: int | None = None, momentum: float = 0.9):
  """AST student inner loop on the synthetic set (differentiable w.r.t. syn_x, syn_lr, params).

  Args:
    loss_fn: (params, x, y) -> scalar cross-entropy of the student.
    params: starting pytree (an expert checkpoint theta*_e).
    syn_x, syn_y: the synthetic set (full batch every step).
    syn_lr: scalar learnable learning rate.
    num_steps: N; num_expert_epochs: M (sets the recorded steps, see `ast_record_steps`).
    start_epoch, max_start_epoch: when both are given, the inner loss is scaled by
      `ast_balance_factor(start_epoch, max_start_epoch)` (AST's balanced inner loop); else no scaling.
    momentum: heavy-ball momentum of the inner SGD (0 = MTT's plain SGD).

  Returns a pytree like `params` with a leading axis M (the recorded students).
  """
  steps = ast_record_steps(num_steps, num_expert_epochs)
  U.check_positive("momentum", momentum, allow_zero=True)
  syn_x = U.check_float_array("syn_x", syn_x)
  syn_y = jnp.asarray(syn_y)
  if syn_y.shape[:1] != syn_x.shape[:1]:
    raise ValueError(f"syn_y must have leading size {syn_x.shape[0]}, got shape {syn_y.shape}")
  if (start_epoch is None) != (max_start_epoch is None):
    raise ValueError("start_epoch and max_start_epoch must be given together (balanced inner loop)")
  scale = 1.0 if start_epoch is None else ast_balance_factor(start_epoch, max_start_epoch)
  grad_fn = jax.grad(lambda p: scale * loss_fn(p, syn_x, syn_y))

  def body(carry, _):
    p, buf = carry
    g = grad_fn(p)
    buf = jax.tree.map(lambda b, gg: momentum * b + gg, buf, g)
    p = jax.tree.map(lambda w, b: w - syn_lr * b, p, buf)
    return (p, buf), p

  zeros = jax.tree.map(jnp.zeros_like, params)
  _, traj = jax.lax.scan(body, (params, zeros), jnp.arange(1, num_steps + 1))
  idx = jnp.asarray(steps) - 1
  return jax.tree.map(lambda a: a[idx], traj)
