"""DeQA-Score: score-distribution soft labels, soft-label KL and Thurstone fidelity loss.

Paper: You, Cai, Gu, Xue, Dong, "Teaching Large Language Models to Regress Accurate Image Quality
Scores using Score Distribution" (DeQA-Score), CVPR 2025, arXiv:2501.11561; official code
zhiyuanyou/DeQA-Score (`build_soft_labels/gen_soft_label.py`, `src/model/modeling_mplug_owl2.py`).

Soft labels over the levels x = (5, 4, 3, 2, 1) = (excellent, good, fair, poor, bad):
  mu = 4 (MOS - min)/(max - min) + 1,  sigma = 4 std/(max - min)
  p_x = N(x; mu, sigma) ("pdf")  or  Phi((x + 1/2 - mu)/sigma) - Phi((x - 1/2 - mu)/sigma) ("cdf")
  A = sum p, B = sum x p, a = (mu - 3)/(B - 3A + 1e-9), b = (1 - a A)/5, p~ = max(a p + b, 0)
  fallback two-hot (mu in (k, k+1]: p~_k = k+1-mu, p~_{k+1} = mu-k) if sigma < 0.2 or
  |sum x p~ - mu| > 0.1
Predicted score: q = softmax(level logits), s = sum x q, sd = sqrt(sum q (x - s)^2).
Fidelity loss on image pairs (A, B):
  p_hat = Phi((s_A - s_B)/sqrt(sd_A^2 + sd_B^2 + eps))   (use_fix_std: Phi((s_A - s_B)/sqrt 2))
  g     = Phi((m_A - m_B)/sqrt(std_A^2 + std_B^2 + eps))  (raw MOS / std, no gradient)
  L     = mean [1 - sqrt(p_hat g + eps) - sqrt((1 - p_hat)(1 - g) + eps)],  eps = 1e-8
Binary variant (`continuous=False`): g = 1[m_A > m_B], L = mean(1 - sqrt(p_hat + eps)) over g = 1 and
(1 - sqrt(1 - p_hat + eps)) over g = 0. Deviation: the official binary variant has no eps inside the
sqrt (infinite gradient at p_hat = 0); here eps is kept. Soft-label KL uses log_softmax (the
official code takes log(softmax)). Defaults: use_fix_std=True (train.sh), eps=1e-8.
"""
from typing import Optional

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from losses import _utils as U

LEVELS = (5.0, 4.0, 3.0, 2.0, 1.0)


def deqa_soft_labels(mos, std, mos_min: float, mos_max: float, *, method: str = "pdf",
                     thre_std: float = 0.2, thre_diff: float = 0.1):
  """Discretised score distributions [..., 5] over levels (5, 4, 3, 2, 1); see module docstring."""
  U.check_choice("method", method, ("pdf", "cdf"))
  if not mos_max > mos_min:
    raise ValueError(f"mos_max must be > mos_min, got {mos_max} <= {mos_min}")
  mos = U.check_float_array("mos", mos)
  U.check_shape("std", std, mos.shape)
  dt = U.compute_dtype(mos)
  mu = (4 * (mos.astype(dt) - mos_min) / (mos_max - mos_min) + 1)[..., None]
  sigma = (4 * jnp.asarray(std).astype(dt) / (mos_max - mos_min))[..., None]
  x = jnp.asarray(LEVELS, dt)
  safe_sigma = jnp.where(sigma > 0, sigma, 1.)
  if method == "pdf":
    p = jnp.exp(-0.5 * ((x - mu) / safe_sigma) ** 2) / (safe_sigma * jnp.sqrt(2 * jnp.pi))
  else:
    p = ndtr((x + 0.5 - mu) / safe_sigma) - ndtr((x - 0.5 - mu) / safe_sigma)
  a_sum, b_sum = jnp.sum(p, -1, keepdims=True), jnp.sum(x * p, -1, keepdims=True)
  alpha = (mu - 3) / (b_sum - 3 * a_sum + 1e-9)
  beta = (1 - alpha * a_sum) / 5
  pt = jnp.maximum(alpha * p + beta, 0.)
  k = jnp.clip(jnp.ceil(mu) - 1, 1, 4)
  two_hot = jnp.where(x == k, k + 1 - mu, 0.) + jnp.where(x == k + 1, mu - k, 0.)
  fallback = (sigma < thre_std) | (jnp.abs(jnp.sum(x * pt, -1, keepdims=True) - mu) > thre_diff)
  return jnp.where(fallback, two_hot, pt)


