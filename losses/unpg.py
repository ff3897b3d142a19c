"""UNPG: Unified Negative Pair Generation for face recognition.

Paper: Jung, Lee, Oh, Park, Park, Son, "Unified Negative Pair Generation toward Well-discriminative
Feature Space for Face Recognition", arXiv:2203.11593 (2022); official code Jung-Jun-Uk/UNPG
(`recognition/models/head.py`, `models/build.py`, `data/head.zoo.yaml`).

  cos = f_hat W_hat^T;  ArcFace logit_c = cos(theta_c + m 1[c = y])  (CosFace: cos_c - m 1[c = y])
  sn  = {f_hat_i . f_hat_j : i < j, y_i != y_j}                        in-batch negative pairs (MLPG)
  Q1, Q3 = sorted(sn)[int(0.25 l)], sorted(sn)[int(0.75 l)],  IQR = Q3 - Q1   (l = |sn|)
  sn' = {x in sn : Q1 - w IQR <= x <= Q3 + w IQR}                      box-and-whisker filter
  L   = mean_i CE(s [logit_i,1..C, sn'_1..K], y_i)                      same sn' appended to every row

Defaults (head.zoo.yaml): s = 64, m = 0.5 (ArcFace), whisker w = 1.5. sn' is not detached
(gradients flow into the features through the pair similarities), as in the official code.
Deviations: cos is clamped to [-1 + 1e-7, 1 - 1e-7] before arccos (the official head calls acos
unclamped; its gradient is infinite at +-1); a batch without negative pairs gives the plain
margin-softmax CE (the official code crashes there). The filter is implemented with a static-size
mask over the B x B pair matrix.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U


def unpg_loss(features, class_weights, labels, *, scale: float = 64.0, margin: float = 0.5,
              margin_type: str = "arcface", whisker: float = 1.5,
              where: Optional[jax.Array] = None):
  """UNPG loss.

  Args:
    features: [B, d] embeddings; class_weights: [C, d] classifier weights; labels: [B] ints.
    scale, margin, margin_type ("arcface" | "cosface"), whisker: see module docstring.
    where: optional [B] validity mask (invalid samples give no pairs and no CE term).
  """
  U.check_choice("margin_type", margin_type, ("arcface", "cosface"))
  U.check_positive("scale", scale)
  U.check_positive("whisker", whisker, allow_zero=True)
  f, y = U.check_labeled_matrix("features", features, "labels", labels)
  w = U.check_matrix("class_weights", class_weights, dim=f.shape[1])
  valid = U.mask_or_ones("where", where, f.shape[:1])
  dt = U.compute_dtype(f, w)
  fn, wn = U.l2_normalize(f.astype(dt)), U.l2_normalize(w.astype(dt))
  cos = fn @ wn.T
  onehot = y[:, None] == jnp.arange(w.shape[0])[None, :]
  if margin_type == "arcface":
    theta = jnp.arccos(jnp.clip(cos, -1 + 1e-7, 1 - 1e-7))
    logits = jnp.where(onehot, jnp.cos(theta + margin), cos)
  else:
    logits = cos - margin * onehot.astype(dt)
  b = f.shape[0]
  pair = fn @ fn.T
  upper = jnp.triu(jnp.ones((b, b), bool), k=1)
  neg = upper & (y[:, None] != y[None, :]) & valid[:, None] & valid[None, :]
  flat, fmask = pair.reshape(-1), neg.reshape(-1)
  count = jnp.sum(fmask)
  srt = jnp.sort(jnp.where(fmask, jax.lax.stop_gradient(flat), jnp.inf))
  q1 = srt[jnp.floor(0.25 * count).astype(jnp.int32)]
  q3 = srt[jnp.floor(0.75 * count).astype(jnp.int32)]
  iqr = q3 - q1
  keep = fmask & (flat >= q1 - whisker * iqr) & (flat <= q3 + whisker * iqr)
  # the extra logits are the same for every row: log-sum-exp them once, then combine per row
  lse_extra = U.masked_logsumexp(scale * flat, keep, axis=0)
  lse_cls = jax.nn.logsumexp(scale * logits, axis=1)
  lse = jnp.where(jnp.any(keep), jnp.logaddexp(lse_cls, lse_extra), lse_cls)
  ce = lse - scale * jnp.sum(jnp.where(onehot, logits, 0.), axis=1)
  return U.safe_mean(ce, valid)
