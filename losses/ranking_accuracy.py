"""DPO loss, ranking accuracy and idealized ranking accuracy.

Paper: Chen, Malladi, Zhang, Chen, Zhang, Ranganath, Cho, "Preference Learning Algorithms Do Not
Learn Preference Rankings", NeurIPS 2024, arXiv:2405.19534 (Def. 2.2 DPO loss, Def. 2.3 ranking
accuracy, Def. C.1 ties, Thm. 3.1 / Cor. 3.3 idealized ranking accuracy); official code
angie-chen55/pref-learning-ranking-acc.

  DPO       L = mean -log sigmoid(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])
  R         = mean 1[log pi(y_w) >= log pi(y_l)]             (likelihoods, not implicit rewards)
  R*        = mean 1[log ref(y_w) - log ref(y_l) + (1/beta)(log a - log(1 - a)) > 0]
              a = fraction of raters preferring y_w, clipped to [eps, 1 - eps] (eps = 1e-3, code)

Inputs are sequence log-likelihoods (sum of token log-probs); pass `*_lengths` for the
length-normalised variants (log pi / |y|). Deviations: ties (Def. C.1, rater fraction 1/2) are
judged on log-likelihoods with `|diff| < tie_tolerance` instead of on raw probabilities (raw
sequence probabilities underflow); the code's +-5% ratio tie band and its ratio-of-summed-log-probs
bug are not reproduced. beta default 0.1 for `dpo_loss` (common DPO setting; the paper sweeps it).
"""
from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U


def _logp(name, x, lengths):
  x = U.check_float_array(name, x)
  x = x.astype(U.compute_dtype(x))
  if lengths is not None:
    U.check_shape(f"{name} lengths", lengths, x.shape)
    x = x / jnp.maximum(jnp.asarray(lengths).astype(x.dtype), 1)
  return x


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1, where: Optional[jax.Array] = None):
  """DPO loss (Def. 2.2), mean over valid pairs; reference log-probs are `stop_gradient`."""
  U.check_positive("beta", beta)
  pc = U.check_float_array("policy_chosen_logps", policy_chosen_logps)
  for n, v in (("policy_rejected_logps", policy_rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
               ("ref_rejected_logps", ref_rejected_logps)):
    U.check_shape(n, v, pc.shape)
  dt = U.compute_dtype(pc, policy_rejected_logps)
  ref = jax.lax.stop_gradient(jnp.asarray(ref_chosen_logps, dt) - jnp.asarray(ref_rejected_logps, dt))
  margin = (pc.astype(dt) - jnp.asarray(policy_rejected_logps).astype(dt)) - ref
  return U.safe_mean(jax.nn.softplus(-beta * margin), U.mask_or_ones("where", where, pc.shape))


def ranking_accuracy(chosen_logps, rejected_logps, *, chosen_lengths=None, rejected_lengths=None,
                     ties: Optional[jax.Array] = None, tie_tolerance: float = 0.01,
                     where: Optional[jax.Array] = None):
  """Ranking accuracy R (Def. 2.3): fraction of pairs with log pi(y_w) >= log pi(y_l).

  With lengths it is the length-normalised R~. `ties`: optional bool mask of pairs whose rater
  fraction is 1/2; those count as correct iff |log pi(y_1) - log pi(y_2)| < tie_tolerance.
  """
  U.check_positive("tie_tolerance", tie_tolerance, allow_zero=True)
  c = _logp("chosen_logps", chosen_logps, chosen_lengths)
  r = _logp("rejected_logps", rejected_logps, rejected_lengths)
  U.check_shape("rejected_logps", r, c.shape)
  correct = c >= r
  if ties is not None:
    U.check_shape("ties", ties, c.shape)
    correct = jnp.where(jnp.asarray(ties, bool), jnp.abs(c - r) < tie_tolerance, correct)
  return U.safe_mean(correct.astype(c.dtype), U.mask_or_ones("where", where, c.shape))


def idealized_ranking_accuracy(ref_chosen_logps, ref_rejected_logps, rater_fraction, *,
                               beta: float, chosen_lengths=None, rejected_lengths=None,
                               eps: float = 1e-3, where: Optional[jax.Array] = None):
  """Idealized ranking accuracy R* (Thm. 3.1, Cor. 3.3) of the DPO/RLHF optimum.

  rater_fraction: fraction a of raters preferring y_w, clipped to [eps, 1 - eps] (a = 1 has no
  finite optimum; the paper uses 1 - 1e-3). beta: the DPO/RLHF KL coefficient (no default: the paper
  reports a sweep over {0.01, 0.1, 1, 5, 10}).
  """
  U.check_positive("beta", beta)
  if not 0 < eps < 0.5:
    raise ValueError(f"eps must be in (0, 0.5), got {eps}")
  c = _logp("ref_chosen_logps", ref_chosen_logps, chosen_lengths)
  r = _logp("ref_rejected_logps", ref_rejected_logps, rejected_lengths)
  U.check_shape("ref_rejected_logps", r, c.shape)
  U.check_shape("rater_fraction", rater_fraction, c.shape)
  a = jnp.clip(jnp.asarray(rater_fraction).astype(c.dtype), eps, 1 - eps)
  margin = c - r + (jnp.log(a) - jnp.log1p(-a)) / beta
  return U.safe_mean((margin > 0).astype(c.dtype), U.mask_or_ones("where", where, c.shape))
