"""LoL: comparative regularization over query-reformulation losses.

Paper: Zhu, Pang, Lan, Shen, Cheng, "LoL: A Comparative Regularization Loss over Query Reformulation
Losses for Pseudo-Relevance Feedback", SIGIR 2022, arXiv:2204.11545; official code zycdev/LoL
(`trainer.py::compute_loss`, `util.py::pairwise_hinge`).

Each query is revised 1 + n times from feedback sets of decreasing size (revision 0 = most feedback).
  l_r   = -log softmax(sim_r)[p*],  p* = argmin_{p in Pos(q)} sim_r[p]  (other positives masked out)
  L_cr  = mean over queries q and pairs r < r' of max(0, l_{q,r} - l_{q,r'})     (margin 0)
i.e. a revision that used more feedback is penalised when its reformulation loss exceeds that of a
revision that used less. Pairs are pooled over the batch (mean over all valid pairs), as the
official RankNet-style `pairwise_hinge`. Gradients flow through both sides of each pair (the
official code's `.detach()` is commented out). Default weight lambda_cr = 1 is applied by the caller.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U


def lol_reformulation_loss(sim, positive_mask, where: Optional[jax.Array] = None):
  """Per-row passage-ranking loss l_r: CE over all passages, target = hardest (lowest) positive.

  Args:
    sim: [..., P] query-revision x passage scores; positive_mask: [..., P] bool positives.
    where: optional [..., P] mask of valid passages.
  Returns: [...] losses (0 for rows without a positive).
  """
  s = U.check_float_array("sim", sim)
  U.check_shape("positive_mask", positive_mask, s.shape)
  s = s.astype(U.compute_dtype(s))
  valid = U.mask_or_ones("where", where, s.shape)
  pos = jnp.asarray(positive_mask, bool) & valid
  target = jnp.argmin(jnp.where(pos, jax.lax.stop_gradient(s), jnp.inf), axis=-1)
  is_t = jnp.arange(s.shape[-1]) == target[..., None]
  keep = valid & (~pos | is_t)
  lse = U.masked_logsumexp(s, keep, axis=-1)
  s_t = jnp.sum(jnp.where(is_t, s, 0.), axis=-1)
  return jnp.where(jnp.any(pos, -1), lse - s_t, 0.)


def lol_regularizer(revision_losses, where: Optional[jax.Array] = None):
  """Comparative regularization L_cr.

  Args:
    revision_losses: [Q, R] reformulation losses, column r sorted by decreasing feedback amount.
    where: optional [Q, R] mask of valid revisions.
  Returns: scalar mean of max(0, l_r - l_r') over valid pairs r < r' of each query (0 if none).
  """
  l = U.check_float_array("revision_losses", revision_losses)
  U.check_ndim("revision_losses", l, 2)
  l = l.astype(U.compute_dtype(l))
  w = U.mask_or_ones("where", where, l.shape)
  r = l.shape[1]
  order = jnp.triu(jnp.ones((r, r), bool), k=1)
  pair = order[None] & w[:, :, None] & w[:, None, :]
  return U.safe_mean(jax.nn.relu(l[:, :, None] - l[:, None, :]), pair)
