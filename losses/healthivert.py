"""HealthiVert-GAN losses: adversarial, hole-weighted L1, two Dice terms, Sobel edge loss, SHRM height loss.

Paper: "HealthiVert-GAN: A Novel Framework of Pseudo-Healthy Vertebral Image Synthesis for Interpretable
Compression Fracture Grading", arXiv:2503.05990. Weights are those of the released training code (the paper's
text could not be consulted); the generator objective is

  L_G = L_GAN + L_L1 + L_dice_fine + L_edge + L_dice_coarse + L_h

* `bce_logits(z, t)`: mean binary cross-entropy with logits over all PatchGAN logits (vanilla GAN).
* `discriminator_loss`: L_Dk = (BCE(D_k(real), 1) + BCE(D_k(fake), 0)) / 2, fake stop-gradiented, k = 1, 2, 3.
* `generator_adversarial_loss`: L_GAN = (BCE(D1(fake), 1) + BCE(D2(fake_mask), 1) + BCE(D3(fake_local), 1)) / 6.
* `masked_l1_loss`: L_L1 = (mean|fake - real| + mean|fake_coarse - real|) / 2 * lambda * 2 * (H W) / nnz(mask),
  lambda = 200, means over all B H W pixels and nnz over the whole batch ("official"). With the same hole in
  every sample this is lambda (S_fine + S_coarse) / (B nnz(mask)) with S the summed absolute error, a weight that
  shrinks as 1/B; "per_pixel" drops that factor: lambda (S_fine + S_coarse) / nnz(mask) (official x B).
* `dice_coefficient(p, g)` = mean_b (2 sum p g + 1e-5) / (sum p + sum g + 1e-5) (per-sample sums, no activation);
  L_dice_fine = 15 (1 - Dice(fine_seg, real_mask)), L_dice_coarse = 10 (1 - Dice(coarse_seg, normal_vert)).
* `sobel_edges`: replicate padding, cross-correlation with Gx = [[-1,0,1],[-2,0,2],[-1,0,1]] and
  Gy = [[1,2,1],[0,0,0],[-1,-2,-1]], magnitude min(sqrt(gx^2 + gy^2), 1) (EEM).
  L_edge = 800 mean((Sobel(fake_mask) - Sobel(real_mask))^2).
* `height_loss` (SHRM): L_h = mean_b [40 |band p1 - H| / H + 40 |band p2 - H| / H].

Which mask reaches L_edge and D2 (soft segmentation, or the reference's thresholded mask that makes both terms
useless to the generator) is chosen where the mask is built (`lostjax.vision.healthivert.mask_switch`).
Deviation: the Sobel magnitude uses sqrt with a zero gradient at 0 (the reference's sqrt has an infinite one);
values are identical.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from losses import _utils as U

LAMBDA_L1 = 200.
DICE_FINE_WEIGHT = 15.
DICE_COARSE_WEIGHT = 10.
EDGE_WEIGHT = 800.
HEIGHT_WEIGHT = 40.
L1_NORMS = ("official", "per_pixel")


def bce_logits(logits, target: float):
  """Mean binary cross-entropy with logits against a constant target (1 real, 0 fake)."""
  z = U.check_float_array("logits", logits)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(z, jnp.full_like(z, target)))


def discriminator_loss(real_logits, fake_logits):
  """(BCE(real, 1) + BCE(fake, 0)) / 2; the fake logits' input is stop-gradiented by the caller (D step)."""
  return 0.5 * (bce_logits(real_logits, 1.) + bce_logits(fake_logits, 0.))


def generator_adversarial_loss(fake_logits: Sequence, *, scale: float = 1. / 6.):
  """scale * sum_k BCE(D_k(fake_k), 1) over the three discriminators (scale 1/6 in the reference)."""
  if len(fake_logits) == 0:
    raise ValueError("fake_logits must hold at least one discriminator's logits, got none")
  return scale * sum(bce_logits(z, 1.) for z in fake_logits)


def masked_l1_loss(fake, fake_coarse, real, mask, *, weight: float = LAMBDA_L1, norm: str = "official"):
  """Hole-weighted L1 of both composed stages against the real slice (see the module docstring).

  fake, fake_coarse, real: [B, H, W, C]; mask: the hole mask [B, H, W, 1] (its non-zero count normalises).
  norm: "official" (reference; weight shrinks as 1/B) or "per_pixel" (official x B).
  """
  if norm not in L1_NORMS:
    raise ValueError(f"norm must be one of {L1_NORMS}, got {norm!r}")
  f = U.check_float_array("fake", fake)
  U.check_shape("fake_coarse", fake_coarse, f.shape)
  U.check_shape("real", real, f.shape)
  if f.ndim != 4 or mask.shape[:3] != f.shape[:3]:
    raise ValueError(f"fake must be [B, H, W, C] and mask [B, H, W, 1], got {f.shape} and {mask.shape}")
  nnz = jnp.maximum(jnp.count_nonzero(mask), 1).astype(f.dtype)
  total = jnp.sum(jnp.abs(f - real)) + jnp.sum(jnp.abs(fake_coarse - real))
  if norm == "per_pixel":
    return weight * total / nnz
  b, h, w = f.shape[:3]
  means = total / f.size
  return means * 0.5 * weight * (h * w / nnz) * 2.


