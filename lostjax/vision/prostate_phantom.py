"""Synthetic prostate phantoms with the four PI-RADS v2 zones (for tests and examples without MRI data).

Used with the dual-path zone segmentation of arXiv:2309.12970 (`lostjax.vision.pirads`). In voxel coordinates of
the reference grid 16 x 64 x 64 (z, y, x; spacing 3.0 x 0.5 x 0.5 mm; y grows towards posterior):
  TZ   ellipsoid, centre (8, 34, 32), radii (5, 10, 12)
  PZ   posterior half (y > 34) of the ellipsoid centre (8, 34, 32), radii (6, 16, 18), minus the TZ dilated by one
       voxel (so PZ and TZ are separated by a thin gap, as a capsule would)
  AFS  anterior cap: ellipsoid centre (8, 20, 32), radii (4, 6, 12), minus TZ
  DPU  cylinder of radius `dpu_radius` (default 1.5) along z through (y, x) = (34, 32) in slices 4..11
with priority DPU > TZ > AFS > PZ > background, and T2-like intensities PZ 0.8, TZ 0.5, AFS 0.2, DPU 0.9,
background 0.3 plus Gaussian noise. Not every slice holds DPU or AFS, as in real data. Other grid shapes scale the
geometry (the DPU radius scales with the in-plane grid and is at least one voxel); `jitter` moves centres and
radii by a random relative amount per case. The real distal prostatic urethra is a tube of a few millimetres
around the urethral lumen; the default radius (0.75 mm at the reference spacing) keeps the reference phantom's
thin column, a larger `dpu_radius` draws a tube several voxels wide. Labels follow the class order of
`PiradsConfig`: [PZ, TZ, DPU, AFS, BG] = 0..4, or [PZ, TZ, BG] = 0..2 for the two-zone variant.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import ndimage

REFERENCE_SHAPE = (16, 64, 64)
REFERENCE_SPACING = (3.0, 0.5, 0.5)
INTENSITY = {"PZ": 0.8, "TZ": 0.5, "AFS": 0.2, "DPU": 0.9, "BG": 0.3}


def prostate_phantom(seed: int = 0, *, shape: Tuple[int, int, int] = REFERENCE_SHAPE, num_zones: int = 4,
                     jitter: float = 0.0, noise: float = 0.05, dpu_radius: float = 1.5):
  """(image float32 [z, y, x], labels int32 [z, y, x]) of one phantom case.

  num_zones: 4 (PZ, TZ, DPU, AFS) or 2 (PZ, TZ only; DPU and AFS are not drawn). jitter: relative random change
  of every centre and radius (0 = the reference geometry). noise: std of the added Gaussian noise. dpu_radius:
  radius of the DPU cylinder in voxels of the reference grid (1.5 = 0.75 mm)."""
  if num_zones not in (2, 4):
    raise ValueError(f"num_zones must be 2 or 4, got {num_zones!r}")
  if not dpu_radius > 0:
    raise ValueError(f"dpu_radius must be positive, got {dpu_radius!r}")
  if len(shape) != 3 or min(shape) < 4:
    raise ValueError(f"shape must be three sizes >= 4 (z, y, x), got {shape!r}")
  rng = np.random.default_rng(seed)
  f = np.asarray(shape, np.float64) / np.asarray(REFERENCE_SHAPE)
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)

  def jit(v):
    return np.asarray(v, np.float64) * f * (1.0 + jitter * rng.uniform(-1, 1, 3))

  def ellipsoid(centre, radii):
    return (((grid - centre) / radii) ** 2).sum(-1) <= 1.0

  c_tz = jit((8, 34, 32))
  tz = ellipsoid(c_tz, jit((5, 10, 12)))
  outer = ellipsoid(c_tz, jit((6, 16, 18)))
  pz = outer & (grid[..., 1] > c_tz[1]) & ~ndimage.binary_dilation(tz)
  afs = ellipsoid(jit((8, 20, 32)), jit((4, 6, 12))) & ~tz
  axis = jit((0, 34, 32))
  r_dpu = max(dpu_radius * min(f[1], f[2]), 1.0)
  z_lo, z_hi = int(round(4 * f[0])), int(round(11 * f[0]))
  dpu = ((grid[..., 1] - axis[1]) ** 2 + (grid[..., 2] - axis[2]) ** 2 <= r_dpu ** 2)
  dpu &= (grid[..., 0] >= z_lo) & (grid[..., 0] <= z_hi)

  bg = num_zones
  labels = np.full(shape, bg, np.int32)
  image = np.full(shape, INTENSITY["BG"], np.float32)
  order = (("PZ", pz, 0), ("AFS", afs, 3), ("TZ", tz, 1), ("DPU", dpu, 2))   # later entries win
  for name, mask, cls in order:
    if num_zones == 4 or name in ("PZ", "TZ"):
      image[mask] = INTENSITY[name]
      labels[mask] = cls
  image = image + rng.normal(0.0, noise, shape).astype(np.float32)
  return image.astype(np.float32), labels


def phantom_batch(n: int, seed: int = 0, **kw):
  """n phantoms stacked: (images [n, z, y, x, 1], labels [n, z, y, x]); case i uses seed + i."""
  cases = [prostate_phantom(seed + i, **kw) for i in range(n)]
  return np.stack([c[0] for c in cases])[..., None], np.stack([c[1] for c in cases])
