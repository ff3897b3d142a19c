"""Unlikeliness reward and GRPO group-normalised advantages.

Paper: He, Fried, Welleck, "Rewarding the Unlikely: Lifting GRPO Beyond Distribution Sharpening",
arXiv:2506.02355 (2025); official code AndreHe02/rewarding-unlikely-release
(`verl/trainer/ppo/ray_lean_trainer.py::_compute_advantages`, `examples/lean/grpo.sh`).

Per prompt group of G samples (binary verifier rewards R, old-policy token log-probs l, mask M):
  logp_i = sum_t M_it l_it / sum_t M_it                       length-normalised sequence log-prob
  rank_i = position of logp_i in ascending order (0 = least likely; ties broken by index, stable)
  r~_i   = R_i (1 - beta_rank rank_i / G)                      unlikeliness reward, beta_rank = 0.25
  A_i    = (r~_i - mean r~) / (std r~ + 1e-6)                  std unbiased (torch.std); G = 1: A = r~
  A_it   = A_i M_it                                            broadcast over response tokens
The code's indexing (rank 0 = least likely keeps factor 1) is used; the most likely sample gets
1 - beta (G - 1)/G. Groups are the trailing axis: rewards [..., G], token arrays [..., G, T].
"""

import jax
import jax.numpy as jnp

from losses import _utils as U


def unlikeliness_reward(rewards, token_logps, token_mask=None, *, beta_rank: float = 0.25):
  """Unlikeliness-shaped rewards [..., G] (see module docstring)."""
  U.check_positive("beta_rank", beta_rank, allow_zero=True)
  r = U.as_float("rewards", rewards)
  if r.ndim < 1:
    raise ValueError(f"rewards must have a group axis, got shape {r.shape}")
  lp = U.check_float_array("token_logps", token_logps)
  if lp.shape[:-1] != r.shape or lp.ndim != r.ndim + 1:
    raise ValueError(f"token_logps must have shape {r.shape} + (T,), got {lp.shape}")
  dt = U.compute_dtype(r, lp)
  mask = U.mask_or_ones("token_mask", token_mask, lp.shape).astype(dt)
  seq = jnp.sum(lp.astype(dt) * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.)
  seq = jax.lax.stop_gradient(seq)
  rank = jnp.argsort(jnp.argsort(seq, axis=-1, stable=True), axis=-1, stable=True).astype(dt)
  g = r.shape[-1]
  return r.astype(dt) * (1 - beta_rank * rank / g)


def grpo_advantages(rewards, token_mask=None, *, eps: float = 1e-6):
  """GRPO advantages (r - mean) / (std_unbiased + eps) per group (trailing axis).

  Args:
    rewards: [..., G] rewards (e.g. from `unlikeliness_reward`).
    token_mask: optional [..., G, T] response mask; if given the advantages are broadcast to
      tokens and masked ([..., G, T]), else [..., G].
  """
  r = jnp.asarray(rewards)
  r = r.astype(U.compute_dtype(r))
  if r.ndim < 1:
    raise ValueError(f"rewards must have a group axis, got shape {r.shape}")
  g = r.shape[-1]
  if g == 1:
    adv = r / (1 + eps)   # official: mean 0, std 1 for a group of one
  else:
    mean = jnp.mean(r, -1, keepdims=True)
    std = jnp.std(r, -1, keepdims=True, ddof=1)
    adv = (r - mean) / (std + eps)
  if token_mask is None:
    return adv
  m = jnp.asarray(token_mask)
  if m.ndim != r.ndim + 1 or m.shape[:-1] != r.shape:
    raise ValueError(f"token_mask must have shape {r.shape} + (T,), got {m.shape}")
  return adv[..., None] * m.astype(adv.dtype)