def dice_coefficient(pred, target, *, smooth: float = 1e-5):
  """mean_b (2 sum(p g) + smooth) / (sum p + sum g + smooth), sums per sample over all other axes."""
  p = U.check_float_array("pred", pred)
  U.check_shape("target", target, p.shape)
  p = p.reshape(p.shape[0], -1)
  g = jnp.asarray(target, p.dtype).reshape(p.shape)
  return jnp.mean((2 * jnp.sum(p * g, 1) + smooth) / (jnp.sum(p, 1) + jnp.sum(g, 1) + smooth))


def dice_loss(pred, target, *, weight: float = 1., smooth: float = 1e-5):
  """weight * (1 - Dice(pred, target)); weight 15 for the fine segmentation, 10 for the coarse one."""
  return weight * (1. - dice_coefficient(pred, target, smooth=smooth))


def _safe_sqrt(x):
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.)), 0.)


def sobel_edges(x, *, clip: float = 1.):
  """Sobel gradient magnitude of [B, H, W, 1] (replicate padding), clipped at `clip` (1 in the reference)."""
  x = U.check_float_array("x", x)
  if x.ndim != 4 or x.shape[-1] != 1:
    raise ValueError(f"x must be [B, H, W, 1], got {x.shape}")
  gx = jnp.array([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]], x.dtype)
  gy = jnp.array([[1., 2., 1.], [0., 0., 0.], [-1., -2., -1.]], x.dtype)
  kern = jnp.stack([gx, gy], -1)[:, :, None, :]  # HWIO
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  g = jax.lax.conv_general_dilated(xp, kern, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.minimum(_safe_sqrt(jnp.sum(g * g, -1, keepdims=True)), clip)


def edge_loss(fake_mask, real_mask, *, weight: float = EDGE_WEIGHT):
  """EEM: weight * mean((Sobel(fake_mask) - Sobel(real_mask))^2); the real edges carry no gradient."""
  U.check_shape("real_mask", real_mask, jnp.shape(fake_mask))
  real = jax.lax.stop_gradient(sobel_edges(jnp.asarray(real_mask, jnp.result_type(fake_mask))))
  return weight * jnp.mean((sobel_edges(fake_mask) - real) ** 2)


def height_loss(p1, p2, height, *, band: float = 40., weight: float = HEIGHT_WEIGHT):
  """SHRM: mean_b [weight |band p1 - H| / H + weight |band p2 - H| / H]; p1, p2, height: [B]."""
  p1 = U.check_float_array("p1", p1)
  U.check_shape("p2", p2, p1.shape)
  U.check_shape("height", height, p1.shape)
  h = jnp.asarray(height, p1.dtype)
  return jnp.mean(weight * jnp.abs(band * p1 - h) / h + weight * jnp.abs(band * p2 - h) / h)


def healthivert_generator_loss(out: dict, batch: dict, fake_logits: Sequence, *, band: float = 40.,
                               l1_norm: str = "official", lambda_l1: float = LAMBDA_L1,
                               dice_fine_weight: float = DICE_FINE_WEIGHT,
                               dice_coarse_weight: float = DICE_COARSE_WEIGHT, edge_weight: float = EDGE_WEIGHT,
                               height_weight: float = HEIGHT_WEIGHT, gan_scale: float = 1. / 6.):
  """The generator objective L_G and its terms.

  out: `lostjax.vision.healthivert.healthivert_forward`'s dict ('fake', 'fake_coarse', 'fine_seg', 'coarse_seg',
  'fake_mask', 'p1', 'p2'); batch: 'real', 'mask', 'real_mask', 'normal_vert', 'height'; fake_logits: the three
  discriminators' logits on (out['fake'], out['fake_mask'], out['fake_local']). Returns (L_G, dict of terms).
  """
  terms = {
      "gan": generator_adversarial_loss(fake_logits, scale=gan_scale),
      "l1": masked_l1_loss(out["fake"], out["fake_coarse"], batch["real"], batch["mask"], weight=lambda_l1,
                           norm=l1_norm),
      "dice_fine": dice_loss(out["fine_seg"], batch["real_mask"], weight=dice_fine_weight),
      "edge": edge_loss(out["fake_mask"], batch["real_mask"], weight=edge_weight),
      "dice_coarse": dice_loss(out["coarse_seg"], batch["normal_vert"], weight=dice_coarse_weight),
      "height": height_loss(out["p1"], out["p2"], batch["height"], band=band, weight=height_weight),
  }
  return sum(terms.values()), terms