def deqa_score(level_logits):
  """(score, std) from [..., 5] level logits ordered (excellent, ..., bad) = levels (5, ..., 1)."""
  z = U.check_float_array("level_logits", level_logits)
  if z.shape[-1] != 5:
    raise ValueError(f"level_logits must have 5 entries on the last axis, got shape {z.shape}")
  z = z.astype(U.compute_dtype(z))
  q = jax.nn.softmax(z, -1)
  x = jnp.asarray(LEVELS, z.dtype)
  s = jnp.sum(q * x, -1)
  var = jnp.sum(q * (x - s[..., None]) ** 2, -1)
  return s, U.safe_sqrt(var)


def deqa_softkl_loss(logits, level_ids, soft_labels, where: Optional[jax.Array] = None):
  """KL(t || softmax(logits)) with t = soft labels on the 5 level tokens (batchmean).

  logits: [B, V]; level_ids: [5] token ids ordered (excellent, ..., bad); soft_labels: [B, 5].
  """
  z = U.check_float_array("logits", logits)
  U.check_ndim("logits", z, 2)
  U.check_shape("level_ids", level_ids, (5,))
  U.check_shape("soft_labels", soft_labels, (z.shape[0], 5))
  z = z.astype(U.compute_dtype(z))
  t = jnp.asarray(soft_labels, z.dtype)
  logp = jax.nn.log_softmax(z, -1)[:, jnp.asarray(level_ids)]
  kl = jnp.sum(jax.scipy.special.xlogy(t, t) - t * logp, -1)
  return U.safe_mean(kl, U.mask_or_ones("where", where, z.shape[:1]))


def fidelity_loss(level_logits_a, level_logits_b, mos_a, mos_b, std_a=None, std_b=None, *,
                  use_fix_std: bool = True, continuous: bool = True, eps: float = 1e-8,
                  where: Optional[jax.Array] = None):
  """Thurstone fidelity loss between predicted and ground-truth pair preferences.

  Args:
    level_logits_a/b: [B, 5] level logits of images A and B.
    mos_a/b: [B] raw MOS; std_a/b: [B] raw MOS std (required for continuous=True).
    use_fix_std: p_hat = Phi((s_A - s_B)/sqrt 2) (official train.sh) instead of predicted stds.
    continuous: Thurstone target g (True) or binary g = 1[m_A > m_B].
  """
  U.check_positive("eps", eps)
  sa, sda = deqa_score(level_logits_a)
  sb, sdb = deqa_score(level_logits_b)
  if sa.shape != sb.shape or sa.ndim != 1:
    raise ValueError(f"level_logits_a/b must both be [B, 5], got {jnp.shape(level_logits_a)} and {jnp.shape(level_logits_b)}")
  U.check_shape("mos_a", mos_a, sa.shape)
  U.check_shape("mos_b", mos_b, sa.shape)
  dt = sa.dtype
  if use_fix_std:
    p_hat = ndtr((sa - sb) / jnp.sqrt(2.))
  else:
    p_hat = ndtr((sa - sb) / jnp.sqrt(sda ** 2 + sdb ** 2 + eps))
  ma, mb = jnp.asarray(mos_a, dt), jnp.asarray(mos_b, dt)
  if continuous:
    if std_a is None or std_b is None:
      raise ValueError("std_a and std_b are required with continuous=True")
    U.check_shape("std_a", std_a, sa.shape)
    U.check_shape("std_b", std_b, sa.shape)
    g = ndtr((ma - mb) / jnp.sqrt(jnp.asarray(std_a, dt) ** 2 + jnp.asarray(std_b, dt) ** 2 + eps))
    g = jax.lax.stop_gradient(g)
    per = 1 - jnp.sqrt(p_hat * g + eps) - jnp.sqrt((1 - p_hat) * (1 - g) + eps)
  else:
    win = ma > mb
    per = jnp.where(win, 1 - jnp.sqrt(p_hat + eps), 1 - jnp.sqrt(1 - p_hat + eps))
  return U.safe_mean(per, U.mask_or_ones("where", where, sa.shape))
