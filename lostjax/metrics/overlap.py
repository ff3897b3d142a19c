"""Dice overlap of two binary masks, shared by the segmentation metrics of two application papers.

Dice = 2 |A ∩ B| / (|A| + |B|) (Dice, "Measures of the amount of ecologic association between species", Ecology
1945). Its value when both masks are empty is a convention that the papers' evaluation code sets differently, so
it is the required keyword `empty`:
* `lostjax.metrics.segmentation.dice` (PI-RADS zones, arXiv:2309.12970): 1, two empty masks agree perfectly;
* `lostjax.metrics.healthivert.dice` (HealthiVert-GAN, arXiv:2503.05990): 0, as its evaluation code.

`xp` picks the array namespace: `jax.numpy` (default; jit-compatible, float32 unless x64 is enabled) or `numpy`
(host-side float64, as the segmentation metrics compute everything).
"""
from __future__ import annotations

import jax.numpy as jnp


def dice(a, b, *, empty: float, xp=jnp):
  """2 |A ∩ B| / (|A| + |B|) of two masks of one shape (non-zero = inside); `empty` when both are empty."""
  a, b = xp.asarray(a) != 0, xp.asarray(b) != 0
  if a.shape != b.shape:
    raise ValueError(f"the two masks must have the same shape, got {a.shape} and {b.shape}")
  total = xp.sum(a) + xp.sum(b)
  return xp.where(total > 0, 2 * xp.sum(a & b) / xp.maximum(total, 1), empty)
