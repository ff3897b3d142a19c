"""Dual-Head Knowledge Distillation (DHKD).

Paper: Yang, Zong, Huang, Feng, An, "Dual-Head Knowledge Distillation: Enhancing Logits Utilization
with an Auxiliary Head", arXiv:2411.08937 (2024); official code penghui-yang/DHKD
(`distiller_zoo/BinaryKL.py`, `BinaryKLNorm.py`, `KD.py`, `helper/optimizer.py`).

  BinaryKL(z_s, z_t)     = T^2 / B sum_{b,c} KL(Bern(sigma(z_t/T)) || Bern(sigma(z_s/T)))
  BinaryKLNorm(z_s, z_t) = T^2 / B sum_{b,c} KL(Bern(1/2) || Bern(sigma((z_s - z_t)/T)))     (DHKD)
                         = T^2 / B sum [softplus(-D/T)/2 + softplus(D/T)/2 - log 2],  D = z_s - z_t
  KD (Hinton)            = T^2 / B sum_b KL(softmax(z_t/T) || softmax(z_s/T))   (`tempered_kl` per row)
  L_DHKD = gamma CE(z_s^(1), y) + alpha BinaryKLNorm(z_s^(2), z_t)

Defaults (official CIFAR quick start): T = 2, gamma = 1, alpha = 1 (ImageNet: alpha = 0.1).
The official code clamps the probabilities to [1e-8, 1 - 1e-8] (terms saturate for |D|/T > ~18.4,
with zero gradient there); the default here is the unclamped softplus form (`clamp_eps=None`),
`clamp_eps=1e-8` reproduces the code (clamp applied in log space, see `_clamped_logs`). Teacher logits are under `stop_gradient` (the
official loop computes them under `no_grad`). `gradient_alignment` is the one-sided PCGrad step
of `OptimGradAlign.ga_backward` on two gradient pytrees.
"""
from typing import Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from losses import _utils as U


def _pair(student, teacher):
  s = U.check_float_array("student_logits", student)
  t = U.check_float_array("teacher_logits", teacher)
  U.check_ndim("student_logits", s, 2)
  U.check_shape("teacher_logits", t, s.shape)
  dt = U.compute_dtype(s, t)
  return s.astype(dt), jax.lax.stop_gradient(t.astype(dt))


def _bern_kl(p, log_q, log_1mq):
  """KL(Bern(p) || Bern(q)) with 0 log 0 = 0, from log q and log(1 - q)."""
  return (jax.scipy.special.xlogy(p, p) - p * log_q
          + jax.scipy.special.xlogy(1 - p, 1 - p) - (1 - p) * log_1mq)


def _clamped_logs(x, eps):
  """(log q, log(1 - q)) of q = clip(sigmoid(x), eps, 1 - eps), clamped in log space.

  Equal to the official clamp in float64; in float32 `1 - 1e-8` rounds to 1 and the official code
  returns inf, whereas the log-space clamp stays finite (zero gradient where clamped).
  """
  lo, hi = jnp.log(eps), jnp.log1p(-eps)
  return (jnp.clip(jax.nn.log_sigmoid(x), lo, hi), jnp.clip(jax.nn.log_sigmoid(-x), lo, hi))


def binary_kl_loss(student_logits, teacher_logits, *, temperature: float = 2.0,
                   clamp_eps: Optional[float] = None, where: Optional[jax.Array] = None):
  """BinaryKL: per-class Bernoulli KL(teacher || student), summed over classes, mean over batch, x T^2."""
  U.check_positive("temperature", temperature)
  s, t = _pair(student_logits, teacher_logits)
  T = temperature
  if clamp_eps is None:
    p = jax.nn.sigmoid(t / T)
    kl = _bern_kl(p, jax.nn.log_sigmoid(s / T), jax.nn.log_sigmoid(-s / T))
  else:
    p = jnp.clip(jax.nn.sigmoid(t / T), clamp_eps, 1 - clamp_eps)
    kl = _bern_kl(p, *_clamped_logs(s / T, clamp_eps))
  return T ** 2 * U.safe_mean(jnp.sum(kl, 1), U.mask_or_ones("where", where, s.shape[:1]))


