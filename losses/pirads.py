"""Losses of the co-training dual-path multi-task prostate zone segmentation (PI-RADS v2).

Paper: A. Das, S. Ghosh, S. Stober, "PI-RADS v2 Compliant Automated Segmentation of Prostate Zones Using
co-training Motivated Multi-task Dual-Path CNN", arXiv:2309.12970. Training has two stages: supervised training of
both paths, then fine-tuning with an unsupervised loss penalising the difference between the two paths'
predictions of the same class (co-training), with an auxiliary regression task on each path (multi-task).
Model: `lostjax.vision.pirads`.

With p the softmax probabilities, y the one-hot labels, sums over every voxel of the batch:

  Dice_c      = (2 Σ y_c p_c + smooth) / (Σ y_c + Σ p_c + smooth)          (smooth = 1, the lab baseline)
  L_dice(S)   = − Σ_{c ∈ S} Dice_c                                        (`pirads_dice_loss`; the baseline uses
                                                                           all classes)
  L_sdm       = mean (t̂ − t)²                                             (`pirads_sdm_loss`, tanh output vs the
                                                                           normalised signed distance map)
  L_co        = mean_{c, voxels} (p^A_c − p^B_c)²                          (`pirads_consistency_loss`)
  stage 1     L = L_dice^A(own(A) ∪ {BG}) + L_dice^B(own(B) ∪ {BG}) + λ_mt (L_sdm^A + L_sdm^B)
  stage 2     L = stage 1 + λ_co L_co                                      (`pirads_dual_path_loss`)

ASSUMED (the paper's body and code could not be consulted; each is a keyword argument pinned by a test): each path
is supervised on its own zones and background only; the consistency term covers all classes, is symmetric (no
stop-gradient on either path; `stop_gradient=True` treats path B as a fixed target) and uses λ_co = 1 in stage 2
(λ_co = 0 gives stage 1); the multi-task target is the signed distance map with λ_mt = 1; the fine-tuning stage
divides the learning rate by 10 (set in the training loop). L_co needs no labels and can be evaluated on unlabelled
volumes as well.

All functions are pure and jit/grad-safe; shapes and static arguments are checked while tracing.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from losses import _utils as U


def _classes(classes, num_classes: int):
  if classes is None:
    return tuple(range(num_classes))
  cls = tuple(int(c) for c in classes)
  if not cls or len(set(cls)) != len(cls) or min(cls) < 0 or max(cls) >= num_classes:
    raise ValueError(f"classes must be distinct indices in [0, {num_classes}), got {classes!r}")
  return cls


def pirads_soft_dice(probs, onehot, *, smooth: float = 1.0):
  """[C] soft Dice per class over the whole batch flattened: (2 Σ y p + smooth) / (Σ y + Σ p + smooth)."""
  p = U.check_float_array("probs", probs)
  y = U.as_float("onehot", onehot)
  U.check_shape("onehot", y, p.shape)
  if p.ndim < 2:
    raise ValueError(f"probs must be [..., C] with at least one voxel axis, got shape {p.shape}")
  if not smooth >= 0:
    raise ValueError(f"smooth must be >= 0, got {smooth!r}")
  dt = U.compute_dtype(p, y)
  p, y = p.astype(dt).reshape(-1, p.shape[-1]), y.astype(dt).reshape(-1, p.shape[-1])
  return (2.0 * jnp.sum(y * p, 0) + smooth) / (jnp.sum(y, 0) + jnp.sum(p, 0) + smooth)


def pirads_dice_loss(probs, onehot, *, classes: Optional[Sequence[int]] = None, smooth: float = 1.0):
  """− Σ_{c ∈ classes} Dice_c (all classes by default, as the baseline U-Net)."""
  dice = pirads_soft_dice(probs, onehot, smooth=smooth)
  cls = _classes(classes, dice.shape[0])
  return -jnp.sum(dice[jnp.asarray(cls)])


def pirads_sdm_loss(pred, target, *, where=None):
  """Mean squared error between the tanh SDM head and the signed-distance targets (optionally masked)."""
  p = U.check_float_array("pred", pred)
  t = U.as_float("target", target)
  U.check_shape("target", t, p.shape)
  dt = U.compute_dtype(p, t)
  m = U.mask_or_ones("where", where, p.shape).astype(dt)
  return jnp.sum(m * (p.astype(dt) - t.astype(dt)) ** 2) / jnp.maximum(jnp.sum(m), 1.0)


def pirads_consistency_loss(probs_a, probs_b, *, stop_gradient: bool = False):
  """Co-training term mean_{c, voxels} (p^A_c − p^B_c)²; symmetric unless `stop_gradient` fixes path B."""
  a = U.check_float_array("probs_a", probs_a)
  b = U.check_float_array("probs_b", probs_b)
  U.check_shape("probs_b", b, a.shape)
  if stop_gradient:
    b = jax.lax.stop_gradient(b)
  dt = U.compute_dtype(a, b)
  return jnp.mean((a.astype(dt) - b.astype(dt)) ** 2)


def pirads_dual_path_loss(outputs: Mapping[str, jax.Array], onehot, *, own_a: Sequence[int], own_b: Sequence[int],
                          sdm_a=None, sdm_b=None, lambda_mt: float = 1.0, lambda_co: float = 0.0,
                          smooth: float = 1.0, stop_gradient: bool = False):
  """Stage-1 (λ_co = 0) or stage-2 (λ_co > 0) loss of the dual-path model; returns (loss, parts).

  Args: outputs: the model's {'logits_a', 'logits_b'[, 'sdm_a', 'sdm_b']}; onehot [..., C]; own_a / own_b: class
  indices supervised on each path (`PiradsConfig.owned(0)`, `owned(1)`: own zones plus background); sdm_a / sdm_b:
  signed-distance targets matching outputs['sdm_a'] / ['sdm_b'] (needed when λ_mt > 0 and the model has SDM heads).
  parts: {'dice_a', 'dice_b', 'sdm', 'co'} (unweighted). λ_co may be a traced scalar, so both stages can share
  one compiled step."""
  for key in ("logits_a", "logits_b"):
    if key not in outputs:
      raise ValueError(f"outputs must hold '{key}', got keys {sorted(outputs)}")
  for name, lam in (("lambda_mt", lambda_mt), ("lambda_co", lambda_co)):
    if isinstance(lam, (int, float)) and lam < 0:     # a traced weight (e.g. the stage switch) is not checked
      raise ValueError(f"{name} must be >= 0, got {lam!r}")
  pa = jax.nn.softmax(U.check_float_array("logits_a", outputs["logits_a"]), axis=-1)
  pb = jax.nn.softmax(U.check_float_array("logits_b", outputs["logits_b"]), axis=-1)
  parts = {"dice_a": pirads_dice_loss(pa, onehot, classes=own_a, smooth=smooth),
           "dice_b": pirads_dice_loss(pb, onehot, classes=own_b, smooth=smooth)}
  loss = parts["dice_a"] + parts["dice_b"]
  has_sdm = "sdm_a" in outputs and "sdm_b" in outputs
  if has_sdm and not (isinstance(lambda_mt, (int, float)) and lambda_mt == 0):
    if sdm_a is None or sdm_b is None:
      raise ValueError("sdm_a and sdm_b targets are needed when the model has SDM heads and lambda_mt > 0")
    parts["sdm"] = pirads_sdm_loss(outputs["sdm_a"], sdm_a) + pirads_sdm_loss(outputs["sdm_b"], sdm_b)
    loss = loss + lambda_mt * parts["sdm"]
  else:
    parts["sdm"] = jnp.zeros((), loss.dtype)
  parts["co"] = pirads_consistency_loss(pa, pb, stop_gradient=stop_gradient)
  loss = loss + lambda_co * parts["co"]
  return loss, parts
