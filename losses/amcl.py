"""AMCL: Adaptive Multi-head Contrastive Learning.

Paper: Lei Wang, Piotr Koniusz, Tom Gedeon, Liang Zheng, "Adaptive Multi-head Contrastive Learning",
arXiv:2310.05615 (ECCV 2024); losses from the paper's Table 2 (the authors' repo LeiWangR/cl ships it as
`images/table2.png`), temperature network and defaults from `src/amcl_components/adaptive_temperature.py`.

With C heads, cosine similarity sim, a temperature per head and per pair, and
    Omega(tau) = (d'/2) log(tau) + 1/tau           (d' = projection dimension; Gaussian NLL of unit vectors)
the losses, summed over heads and averaged over anchors i, are (Table 2):

* `amcl_loss`, NT-Xent / MoCo form (Eq. 2.1): the log-sum-exp over negatives is replaced by the hardest negative
    sum_c [ -sim(z_i^c, z_i^c+)/tau_i^c+ + max_n sim(z_i^c, z_in^c-)/tau_in*^c- + beta Omega(tau_i^c+)
            - beta Omega(tau_in*^c-) ]
  with n* the argmax (its temperature is gathered there). `variant="infonce"` (Eq. 2.4, LGP/CAN) takes the max
  over the N negatives and the positive. `amcl_simclr_loss` is the same on SimCLR in-batch pairs: 2B anchors,
  each with its other view as positive and the 2B-2 other samples as negatives.
* `amcl_symnegcos_loss` (Eq. 2.2, SimSiam) and `amcl_barlow_twins_loss` (Eq. 2.3).
* `amcl_temperature`: tau = l + (u - l) sigmoid(phi_c([z_a; z_b])), phi_c = Linear(2d' -> 128) -> ReLU ->
  Linear(128 -> 1), one MLP per head (stack the same parameters C times for the paper's "shared" MLP),
  l = 1e-5, u = 2. beta = 0.1 (code default; the paper's value is not given).

Choices where the sources are silent (pinned by tests, see docs/losses_amcl_repmtl_tr2m_ast.md):
* `reduction="logsumexp"` (our extension) keeps the standard log-sum-exp over negatives with per-pair
  temperatures and weights Omega of the negatives by their softmax weights (the smooth version of picking n*).
  With C = 1, beta = 0, one temperature and variant="infonce" it equals NT-Xent as in `optax.losses.ntxent`.
* An anchor with no valid negative gets no negative and no negative-Omega term (log-sum-exp of nothing = 0).
* Features are L2-normalised inside (sim = cosine); the temperature network sees the raw features.
* The released `AMCLSimCLRModel.training_step` (matched pair only, no negatives) is not reproduced.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U


def amcl_omega(tau, dim: int):
  """Omega(tau) = (dim/2) log(tau) + 1/tau."""
  if not isinstance(dim, int) or dim < 1:
    raise ValueError(f"dim must be an int >= 1, got {dim!r}")
  tau = U.check_float_array("tau", tau)
  return 0.5 * dim * jnp.log(tau) + 1.0 / tau


def amcl_temperature_init(key, num_heads: int, dim: int, hidden: int = 128, dtype=jnp.float32):
  """Parameters of C per-head temperature MLPs (torch nn.Linear default init, U(+-1/sqrt(fan_in)))."""
  for name, v in (("num_heads", num_heads), ("dim", dim), ("hidden", hidden)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be an int >= 1, got {v!r}")
  k1, k2, k3, k4 = jax.random.split(key, 4)
  a1, a2 = (2 * dim) ** -0.5, hidden ** -0.5
  w1 = jax.random.uniform(k1, (num_heads, 2 * dim, hidden), dtype, -a1, a1)
  return {"w1a": w1[:, :dim], "w1b": w1[:, dim:],
          "b1": jax.random.uniform(k2, (num_heads, hidden), dtype, -a1, a1),
          "w2": jax.random.uniform(k3, (num_heads, hidden), dtype, -a2, a2),
          "b2": jax.random.uniform(k4, (num_heads,), dtype, -a2, a2)}


def amcl_temperature(params, za, zb, *, lower: float = 1e-5, upper: float = 2.0):
  """Per-head, per-pair temperatures tau = lower + (upper - lower) sigmoid(phi_c([za; zb])).

  Args:
    params: from `amcl_temperature_init` (leaves with a leading head axis C).
    za, zb: [C, ..., D] features, broadcastable against each other after the head axis (e.g. za [C, B, 1, D]
      and zb [C, 1, N, D] give all B x N pairs without materialising the concatenation).
  Returns [C, ...] temperatures.
  """
  if not lower < upper:
    raise ValueError(f"lower must be < upper, got lower={lower}, upper={upper}")
  U.check_positive("lower", lower)
  za, zb = U.check_float_array("za", za), U.check_float_array("zb", zb)
  c, d = params["w1a"].shape[0], params["w1a"].shape[1]
  for name, z in (("za", za), ("zb", zb)):
    if z.ndim < 2 or z.shape[0] != c or z.shape[-1] != d:
      raise ValueError(f"{name} must have shape [C={c}, ..., D={d}], got {z.shape}")
  dt = U.compute_dtype(za, zb)
  ha = jnp.einsum("c...d,cdh->c...h", za.astype(dt), params["w1a"].astype(dt))
  hb = jnp.einsum("c...d,cdh->c...h", zb.astype(dt), params["w1b"].astype(dt))
  nd = max(ha.ndim, hb.ndim)
  b1 = params["b1"].astype(dt).reshape((c,) + (1,) * (nd - 2) + (-1,))
  h = jax.nn.relu(ha + hb + b1)
  out = jnp.einsum("c...h,ch->c...", h, params["w2"].astype(dt))
  out = out + params["b2"].astype(dt).reshape((c,) + (1,) * (out.ndim - 1))
  return lower + (upper - lower) * jax.nn.sigmoid(out)


def _heads(name, x, ndim):
  """[C, ...] features with `ndim` dims, or one head without the C axis."""
  x = U.check_float_array(name, x)
  if x.ndim == ndim - 1:
    x = x[None]
  if x.ndim != ndim:
    raise ValueError(f"{name} must have ndim {ndim} (or {ndim - 1} for one head), got shape {x.shape}")
  return x


def _bcast(name, x, shape):
  x = U.as_float(name, x)
  try:
    return jnp.broadcast_to(x, shape)
  except ValueError:
    raise ValueError(f"{name} must broadcast to {tuple(shape)}, got shape {x.shape}") from None


def _core(pos_sim, neg_sim, tau_pos, tau_neg, neg_mask, valid, beta, dim, variant, reduction):
  """Per-anchor AMCL terms from similarities [C, B] / [C, B, N] and matching temperatures."""
  dt = pos_sim.dtype
  tau_neg = jnp.where(neg_mask, tau_neg, 1.)   # masked pairs: any placeholder temperature, finite gradients
  pos_logit = pos_sim / tau_pos
  neg_logit = neg_sim / tau_neg
  om_pos = 0.5 * dim * jnp.log(tau_pos) + 1.0 / tau_pos
  om_neg = 0.5 * dim * jnp.log(tau_neg) + 1.0 / tau_neg
  if variant == "infonce":
    neg_logit = jnp.concatenate([neg_logit, pos_logit[..., None]], -1)
    om_neg = jnp.concatenate([om_neg, om_pos[..., None]], -1)
    neg_mask = jnp.concatenate([neg_mask, jnp.ones(neg_mask.shape[:-1] + (1,), bool)], -1)
  has = jnp.any(neg_mask, -1)
  if reduction == "max":
    star = jnp.argmax(jnp.where(neg_mask, jax.lax.stop_gradient(neg_logit), -jnp.inf), -1)[..., None]
    hard = jnp.take_along_axis(neg_logit, star, -1)[..., 0]
    om_hard = jnp.take_along_axis(om_neg, star, -1)[..., 0]
  else:
    hard = U.masked_logsumexp(neg_logit, neg_mask)
    w = jax.nn.softmax(jnp.where(neg_mask, neg_logit, -jnp.inf), -1)
    om_hard = jnp.sum(jnp.where(neg_mask, w * om_neg, 0.), -1)
  hard = jnp.where(has, hard, 0.)
  om_hard = jnp.where(has, om_hard, 0.)
  per = -pos_logit + hard + beta * om_pos - beta * om_hard          # [C, B]
  return U.safe_mean(jnp.sum(per, 0).astype(dt), valid)


def _check_opts(beta, variant, reduction):
  U.check_choice("variant", variant, ("ntxent", "infonce"))
  U.check_choice("reduction", reduction, ("max", "logsumexp"))
  U.check_positive("beta", beta, allow_zero=True)


def amcl_loss(anchors, positives, negatives, tau_pos, tau_neg, *, beta: float = 0.1, dim: Optional[int] = None,
              variant: str = "ntxent", reduction: str = "max", neg_where: Optional[jax.Array] = None,
              where: Optional[jax.Array] = None):
  """AMCL loss with explicit negatives (Table 2, Eq. 2.1 / 2.4).

  Args:
    anchors, positives: [C, B, D] (or [B, D] for one head); negatives: [C, B, N, D] (or [B, N, D]).
    tau_pos: temperatures broadcastable to [C, B]; tau_neg: broadcastable to [C, B, N] (e.g. from
      `amcl_temperature`). Must be > 0.
    beta: weight of Omega; dim: d' in Omega (default D).
    variant: "ntxent" (max over negatives) or "infonce" (max over negatives and the positive).
    reduction: "max" (the paper) or "logsumexp" (standard contrastive form with per-pair temperatures).
    neg_where: optional [B, N] or [C, B, N] bool mask of valid negatives; where: optional [B] anchor mask.
  Returns the scalar loss (sum over heads, mean over valid anchors).
  """
  _check_opts(beta, variant, reduction)
  a = _heads("anchors", anchors, 3)
  p = _heads("positives", positives, 3)
  n = _heads("negatives", negatives, 4)
  U.check_shape("positives", p, a.shape)
  if n.shape[:2] != a.shape[:2] or n.shape[-1] != a.shape[-1]:
    raise ValueError(f"negatives must have shape [C, B, N, D] = {a.shape[:2]} + [N, {a.shape[-1]}], got {n.shape}")
  c, b, num = n.shape[:3]
  dim = a.shape[-1] if dim is None else dim
  if not isinstance(dim, int) or dim < 1:
    raise ValueError(f"dim must be an int >= 1, got {dim!r}")
  dt = U.compute_dtype(a, p, n)
  an, pn, nn_ = (U.l2_normalize(x.astype(dt)) for x in (a, p, n))
  pos_sim = jnp.sum(an * pn, -1)
  neg_sim = jnp.einsum("cbd,cbnd->cbn", an, nn_)
  tp = _bcast("tau_pos", tau_pos, (c, b)).astype(dt)
  tn = _bcast("tau_neg", tau_neg, (c, b, num)).astype(dt)
  if neg_where is not None and jnp.ndim(neg_where) == 3:
    mask = U.mask_or_ones("neg_where", neg_where, (c, b, num))
  else:
    mask = jnp.broadcast_to(U.mask_or_ones("neg_where", neg_where, (b, num)), (c, b, num))
  valid = U.mask_or_ones("where", where, (b,))
  return _core(pos_sim, neg_sim, tp, tn, mask, valid, beta, dim, variant, reduction)


def amcl_simclr_loss(view_a, view_b, tau, *, beta: float = 0.1, dim: Optional[int] = None,
                     variant: str = "ntxent", reduction: str = "max", where: Optional[jax.Array] = None):
  """AMCL on SimCLR in-batch pairs.

  The 2B anchors are z = concat(view_a, view_b) along the batch; anchor i's positive is its other view
  (i +- B) and its negatives are the other 2B - 2 samples.

  Args:
    view_a, view_b: [C, B, D] (or [B, D]).
    tau: temperatures broadcastable to [C, 2B, 2B]; tau[c, i, j] is used for anchor i and pair j
      (e.g. `amcl_temperature(params, z[:, :, None], z[:, None])`).
    where: optional [B] mask of valid samples (both views).
  """
  _check_opts(beta, variant, reduction)
  za = _heads("view_a", view_a, 3)
  zb = _heads("view_b", view_b, 3)
  U.check_shape("view_b", zb, za.shape)
  c, b, d = za.shape
  dim = d if dim is None else dim
  if not isinstance(dim, int) or dim < 1:
    raise ValueError(f"dim must be an int >= 1, got {dim!r}")
  dt = U.compute_dtype(za, zb)
  z = U.l2_normalize(jnp.concatenate([za, zb], 1).astype(dt))
  sim = jnp.einsum("cid,cjd->cij", z, z)
  t = _bcast("tau", tau, (c, 2 * b, 2 * b)).astype(dt)
  valid = U.mask_or_ones("where", where, (b,))
  valid2 = jnp.concatenate([valid, valid])
  idx = jnp.arange(2 * b)
  pos = (idx + b) % (2 * b)
  pos_sim = sim[:, idx, pos]
  tau_pos = t[:, idx, pos]
  mask = (idx[:, None] != idx[None, :]) & (pos[:, None] != idx[None, :]) & valid2[None, :]
  return _core(pos_sim, sim, tau_pos, t, jnp.broadcast_to(mask, sim.shape), valid2, beta, dim, variant, reduction)


def amcl_symnegcos_loss(pred_a, pred_b, target_a, target_b, tau_a, tau_b, *, beta: float = 0.1,
                        dim: Optional[int] = None, where: Optional[jax.Array] = None):
  """AMCL for SimSiam (Table 2, Eq. 2.2).

    sum_c [ -sim(p_a, sg(t_b)) / (2 tau_a) - sim(p_b, sg(t_a)) / (2 tau_b) + beta Omega(tau_a) + beta Omega(tau_b) ]

  Args: predictor outputs pred_a/pred_b and projections target_a/target_b, [C, B, D] (or [B, D]); the targets
  are stop-gradiented. tau_a, tau_b broadcastable to [C, B]. Mean over (valid) samples.
  """
  U.check_positive("beta", beta, allow_zero=True)
  pa = _heads("pred_a", pred_a, 3)
  shape = pa.shape
  pb, ta, tb = (_heads(nm, x, 3) for nm, x in (("pred_b", pred_b), ("target_a", target_a), ("target_b", target_b)))
  for nm, x in (("pred_b", pb), ("target_a", ta), ("target_b", tb)):
    U.check_shape(nm, x, shape)
  c, b, d = shape
  dim = d if dim is None else dim
  dt = U.compute_dtype(pa, pb, ta, tb)
  cos = lambda x, y: jnp.sum(U.l2_normalize(x.astype(dt)) * U.l2_normalize(jax.lax.stop_gradient(y).astype(dt)), -1)
  t1 = _bcast("tau_a", tau_a, (c, b)).astype(dt)
  t2 = _bcast("tau_b", tau_b, (c, b)).astype(dt)
  per = (-cos(pa, tb) / (2 * t1) - cos(pb, ta) / (2 * t2) + beta * amcl_omega(t1, dim) + beta * amcl_omega(t2, dim))
  return U.safe_mean(jnp.sum(per, 0), U.mask_or_ones("where", where, (b,)))


def amcl_barlow_twins_loss(z_a, z_b, tau_pos, tau_neg, *, lambd: float = 5e-3, beta: float = 0.1,
                           dim: Optional[int] = None, eps: float = 1e-5):
  """AMCL for Barlow Twins (Table 2, Eq. 2.3).

    sum_c [ sum_l (1 - C_ll / tau_l+)^2 + lambd sum_{l != m} C_lm^2 / tau_lm- + beta sum_l Omega(tau_l+)
            - beta sum_{l != m} Omega(tau_lm-) ]
  with C^c the cross-correlation of the batch-standardised heads (mean 0, biased std over the batch, + eps as
  torch BatchNorm1d without affine): C = z_a_hat^T z_b_hat / B.

  Args: z_a, z_b [C, B, D] (or [B, D]); tau_pos broadcastable to [C, D]; tau_neg to [C, D, D] (diagonal unused).
  lambd: off-diagonal weight (Barlow Twins' default 5e-3).
  """
  U.check_positive("lambd", lambd, allow_zero=True)
  U.check_positive("beta", beta, allow_zero=True)
  za = _heads("z_a", z_a, 3)
  zb = _heads("z_b", z_b, 3)
  U.check_shape("z_b", zb, za.shape)
  c, b, d = za.shape
  if b < 2:
    raise ValueError(f"z_a must have a batch of at least 2 samples (batch statistics), got shape {za.shape}")
  dim = d if dim is None else dim
  dt = U.compute_dtype(za, zb)

  def std(x):
    x = x.astype(dt)
    mu = jnp.mean(x, 1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, 1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps)

  cc = jnp.einsum("cbl,cbm->clm", std(za), std(zb)) / b
  tp = _bcast("tau_pos", tau_pos, (c, d)).astype(dt)
  tn = _bcast("tau_neg", tau_neg, (c, d, d)).astype(dt)
  off = ~jnp.eye(d, dtype=bool)
  diag = jnp.diagonal(cc, axis1=1, axis2=2)
  on_term = jnp.sum((1 - diag / tp) ** 2, -1)
  off_term = jnp.sum(jnp.where(off, cc ** 2 / tn, 0.), (-1, -2))
  om_pos = jnp.sum(amcl_omega(tp, dim), -1)
  om_neg = jnp.sum(jnp.where(off, amcl_omega(tn, dim), 0.), (-1, -2))
  return jnp.sum(on_term + lambd * off_term + beta * om_pos - beta * om_neg)
