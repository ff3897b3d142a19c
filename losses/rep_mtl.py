"""Rep-MTL: representation-level task-saliency regularisers for multi-task learning.

Paper: Wang, Li, Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency for Multi-Task
Learning", arXiv:2507.21049 (ICCV 2025). No reference code is released; everything follows the paper.

With Z the shared representation ([B, ..., C]: batch, positions, channels) and T task losses L_t:

* task saliency (Eq. 3): S_t = dL_t / dZ, NOT detached (second-order: the regularisers' gradients flow through
  S_t into the encoder and the heads). `rep_mtl_task_saliency` computes [T, *Z.shape] with one VJP per task.
* TSR, entropy penalty (Eqs. 4-6): S_hat_t = channel mean of S_t (signed), P_{i,t} = |S_hat_{i,t}| /
  sum_k |S_hat_{i,k}| over the B x positions entries i, L_tsr = mean_i ( -sum_t P_{i,t} log P_{i,t} ).
* CSA, sample-wise cross-task alignment (Eqs. 7-9): per sample b, M_t[b] = S_t[b]^T S_t[b] (C x C, sum over
  positions), A_b = [mean over positions of S_t[b]]_t (C x T), A_hat_b = A_b A_b^T (C x C);
  z^a_b = normalise(vec A_hat_b), z^t_b = normalise(vec M_t[b]),
    L_csa = mean_{b,t} -log( exp(sim(z^a_b, z^t_b)/tau) / sum_{k != b} exp(sim(z^a_b, z^a_k)/tau) ).
* total (Eq. 10): L = sum_t w_t L_t + lambda_tsr L_tsr + lambda_csa L_csa (`rep_mtl_loss`).

Choices where the paper is silent (pinned by tests, see docs/losses_amcl_repmtl_tr2m_ast.md):
* tau = 0.1 (not stated in the paper); lambda_tsr = lambda_csa = 0.9 (the value held fixed in the paper's
  sensitivity sweep; the chosen per-dataset values are not printed).
* The denominator excludes the positive, as printed; the B x T positives are averaged. A batch of one sample
  has no negative: its log-sum-exp is taken as 0 (the loss is then -sim/tau).
* Positions where every task's saliency is 0 get P = 0 for all tasks (entropy 0) instead of 0/0.
* Each sample's saliencies are divided by their max |S| (under stop_gradient) first; both terms are invariant to
  this rescaling, which keeps the squares in range for tiny or huge saliencies.
* The layout is channels-last ([B, H', W', C] or [B, L, C] or [B, C]); `channel_axis` selects another axis.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from losses import _utils as U


def rep_mtl_task_saliency(task_losses_fn: Callable, z, *, has_aux: bool = False):
  """Per-task losses and their saliencies S_t = dL_t/dz (Eq. 3), differentiable (not detached).

  Args:
    task_losses_fn: z -> [T] vector of task losses (or (losses, aux) with has_aux).
    z: the shared representation (any shape; batch first).
  Returns (losses [T], saliency [T, *z.shape]) (plus aux with has_aux).
  """
  z = U.check_float_array("z", z)
  out = jax.vjp(task_losses_fn, z, has_aux=has_aux)
  losses, vjp = out[0], out[1]
  if jnp.ndim(losses) != 1:
    raise ValueError(f"task_losses_fn must return a [T] vector of task losses, got shape {jnp.shape(losses)}")
  eye = jnp.eye(losses.shape[0], dtype=losses.dtype)
  (sal,) = jax.vmap(vjp)(eye)
  return (losses, sal, out[2]) if has_aux else (losses, sal)


def _to_tbpc(name, saliency, channel_axis):
  """[T, B, ..., C] (channel axis counted on the per-task array) -> [T, B, P, C]."""
  s = U.check_float_array(name, saliency)
  if s.ndim < 3:
    raise ValueError(f"{name} must have shape [T, B, ..., C] (ndim >= 3), got {s.shape}")
  ax = channel_axis % (s.ndim - 1)
  if ax == 0:
    raise ValueError(f"channel_axis must not be the batch axis, got {channel_axis}")
  s = jnp.moveaxis(s, ax + 1, -1)
  s = s.astype(U.compute_dtype(s))
  s = s.reshape(s.shape[0], s.shape[1], -1, s.shape[-1])
  # both regularisers are invariant to a positive rescaling of one sample's saliencies (all tasks together):
  # divide by the sample's max |S| so that tiny (1e-10) or huge saliencies do not under/overflow the squares
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(s), axis=(0, 2, 3), keepdims=True))
  return s / jnp.where(scale > 0, scale, 1.)


def rep_mtl_tsr_loss(saliency, *, channel_axis: int = -1, where: Optional[jax.Array] = None):
  """Task-saliency entropy penalty L_tsr (Eqs. 4-6).

  Args:
    saliency: [T, B, ..., C] task saliencies (from `rep_mtl_task_saliency`).
    channel_axis: channel axis of the per-task array [B, ..., C] (default last).
    where: optional [B] mask of valid samples.
  """
  s = _to_tbpc("saliency", saliency, channel_axis)
  t, b, p, _ = s.shape
  valid = U.mask_or_ones("where", where, (b,))
  a = jnp.abs(jnp.mean(s, -1))                           # |S_hat|, [T, B, P]
  tot = jnp.sum(a, 0, keepdims=True)
  prob = a / jnp.where(tot > 0, tot, 1.)
  logp = jnp.log(jnp.where(prob > 0, prob, 1.))
  ent = -jnp.sum(prob * logp, 0)                         # [B, P]
  return U.safe_mean(ent, jnp.broadcast_to(valid[:, None], (b, p)))


def rep_mtl_csa_loss(saliency, *, tau: float = 0.1, channel_axis: int = -1, where: Optional[jax.Array] = None):
  """Sample-wise cross-task alignment L_csa (Eqs. 7-9); see the module docstring.

  Args:
    saliency: [T, B, ..., C] task saliencies; tau: temperature (default 0.1, not given in the paper).
    where: optional [B] mask (invalid samples are neither anchors nor negatives).
  """
  U.check_positive("tau", tau)
  s = _to_tbpc("saliency", saliency, channel_axis)
  t, b, p, c = s.shape
  valid = U.mask_or_ones("where", where, (b,))
  m = jnp.einsum("tbpc,tbpd->tbcd", s, s)                # M_t[b], [T, B, C, C]
  anchor = jnp.mean(s, 2)                                # [T, B, C]: columns of A_b
  ahat = jnp.einsum("tbc,tbd->bcd", anchor, anchor)      # A_b A_b^T, [B, C, C]
  za = U.l2_normalize(ahat.reshape(b, c * c))
  zt = U.l2_normalize(m.reshape(t, b, c * c))
  pos = jnp.einsum("bk,tbk->tb", za, zt) / tau           # [T, B]
  neg = za @ za.T / tau                                  # [B, B]
  mask = ~jnp.eye(b, dtype=bool) & valid[None, :]
  lse = U.masked_logsumexp(neg, mask)                    # [B]; 0 without negatives
  per = jnp.mean(lse[None, :] - pos, 0)
  return U.safe_mean(per, valid)


def rep_mtl_loss(task_losses_fn: Callable, z, *, lambda_tsr: float = 0.9, lambda_csa: float = 0.9,
                 tau: float = 0.1, task_weights=None, channel_axis: int = -1, where: Optional[jax.Array] = None):
  """Rep-MTL total loss (Eq. 10): sum_t w_t L_t + lambda_tsr L_tsr + lambda_csa L_csa.

  Args:
    task_losses_fn: z -> [T] task losses (close over the task heads' parameters and targets).
    z: shared representation [B, ..., C] (the encoder output; differentiate the whole expression w.r.t. the
      encoder and head parameters with `jax.grad`).
    task_weights: optional [T] weights w_t (default 1: equal weighting as in the paper).
  Returns (total, aux) with aux = {"task_losses", "tsr", "csa"}.
  """
  U.check_positive("lambda_tsr", lambda_tsr, allow_zero=True)
  U.check_positive("lambda_csa", lambda_csa, allow_zero=True)
  z = U.check_float_array("z", z)
  if z.ndim < 2:
    raise ValueError(f"z must have shape [B, ..., C] (ndim >= 2), got {z.shape}")
  losses, sal = rep_mtl_task_saliency(task_losses_fn, z)
  w = jnp.ones_like(losses) if task_weights is None else U.as_float("task_weights", task_weights)
  U.check_shape("task_weights", w, losses.shape)
  tsr = rep_mtl_tsr_loss(sal, channel_axis=channel_axis, where=where)
  csa = rep_mtl_csa_loss(sal, tau=tau, channel_axis=channel_axis, where=where)
  total = jnp.sum(w * losses) + lambda_tsr * tsr + lambda_csa * csa
  return total, {"task_losses": losses, "tsr": tsr, "csa": csa}
