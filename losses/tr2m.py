"""TR2M: scale-oriented contrastive loss (coarse image level + fine pixel level).

Paper: "TR2M: Transferring Monocular Relative Depth to Metric Depth with Language Descriptions and Dual-Level
Scale-Oriented Contrast", arXiv:2506.13387 (v1 "... and Scale-Oriented Contrast"; v2 CVPR 2026). Metric depth
is predicted as 1 / (A * D_r + B) from a relative depth D_r; the scale-oriented contrast L_soc = L_coarse + L_fine
shapes the fused features by metric scale.

* coarse (`tr2m_coarse_loss`): image embeddings (average-pooled fused features) of the batch are ranked by the
  pseudo scale alpha (`tr2m_pseudo_scale`: least-squares fit alpha D_r + beta ~ target per image); images whose
  rank distance is |r_i - r_j| < t are positives, the others negatives. Supervised-contrastive form:
    L_i = -(1/|P_i|) sum_{p in P_i} log( exp(s_ip/tau) / sum_{a != i} exp(s_ia/tau) ),  s = cosine similarity,
  averaged over the anchors with at least one positive.
* fine (`tr2m_fine_loss`): ground-truth depth is quantised into classes (`tr2m_depth_classes`,
  Y = round((d_max - D) / (d_max - d_min) * |C|), clipped to [0, |C|]); query pixel embeddings are contrasted with
  key pixel embeddings from the momentum (EMA) branch, keys of the same class being positives:
    L_i = -(1/|P_i|) sum_{p: y_p = y_i} log( exp(q_i.k_p/tau) / sum_a exp(q_i.k_a/tau) ),
  averaged over the queries with at least one positive; keys are stop-gradiented. `tr2m_ema` updates the key
  branch (momentum 0.99, the released `--pixpro_momentum` default).
* `tr2m_soc_loss` = coarse + fine. The paper weights L_soc by lambda_3 = 0.1 in the total loss.

The exact contrastive formula, tau, |C|, t and the pixel sampling are not public (no training code is released);
our documented defaults, pinned by tests (docs/losses_amcl_repmtl_tr2m_ast.md): SupCon "L_out" form as above with the anchor's
own sample excluded from the coarse denominator; tau = 0.1 for both levels; t = 2 (each image's neighbours in
the scale ranking are its positives); |C| = 10 classes; pixels from every image of the batch are pooled (pass
one image at a time, e.g. with jax.vmap, for per-image contrast); ties in the scale ranking are broken by index.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U


def tr2m_pseudo_scale(relative, target, *, where: Optional[jax.Array] = None, eps: float = 1e-12):
  """Per-image least-squares scale alpha of `alpha * relative + beta ~ target` over valid pixels.

  Args: relative, target: [B, ...] (e.g. relative depth and the inverse ground-truth depth); where: optional
  [B, ...] valid-pixel mask. Returns [B]. An image with constant relative depth gets alpha = 0.
  """
  r = U.check_float_array("relative", relative)
  t = U.check_float_array("target", target)
  U.check_shape("target", t, r.shape)
  if r.ndim < 2:
    raise ValueError(f"relative must have shape [B, ...] (ndim >= 2), got {r.shape}")
  m = U.mask_or_ones("where", where, r.shape)
  dt = U.compute_dtype(r, t)
  r, t = r.astype(dt).reshape(r.shape[0], -1), t.astype(dt).reshape(r.shape[0], -1)
  m = m.reshape(r.shape).astype(dt)
  n = jnp.maximum(jnp.sum(m, 1), 1.)
  rm = jnp.sum(m * r, 1) / n
  tm = jnp.sum(m * t, 1) / n
  cov = jnp.sum(m * (r - rm[:, None]) * (t - tm[:, None]), 1)
  var = jnp.sum(m * (r - rm[:, None]) ** 2, 1)
  return jnp.where(var > eps, cov / jnp.where(var > eps, var, 1.), 0.)


def tr2m_depth_classes(depth, d_min: float, d_max: float, num_classes: int = 10):
  """Depth quantisation Y = round((d_max - D) / (d_max - d_min) * |C|), clipped to [0, |C|] (int32)."""
  if not d_max > d_min:
    raise ValueError(f"d_max must be > d_min, got d_min={d_min}, d_max={d_max}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
  d = U.as_float("depth", depth)
  y = jnp.round((d_max - d) / (d_max - d_min) * num_classes)
  return jnp.clip(y, 0, num_classes).astype(jnp.int32)


def _scale_ranks(scales):
  order = jnp.argsort(scales, stable=True)
  return jnp.zeros_like(order).at[order].set(jnp.arange(scales.shape[0], dtype=order.dtype))


def _supcon(logits, pos, denom_mask, anchor_valid):
  lse = U.masked_logsumexp(logits, denom_mask)
  npos = jnp.sum(pos, -1)
  mean_pos = jnp.sum(jnp.where(pos, logits, 0.), -1) / jnp.maximum(npos, 1)
  per = lse - mean_pos
  return U.safe_mean(per, anchor_valid & (npos > 0))


def tr2m_coarse_loss(embeddings, scales, *, window: int = 2, tau: float = 0.1,
                     where: Optional[jax.Array] = None):
  """Image-level scale-oriented contrast (see the module docstring).

  Args:
    embeddings: [B, D] pooled image features; scales: [B] pseudo scales (ranked under stop_gradient).
    window: t, images with scale-rank distance < t are positives (default 2; missing in the paper).
    tau: temperature (default 0.1; missing in the paper). where: optional [B] mask of valid images
      (invalid ones are excluded from the ranking, the positives and the denominators).
  """
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"window must be an int >= 1, got {window!r}")
  U.check_positive("tau", tau)
  e = U.check_matrix("embeddings", embeddings)
  s = U.check_float_array("scales", scales)
  U.check_shape("scales", s, e.shape[:1])
  b = e.shape[0]
  valid = U.mask_or_ones("where", where, (b,))
  dt = U.compute_dtype(e, s)
  s = jax.lax.stop_gradient(s.astype(dt))
  # invalid images sort last so that the valid ones get ranks 0..n-1
  rank = _scale_ranks(jnp.where(valid, s, jnp.inf))
  z = U.l2_normalize(e.astype(dt))
  logits = z @ z.T / tau
  other = ~jnp.eye(b, dtype=bool) & valid[None, :] & valid[:, None]
  pos = other & (jnp.abs(rank[:, None] - rank[None, :]) < window)
  return _supcon(logits, pos, other, valid)


def tr2m_fine_loss(queries, keys, labels, *, tau: float = 0.1, where: Optional[jax.Array] = None,
                   detach_keys: bool = True):
  """Pixel-level scale-oriented contrast between query pixels and momentum-branch key pixels.

  Args:
    queries, keys: [N, D] pixel embeddings at the same N sampled pixels (query branch, EMA key branch);
      labels: [N] depth classes (`tr2m_depth_classes`). where: optional [N] valid-pixel mask.
    tau: temperature (default 0.1; missing in the paper). detach_keys: stop the gradient into the keys
      (MoCo/PixPro momentum encoder).
  """
  U.check_positive("tau", tau)
  q, y = U.check_labeled_matrix("queries", queries, "labels", labels)
  k = U.check_matrix("keys", keys, dim=q.shape[1])
  U.check_shape("keys", k, q.shape)
  n = q.shape[0]
  valid = U.mask_or_ones("where", where, (n,))
  dt = U.compute_dtype(q, k)
  if detach_keys:
    k = jax.lax.stop_gradient(k)
  qn, kn = U.l2_normalize(q.astype(dt)), U.l2_normalize(k.astype(dt))
  logits = qn @ kn.T / tau
  denom = valid[None, :] & valid[:, None]
  pos = denom & (y[:, None] == y[None, :])
  return _supcon(logits, pos, denom, valid)


def tr2m_soc_loss(embeddings, scales, queries, keys, labels, *, window: int = 2, tau_coarse: float = 0.1,
                  tau_fine: float = 0.1, where: Optional[jax.Array] = None,
                  pixel_where: Optional[jax.Array] = None):
  """L_soc = tr2m_coarse_loss(embeddings, scales) + tr2m_fine_loss(queries, keys, labels)."""
  return (tr2m_coarse_loss(embeddings, scales, window=window, tau=tau_coarse, where=where)
          + tr2m_fine_loss(queries, keys, labels, tau=tau_fine, where=pixel_where))


def tr2m_ema(key_params, query_params, momentum: float = 0.99):
  """Momentum update of the key branch: k <- m k + (1 - m) q (leaf-wise)."""
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(f"momentum must be in [0, 1], got {momentum}")
  if jax.tree.structure(key_params) != jax.tree.structure(query_params):
    raise ValueError("key_params and query_params must have the same pytree structure")
  return jax.tree.map(lambda k, q: momentum * k + (1.0 - momentum) * q, key_params, query_params)
