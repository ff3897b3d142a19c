"""Multi-Similarity loss and miner.

Paper: Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General Pair Weighting for Deep
Metric Learning", CVPR 2019, arXiv:1904.06627.

Implements, on the cosine similarity matrix S of L2-normalised embeddings:

* Pair mining (paper Eq. 8-9, "Similarity-P"), thresholds taken over the un-mined sets:
    N_i' = {j in N_i : S_ij + eps > min_{k in P_i} S_ik}
    P_i' = {j in P_i : S_ij - eps < max_{k in N_i} S_ik}
* Pair weighting / loss (paper Eq. 15):
    L_i = 1/alpha log(1 + sum_{P_i} exp(-alpha (S_ij - base))) + 1/beta log(1 + sum_{N_i} exp(beta (S_ij - base)))
    L   = mean of L_i over all (valid) anchors, including anchors that contribute 0.

Defaults alpha=2, beta=50, base=0.5 (and miner epsilon=0.1) are those of pytorch-metric-learning's
`MultiSimilarityLoss` / `MultiSimilarityMiner`, which this function reproduces exactly (with
`mining=True` it equals the PML loss fed the PML miner's indices). The official MalongTech code uses
beta=40 and always mines.

Deliberate deviations from the official code (MalongTech/research-ms-loss):
* Self-pairs are removed by index (diagonal), not by the value test `S < 1 - 1e-5`, so genuine
  duplicate embeddings of the same class stay positives (as in PML / TF-Similarity).
* The positive and negative terms are independent (PML); `require_both=True` gives the official rule
  that an anchor contributes only if both mined sets are non-empty.
* Anchors without positives (the official code raises) or without negatives contribute 0.
* Mined masks are computed under `stop_gradient` (PML runs miners under `torch.no_grad`).
"""
from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U


def _similarity_and_masks(embeddings, labels, ref_embeddings, ref_labels, where, ref_where):
  embeddings, labels = U.check_labeled_matrix("embeddings", embeddings, "labels", labels)
  self_ref = ref_embeddings is None
  if self_ref:
    if ref_labels is not None:
      raise ValueError("ref_labels given without ref_embeddings")
    ref_embeddings, ref_labels, ref_where = embeddings, labels, where
  else:
    ref_embeddings, ref_labels = U.check_labeled_matrix("ref_embeddings", ref_embeddings, "ref_labels", ref_labels,
                                                        dim=embeddings.shape[1])
  b, r = embeddings.shape[0], ref_embeddings.shape[0]
  where = U.mask_or_ones("where", where, (b,))
  ref_where = U.mask_or_ones("ref_where", ref_where, (r,))
  dt = U.compute_dtype(embeddings, ref_embeddings)
  q = U.l2_normalize(embeddings.astype(dt))
  k = U.l2_normalize(ref_embeddings.astype(dt))
  sim = q @ k.T
  valid = where[:, None] & ref_where[None, :]
  same = labels[:, None] == ref_labels[None, :]
  pos = same & valid
  if self_ref:
    pos = pos & ~jnp.eye(b, dtype=bool)
  neg = ~same & valid
  return sim, pos, neg, where


def _mine(sim, pos, neg, epsilon):
  s = jax.lax.stop_gradient(sim)
  max_neg = U.masked_max(s, neg, axis=1)[:, None]   # -inf if no negatives
  min_pos = U.masked_min(s, pos, axis=1)[:, None]   # +inf if no positives
  hard_pos = pos & (s - epsilon < max_neg)
  hard_neg = neg & (s + epsilon > min_pos)
  return hard_pos, hard_neg


def multi_similarity_miner(embeddings, labels, ref_embeddings=None, ref_labels=None, *,
                           epsilon: float = 0.1, where: Optional[jax.Array] = None,
                           ref_where: Optional[jax.Array] = None):
  """Multi-Similarity pair miner (paper Eq. 8-9), as boolean masks.

  Args:
    embeddings: [B, D] float query embeddings (normalised internally).
    labels: [B] integer labels.
    ref_embeddings, ref_labels: optional [R, D] / [R] reference set (default: the queries; then the
      diagonal is excluded from positives).
    epsilon: mining margin (PML `MultiSimilarityMiner(epsilon=0.1)`).
    where, ref_where: optional [B] / [R] validity masks (padding).

  Returns:
    (hard_pos, hard_neg): [B, R] boolean masks of mined positive / negative pairs, equivalent to
    the PML miner's (a1, p) and (a2, n) index tuples. Not differentiable (value comparisons).
  """
  U.check_positive("epsilon", epsilon, allow_zero=True)
  sim, pos, neg, _ = _similarity_and_masks(embeddings, labels, ref_embeddings, ref_labels,
                                           where, ref_where)
  return _mine(sim, pos, neg, epsilon)


def multi_similarity_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *,
                          alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                          mining: bool = False, epsilon: float = 0.1,
                          require_both: bool = False, where: Optional[jax.Array] = None,
                          ref_where: Optional[jax.Array] = None):
  """Multi-Similarity loss (paper Eq. 15), optionally with MS pair mining (Eq. 8-9).

  Args:
    embeddings: [B, D] float embeddings (L2-normalised internally, `x / max(|x|, 1e-12)`).
    labels: [B] integer class labels.
    ref_embeddings, ref_labels: optional reference set [R, D] / [R]; default = the batch itself.
    alpha, beta, base: positive scale, negative scale and similarity threshold lambda.
    mining: apply the MS miner with margin `epsilon` before weighting (PML miner + loss).
    require_both: official-code rule: an anchor contributes only if both (mined) sets are non-empty.
    where, ref_where: optional boolean validity masks of shape [B] / [R] (padding).

  Returns:
    Scalar loss, mean over valid anchors (anchors with empty sets count as 0). 0 for a batch
    without any valid pair.
  """
  for n, v in (("alpha", alpha), ("beta", beta)):
    U.check_positive(n, v)
  U.check_positive("epsilon", epsilon, allow_zero=True)
  sim, pos, neg, where = _similarity_and_masks(embeddings, labels, ref_embeddings, ref_labels,
                                               where, ref_where)
  if mining:
    pos, neg = _mine(sim, pos, neg, epsilon)
  pos_term = U.masked_logsumexp(-alpha * (sim - base), pos, axis=1, add_one=True) / alpha
  neg_term = U.masked_logsumexp(beta * (sim - base), neg, axis=1, add_one=True) / beta
  per_anchor = pos_term + neg_term
  if require_both:
    per_anchor = jnp.where(pos.any(1) & neg.any(1), per_anchor, 0.)
  return U.safe_mean(per_anchor, where)
