"""Per-zone segmentation metrics with voxel spacing: Dice, MASD, HD95, RAVD, and the relative improvement.

Paper: A. Das, S. Ghosh, S. Stober, "PI-RADS v2 Compliant Automated Segmentation of Prostate Zones Using
co-training Motivated Multi-task Dual-Path CNN", arXiv:2309.12970. The paper reports, per PI-RADS v2 zone (PZ, TZ,
DPU, AFS), the Dice coefficient, the mean absolute symmetric distance (MASD), the 95th-percentile Hausdorff
distance (HD95) and the relative absolute volume difference (RAVD), and states its gain over the baseline as the
relative MASD improvement (7.56 %, 11.00 %, 58.43 %, 19.67 % for PZ, TZ, DPU, AFS). The definitions follow the
evaluation code published by the same group for the same annotated data (the paper's code is not public).

For one case and one zone, with binary masks P (prediction) and G (ground truth) and voxel spacing s (mm per axis):

  Dice  = 2 |P ∩ G| / (|P| + |G|)                              (1 when both are empty)
  ∂P, ∂G = contour voxels: foreground voxels with a background neighbour (`contour_connectivity` 1 = the 6 face
          neighbours, 2 = 18, 3 = all 26; voxels outside the volume count as background)
  d_GP  = { min_{q ∈ ∂P} ‖(p − q) ⊙ s‖ : p ∈ ∂G }               (each GT contour voxel to the predicted contour)
  d_PG  = { min_{q ∈ ∂G} ‖(p − q) ⊙ s‖ : p ∈ ∂P }               (and back)
  MASD  = mean(d_GP ∪ d_PG)                                      (pooled: weighted by contour size, not the mean
                                                                  of the two directed means)
  HD95  = max(P95(d_GP), P95(d_PG))                              (numpy's linear-interpolation percentile)
  RAVD  = |V_P / V_G − 1| · 100                                  (percent)
  improvement_% = (m_base − m_new) / m_base · 100                (per zone; lower-is-better metrics)

The distances come from Euclidean distance transforms of the complement of each contour
(`scipy.ndimage.distance_transform_edt(..., sampling=spacing)`), read at the other contour's voxels: exact
Euclidean distances between voxel centres, as the brute-force pairwise minimum.

Choices (documented keyword arguments, pinned by tests):
* `contour_connectivity=1`: the reading of SimpleITK's `BinaryContour(fullyConnected=True)` used by the lab code
  (a voxel is on the contour when one of its face neighbours is background) is ASSUMED, not verified.
* `empty="nan"`: when P or G is empty the surface distances are undefined. The lab code returns 0 for MASD and
  HD95 when the prediction is empty, which rewards missing a zone; here they are NaN (and counted by
  `aggregate_cases` as `n_empty`); `empty="zero"` reproduces the lab behaviour. RAVD is NaN when G is empty.

Everything here runs host-side on concrete arrays in float64 (numpy/scipy); nothing is traced. Bad input raises
one ValueError naming the bad value.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from lostjax.metrics import overlap

EMPTY_MODES = ("nan", "zero")


def _mask(x, name: str) -> np.ndarray:
  arr = np.asarray(x)
  if arr.ndim < 1 or arr.size == 0:
    raise ValueError(f"{name} must be a non-empty mask array, got shape {arr.shape}")
  if arr.dtype != np.bool_:
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
      raise ValueError(f"{name} must be a boolean or numeric mask, got dtype {arr.dtype}")
    vals = np.unique(arr)
    if not np.all(np.isin(vals, (0, 1))):
      raise ValueError(f"{name} must be binary (0/1 or bool), got values {vals[:5].tolist()}")
    arr = arr.astype(bool)
  return arr


def _pair(pred, gt):
  p, g = _mask(pred, "pred"), _mask(gt, "gt")
  if p.shape != g.shape:
    raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
  return p, g


def _spacing(spacing, ndim: int) -> np.ndarray:
  if spacing is None:
    return np.ones(ndim)
  s = np.asarray(spacing, np.float64).reshape(-1)
  if s.size == 1:
    s = np.full(ndim, float(s[0]))
  if s.size != ndim or not np.all(np.isfinite(s)) or np.any(s <= 0):
    raise ValueError(f"spacing must be {ndim} positive finite values (one per axis), got {spacing!r}")
  return s


def _check_connectivity(c, ndim: int):
  if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or not 1 <= c <= ndim:
    raise ValueError(f"contour_connectivity must be an int in [1, {ndim}], got {c!r}")


def _check_empty(empty):
  if empty not in EMPTY_MODES:
    raise ValueError(f"empty must be one of {EMPTY_MODES}, got {empty!r}")


def dice(pred, gt) -> float:
  """Dice overlap 2|P∩G| / (|P| + |G|) of two binary masks; 1.0 when both are empty (`overlap.dice`, float64)."""
  p, g = _pair(pred, gt)
  return float(overlap.dice(p, g, empty=1.0, xp=np))


def ravd(pred, gt) -> float:
  """Relative absolute volume difference |V_P / V_G − 1| · 100 (percent); NaN when G is empty."""
  p, g = _pair(pred, gt)
  vg = g.sum()
  return float("nan") if vg == 0 else float(abs(p.sum() / vg - 1.0) * 100.0)


def contour(mask, *, contour_connectivity: int = 1) -> np.ndarray:
  """Contour voxels: foreground voxels with at least one background neighbour (outside the volume = background).

  `contour_connectivity` is the neighbourhood of `scipy.ndimage.generate_binary_structure(ndim, c)`: 1 = faces
  (6 neighbours in 3-D), ndim = all 26."""
  m = _mask(mask, "mask")
  _check_connectivity(contour_connectivity, m.ndim)
  structure = ndimage.generate_binary_structure(m.ndim, contour_connectivity)
  return m & ~ndimage.binary_erosion(m, structure=structure, border_value=0)


def surface_distances(pred, gt, spacing=None, *, contour_connectivity: int = 1):
  """(d_GP, d_PG): distances in mm from each GT contour voxel to the predicted contour, and back.

  Returns two float64 arrays (in the order of the voxels of `np.nonzero`); both are empty when P or G is empty."""
  p, g = _pair(pred, gt)
  s = _spacing(spacing, p.ndim)
  _check_connectivity(contour_connectivity, p.ndim)
  if not p.any() or not g.any():
    return np.zeros(0), np.zeros(0)
  cp = contour(p, contour_connectivity=contour_connectivity)
  cg = contour(g, contour_connectivity=contour_connectivity)
  to_p = ndimage.distance_transform_edt(~cp, sampling=s)
  to_g = ndimage.distance_transform_edt(~cg, sampling=s)
  return to_p[cg].astype(np.float64), to_g[cp].astype(np.float64)


def _empty_value(empty):
  return 0.0 if empty == "zero" else float("nan")


def masd(pred, gt, spacing=None, *, contour_connectivity: int = 1, empty: str = "nan") -> float:
  """Mean absolute symmetric distance: the mean of the pooled distances d_GP ∪ d_PG (mm)."""
  _check_empty(empty)
  d_gp, d_pg = surface_distances(pred, gt, spacing, contour_connectivity=contour_connectivity)
  if d_gp.size == 0:
    return _empty_value(empty)
  return float(np.concatenate([d_gp, d_pg]).mean())


def hd95(pred, gt, spacing=None, *, contour_connectivity: int = 1, empty: str = "nan") -> float:
  """95th-percentile Hausdorff distance max(P95(d_GP), P95(d_PG)) (mm, linear-interpolation percentile)."""
  _check_empty(empty)
  d_gp, d_pg = surface_distances(pred, gt, spacing, contour_connectivity=contour_connectivity)
  if d_gp.size == 0:
    return _empty_value(empty)
  return float(max(np.percentile(d_gp, 95), np.percentile(d_pg, 95)))


def case_metrics(pred, gt, spacing=None, *, contour_connectivity: int = 1, empty: str = "nan") -> dict:
  """{'dice', 'masd', 'hd95', 'ravd', 'empty'} of one binary mask pair (the distance transforms computed once)."""
  _check_empty(empty)
  p, g = _pair(pred, gt)
  d_gp, d_pg = surface_distances(p, g, spacing, contour_connectivity=contour_connectivity)
  is_empty = d_gp.size == 0
  if is_empty:
    m, h = _empty_value(empty), _empty_value(empty)
  else:
    m = float(np.concatenate([d_gp, d_pg]).mean())
    h = float(max(np.percentile(d_gp, 95), np.percentile(d_pg, 95)))
  return {"dice": dice(p, g), "masd": m, "hd95": h, "ravd": ravd(p, g), "empty": bool(is_empty)}


def zone_metrics(pred_labels, gt_labels, zones: Mapping[str, int], spacing=None, *,
                 contour_connectivity: int = 1, empty: str = "nan") -> dict:
  """Per-zone metrics of one case from two integer label volumes: {zone: case_metrics(pred == id, gt == id)}.

  `zones` maps zone names to label ids, e.g. {'PZ': 0, 'TZ': 1, 'DPU': 2, 'AFS': 3} (background is left out)."""
  p, g = np.asarray(pred_labels), np.asarray(gt_labels)
  if p.shape != g.shape:
    raise ValueError(f"pred_labels and gt_labels must have the same shape, got {p.shape} and {g.shape}")
  for name, arr in (("pred_labels", p), ("gt_labels", g)):
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"{name} must be an integer label volume, got dtype {arr.dtype}")
  if not zones:
    raise ValueError("zones must name at least one zone, got an empty mapping")
  return {z: case_metrics(p == int(i), g == int(i), spacing, contour_connectivity=contour_connectivity,
                          empty=empty) for z, i in zones.items()}


def aggregate_cases(cases: Sequence[Mapping[str, Mapping[str, float]]],
                    metrics: Sequence[str] = ("dice", "masd", "hd95", "ravd")) -> dict:
  """Mean, median and std (NaN-ignoring, population std) over cases of `zone_metrics` outputs.

  Returns {zone: {metric: {'mean', 'median', 'std', 'n'}, 'n_empty': count of cases with an empty P or G}}."""
  if not cases:
    raise ValueError("cases must hold at least one case, got none")
  out = {}
  for zone in cases[0]:
    entry = {"n_empty": int(sum(bool(c[zone].get("empty", False)) for c in cases))}
    for m in metrics:
      v = np.asarray([c[zone][m] for c in cases], np.float64)
      ok = v[~np.isnan(v)]
      entry[m] = ({"mean": float(ok.mean()), "median": float(np.median(ok)), "std": float(ok.std()), "n": ok.size}
                  if ok.size else {"mean": float("nan"), "median": float("nan"), "std": float("nan"), "n": 0})
    out[zone] = entry
  return out


def improvement(base, new) -> np.ndarray:
  """Relative improvement (base − new) / base · 100 of a lower-is-better metric (MASD, HD95, RAVD), elementwise.

  The paper's headline numbers are this formula on per-zone MASD; a negative value is a degradation."""
  b, n = np.asarray(base, np.float64), np.asarray(new, np.float64)
  if b.shape != n.shape:
    raise ValueError(f"base and new must have the same shape, got {b.shape} and {n.shape}")
  if np.any(b == 0) or not np.all(np.isfinite(b)):
    raise ValueError(f"base must be finite and non-zero (relative change undefined), got {b.tolist()}")
  return (b - n) / b * 100.0
