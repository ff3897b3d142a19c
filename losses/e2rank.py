"""E2Rank: InfoNCE + RankNet on cosine scores.

Paper: Liu, Zhang, Li, Long, Xie, Mao, "E2Rank: Your Text Embedding can Also be an Effective and
Efficient Listwise Reranker", arXiv:2510.22733 (2025); official code Alibaba-NLP/E2Rank
(`src/modeling.py`, `src/arguments.py`, `scripts/train_e2rank_0.6b.sh`).

  L_emb  = mean_i CE( (e_q_i . e_D^T) / tau , target_i = i * |D|/|Q| )      in-batch InfoNCE
  s_ij   = scale * cos(e_qhat_i, e_d_ij)                                     pseudo-query vs candidates
  L_rank = mean over all (i, j, k) with rel_ij > rel_ik of softplus(-(s_ij - s_ik))   (RankNet, pooled)
  L      = w_emb * L_emb + w_rank * L_rank

Defaults from the official training script: tau = 0.03, scale (ranknet_scale_factor) = 10,
w_rank (loss_ranknet_factor) = 2, w_emb = 1. Embeddings are L2-normalised here (`x / max(|x|, 1e-12)`;
the official model normalises its pooled outputs). The RankNet pair mean is pooled over the whole
batch, as in the official `rank_net` (== `rax.pairwise_logistic_loss` with mean reduction).
"""
from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U


def e2rank_infonce_loss(query_emb, doc_emb, *, temperature: float = 0.03):
  """In-batch InfoNCE: query i's positive is document i * (D // Q) (group layout [Q, g])."""
  U.check_positive("temperature", temperature)
  q = U.check_float_array("query_emb", query_emb)
  d = U.check_float_array("doc_emb", doc_emb)
  U.check_ndim("query_emb", q, 2)
  U.check_ndim("doc_emb", d, 2)
  if d.shape[1] != q.shape[1] or d.shape[0] % q.shape[0] != 0:
    raise ValueError(f"doc_emb shape {d.shape} must be [k * {q.shape[0]}, {q.shape[1]}]")
  dt = U.compute_dtype(q, d)
  logits = U.l2_normalize(q.astype(dt)) @ U.l2_normalize(d.astype(dt)).T / temperature
  group = d.shape[0] // q.shape[0]
  target = jnp.arange(q.shape[0]) * group
  logp = jax.nn.log_softmax(logits, axis=1)
  return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=1))


def e2rank_ranknet_loss(pseudo_query_emb, cand_emb, relevance, *, scale: float = 10.0,
                        where: Optional[jax.Array] = None):
  """RankNet on scaled cosine scores, mean over all ordered pairs rel_ij > rel_ik of the batch.

  Args:
    pseudo_query_emb: [Q, D]; cand_emb: [Q, L, D]; relevance: [Q, L] (larger = better, e.g.
      L - teacher rank); where: optional [Q, L] validity mask.
  """
  qh = U.check_float_array("pseudo_query_emb", pseudo_query_emb)
  c = U.check_float_array("cand_emb", cand_emb)
  U.check_ndim("pseudo_query_emb", qh, 2)
  U.check_ndim("cand_emb", c, 3)
  if c.shape[0] != qh.shape[0] or c.shape[2] != qh.shape[1]:
    raise ValueError(f"cand_emb shape {c.shape} must be [{qh.shape[0]}, L, {qh.shape[1]}]")
  U.check_shape("relevance", relevance, c.shape[:2])
  where = U.mask_or_ones("where", where, c.shape[:2])
  dt = U.compute_dtype(qh, c)
  s = scale * jnp.einsum("qd,qld->ql", U.l2_normalize(qh.astype(dt)), U.l2_normalize(c.astype(dt)))
  rel = jnp.asarray(relevance).astype(dt)
  pair = (rel[:, :, None] > rel[:, None, :]) & where[:, :, None] & where[:, None, :]
  return U.safe_mean(jax.nn.softplus(-(s[:, :, None] - s[:, None, :])), pair)


def e2rank_loss(query_emb, doc_emb, pseudo_query_emb, cand_emb, relevance, *,
                temperature: float = 0.03, scale: float = 10.0, w_emb: float = 1.0,
                w_rank: float = 2.0, where: Optional[jax.Array] = None):
  """Total E2Rank loss w_emb * InfoNCE(query, docs) + w_rank * RankNet(pseudo-query, candidates)."""
  return (w_emb * e2rank_infonce_loss(query_emb, doc_emb, temperature=temperature)
          + w_rank * e2rank_ranknet_loss(pseudo_query_emb, cand_emb, relevance, scale=scale, where=where))