def binary_kl_norm_loss(student_logits, teacher_logits, *, temperature: float = 2.0,
                        clamp_eps: Optional[float] = None, where: Optional[jax.Array] = None):
  """BinaryKLNorm: KL(Bern(1/2) || Bern(sigma((z_s - z_t)/T))), summed over classes, batch mean, x T^2."""
  U.check_positive("temperature", temperature)
  s, t = _pair(student_logits, teacher_logits)
  T = temperature
  d = (s - t) / T
  if clamp_eps is None:
    kl = 0.5 * jax.nn.softplus(-d) + 0.5 * jax.nn.softplus(d) - jnp.log(2.)
  else:
    kl = _bern_kl(jnp.full_like(d, 0.5), *_clamped_logs(d, clamp_eps))
  return T ** 2 * U.safe_mean(jnp.sum(kl, 1), U.mask_or_ones("where", where, s.shape[:1]))


def tempered_kl(teacher_logits, student_logits, temperature):
  """Per-row KL(softmax(z_t/T) || softmax(z_s/T)) over the last axis (no T^2 factor, no reduction).

  The one temperature-scaled KL of the project: `kd_loss` below and the SAF/MESA objectives
  (`train/objectives/saf.py`, `kl_full`) call it. The teacher is under `stop_gradient`; the result
  has the inputs' dtype (callers cast first), shape = the logits' shape without the last axis.
  d/dz_s [T^2 KL] = T (softmax(z_s/T) - softmax(z_t/T)). The caller validates `temperature`.
  """
  lt = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
  ls = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  return jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)


def kd_loss(student_logits, teacher_logits, *, temperature: float = 4.0,
            where: Optional[jax.Array] = None):
  """Hinton KD baseline: T^2 * mean_b KL(softmax(z_t/T) || softmax(z_s/T))."""
  U.check_positive("temperature", temperature)
  s, t = _pair(student_logits, teacher_logits)
  kl = tempered_kl(t, s, temperature)
  return temperature ** 2 * U.safe_mean(kl, U.mask_or_ones("where", where, s.shape[:1]))


def dual_head_kd_loss(head1_logits, head2_logits, teacher_logits, labels, *,
                      temperature: float = 2.0, gamma: float = 1.0, alpha: float = 1.0,
                      clamp_eps: Optional[float] = None, where: Optional[jax.Array] = None):
  """DHKD loss: gamma * CE(head 1, labels) + alpha * BinaryKLNorm(head 2, teacher).

  Args:
    head1_logits: [B, C] logits of the classifier head (used at test time).
    head2_logits: [B, C] logits of the auxiliary head (trained only by distillation).
    teacher_logits: [B, C] (detached). labels: [B] ints. where: optional [B] mask.
  """
  h1, y = U.check_labeled_matrix("head1_logits", head1_logits, "labels", labels)
  U.check_shape("head2_logits", head2_logits, h1.shape)
  w = U.mask_or_ones("where", where, h1.shape[:1])
  h1 = h1.astype(U.compute_dtype(h1))
  ce = -jnp.take_along_axis(jax.nn.log_softmax(h1, 1), y[:, None], 1)[:, 0]
  kd = binary_kl_norm_loss(head2_logits, teacher_logits, temperature=temperature, clamp_eps=clamp_eps,
                           where=w)
  return gamma * U.safe_mean(ce, w) + alpha * kd


def gradient_alignment(grad_ce, grad_kd):
  """One-sided PCGrad of the official `ga_backward`: project g_KD off g_CE if they conflict.

  Returns the pytree g_CE + g_KD', g_KD' = g_KD - (g_KD.g_CE / |g_CE|^2) g_CE if g_KD.g_CE < 0 else g_KD.
  A zero g_CE leaves g_KD unchanged.
  """
  fce, unravel = ravel_pytree(grad_ce)
  fkd, _ = ravel_pytree(grad_kd)
  if fce.shape != fkd.shape:
    raise ValueError(f"grad_ce and grad_kd must have the same structure, got sizes {fce.shape} and {fkd.shape}")
  dot = jnp.vdot(fkd, fce)
  nrm = jnp.vdot(fce, fce)
  coef = jnp.where((dot < 0) & (nrm > 0), dot / jnp.where(nrm > 0, nrm, 1.), 0.)
  return unravel(fce + fkd - coef * fce)
