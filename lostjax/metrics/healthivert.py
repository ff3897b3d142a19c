"""HealthiVert-GAN evaluation: RHLV height-loss quantification, SVM fracture grading, generation metrics.

Paper: "HealthiVert-GAN: A Novel Framework of Pseudo-Healthy Vertebral Image Synthesis for Interpretable
Compression Fracture Grading", arXiv:2503.05990. Definitions follow the released evaluation code.

* `rhlv` (relative height loss value). Volumes are [rows (vertical), cols (anterior -> posterior), z]. Slices
  [c - n, c + n) with c = int(mean z of the label voxels), n = (z_max - z_min) // length_divisor; in every slice
  where both masks are non-empty, the synthesised (fake) mask's column extent [y_min, y_max], r = y_max - y_min,
  splits the columns at a = int(y_min + r/3), b = int(y_min + 2r/3) into anterior [0, a), middle [a, b) and
  posterior [b, W) regions (for both masks); a column's height is its pixel count. Per region, if the label's
  tallest column exceeds the fake's, the fake heights are scaled by max_label / (max_fake + 1e-6) (the "all"
  ratio also scales the fake centre height). Heights above `height_threshold` x the centre-column height (the
  column int(mean col) of that mask) are kept; averaged over columns and slices to H_fake, H_label:
      RHLV = (H_fake - H_label) / (H_fake + 1e-6)            for all / pre / mid / post,
  and relative_height_label = min(pre, mid, post label heights) / (max(...) + 1e-6).
* `svm_grading`: features (e.g. [pre, mid, post] RHLV) standardised with a scaler fitted on train+test, linear
  SVC with balanced class weights, StratifiedKFold(5, no shuffle) over train+test, each fold's model scored on the
  validation set; mean and variance over folds of macro F1 / precision / recall and accuracy (scikit-learn).
* Generation quality (normal validation vertebrae): `iou`, `dice` (2|A n B| / (|A| + |B|)), `rvd`
  (|V_o - V_f| / V_o) of 3-D masks, each 0 when undefined; `psnr` and `ssim` (scikit-image's defaults: 7x7 uniform
  window, sample covariance, K1 = 0.01, K2 = 0.03, mean over windows inside the image) with data_range = max - min
  of the original slice; `generation_metrics` averages them over the central 4/5 of the vertebra's slices with
  more than 400 vertebra pixels, for the whole slice ("global") and the vertebra's rows [x1, x2] ("patch").

Documented choices (keyword arguments): `height_threshold` = 0.7 (the value the reference's evaluation run uses;
its function default is 0.64); a slice window reaching below z = 0 is clipped at 0 (Python slicing in the
reference would wrap around).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lostjax.metrics import overlap


def _float(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32)) if jnp.issubdtype(x.dtype, jnp.floating) \
      else x.astype(jnp.result_type(float))


def _mask(name, x, shape=None):
  x = jnp.asarray(x)
  if x.ndim != 3:
    raise ValueError(f"{name} must be a 3-D mask [rows, cols, z], got shape {x.shape}")
  if shape is not None and x.shape != shape:
    raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
  return x != 0


def rhlv(fake, label, *, length_divisor: int = 5, height_threshold: float = 0.7) -> dict[str, jax.Array]:
  """Relative height loss of a vertebra: fake (synthesised healthy) vs label (real) binary masks [R, C, Z].

  Returns {'all', 'pre', 'mid', 'post', 'relative_height_label'} (scalars). Jit-compatible (static shapes,
  masked sums); an empty label gives zeros.
  """
  if length_divisor < 1:
    raise ValueError(f"length_divisor must be >= 1, got {length_divisor}")
  lab = _mask("label", label)
  fk = _mask("fake", fake, lab.shape)
  dt = jnp.result_type(float)
  r_, c_, z_ = lab.shape
  zs = jnp.arange(z_)
  cols = jnp.arange(c_)
  lab_z = jnp.sum(lab, axis=(0, 1))  # voxels per slice
  n_lab = jnp.sum(lab_z)
  present = lab_z > 0
  z_min = jnp.min(jnp.where(present, zs, z_))
  z_max = jnp.max(jnp.where(present, zs, -1))
  centre = jnp.floor(jnp.sum(lab_z * zs) / jnp.maximum(n_lab, 1)).astype(jnp.int32)
  n = (z_max - z_min) // length_divisor
  in_window = (zs >= jnp.maximum(centre - n, 0)) & (zs < centre + n)
  use = in_window & present & (jnp.sum(fk, axis=(0, 1)) > 0)  # [Z]

  hf = jnp.sum(fk, axis=0).astype(dt).T  # [Z, C] column heights
  hl = jnp.sum(lab, axis=0).astype(dt).T
  colsum_f = jnp.maximum(jnp.sum(hf, 1), 1)
  colsum_l = jnp.maximum(jnp.sum(hl, 1), 1)
  fcols = hf > 0
  y_min = jnp.min(jnp.where(fcols, cols, c_), 1)
  y_max = jnp.max(jnp.where(fcols, cols, -1), 1)
  rng = (y_max - y_min).astype(dt)
  a = jnp.floor(y_min + rng / 3).astype(jnp.int32)[:, None]
  b = jnp.floor(y_min + 2 * rng / 3).astype(jnp.int32)[:, None]
  cf_col = jnp.floor(jnp.sum(hf * cols, 1) / colsum_f).astype(jnp.int32)
  cl_col = jnp.floor(jnp.sum(hl * cols, 1) / colsum_l).astype(jnp.int32)
  centre_f = jnp.take_along_axis(hf, cf_col[:, None], 1)[:, 0]
  centre_l = jnp.take_along_axis(hl, cl_col[:, None], 1)[:, 0]
  regions = {"all": jnp.ones_like(hf, bool), "pre": cols[None] < a, "mid": (cols[None] >= a) & (cols[None] < b),
             "post": cols[None] >= b}

  def ratio(region):
    mf = jnp.max(jnp.where(region, hf, -jnp.inf), 1)
    ml = jnp.max(jnp.where(region, hl, -jnp.inf), 1)
    nonempty = jnp.any(region, 1)
    return jnp.where(nonempty & (ml > mf), ml / (mf + 1e-6), 1.)

  centre_f = centre_f * ratio(regions["all"])
  means = {}
  for name, region in regions.items():
    f_h = hf * ratio(region)[:, None]
    keep_f = region & (f_h > centre_f[:, None] * height_threshold) & use[:, None]
    keep_l = region & (hl > centre_l[:, None] * height_threshold) & use[:, None]
    nf, nl = jnp.sum(keep_f), jnp.sum(keep_l)
    means[name] = (jnp.where(nf > 0, jnp.sum(jnp.where(keep_f, f_h, 0)) / jnp.maximum(nf, 1), 0.),
                   jnp.where(nl > 0, jnp.sum(jnp.where(keep_l, hl, 0)) / jnp.maximum(nl, 1), 0.))
  out = {k: (f - l) / (f + 1e-6) for k, (f, l) in means.items()}
  lab_h = jnp.stack([means[k][1] for k in ("pre", "mid", "post")])
  out["relative_height_label"] = jnp.min(lab_h) / (jnp.max(lab_h) + 1e-6)
  return out


def iou(a, b):
  """|A n B| / |A u B| of two binary masks (0 when both are empty)."""
  a, b = jnp.asarray(a) != 0, jnp.asarray(b) != 0
  union = jnp.sum(a | b)
  return jnp.where(union > 0, jnp.sum(a & b) / jnp.maximum(union, 1), 0.)


def dice(a, b):
  """2 |A n B| / (|A| + |B|) of two binary masks (0 when both are empty; `lostjax.metrics.overlap.dice`)."""
  return overlap.dice(a, b, empty=0.)


def rvd(original, fake):
  """Relative volume difference |V_o - V_f| / V_o of two binary masks (0 when the original is empty)."""
  vo = jnp.sum(jnp.asarray(original) != 0)
  vf = jnp.sum(jnp.asarray(fake) != 0)
  return jnp.where(vo > 0, jnp.abs(vo - vf) / jnp.maximum(vo, 1), 0.)


def psnr(original, generated, *, data_range: Optional[float] = None):
  """10 log10(data_range^2 / MSE); data_range defaults to max - min of `original` (inf when MSE = 0)."""
  x, y = _float(original), _float(generated)
  if x.shape != y.shape:
    raise ValueError(f"generated must have the shape of original {x.shape}, got {y.shape}")
  dr = jnp.max(x) - jnp.min(x) if data_range is None else data_range
  return 10. * jnp.log10(dr ** 2 / jnp.mean((x - y) ** 2))


def ssim(original, generated, *, data_range: Optional[float] = None, win_size: int = 7, k1: float = 0.01,
         k2: float = 0.03):
  """Mean structural similarity of two 2-D images as scikit-image computes it by default.

  Local means, variances (sample covariance, x N/(N-1)) and covariance over win_size x win_size uniform windows;
  SSIM map ((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x + s_y + C2)), C_i = (k_i data_range)^2,
  averaged over the windows lying inside the image. data_range defaults to max - min of `original`.
  """
  x, y = _float(original), _float(generated)
  if x.ndim != 2 or x.shape != y.shape:
    raise ValueError(f"original and generated must be equal 2-D images, got {x.shape} and {y.shape}")
  if min(x.shape) < win_size or win_size % 2 == 0:
    raise ValueError(f"win_size must be odd and at most the image side {min(x.shape)}, got {win_size}")
  dr = jnp.max(x) - jnp.min(x) if data_range is None else data_range
  npx = win_size * win_size
  box = lambda v: jax.lax.reduce_window(v, 0., jax.lax.add, (win_size, win_size), (1, 1), "VALID") / npx
  ux, uy = box(x), box(y)
  cov = npx / (npx - 1)
  vx = cov * (box(x * x) - ux * ux)
  vy = cov * (box(y * y) - uy * uy)
  vxy = cov * (box(x * y) - ux * uy)
  c1, c2 = (k1 * dr) ** 2, (k2 * dr) ** 2
  s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
  return jnp.mean(s)


_psnr_jit, _ssim_jit = jax.jit(psnr), jax.jit(ssim)


def generation_metrics(original_ct, fake_ct, original_mask, fake_mask, *, min_pixels: int = 400,
                       central_fraction: float = 0.8) -> dict[str, float]:
  """The reference's per-vertebra generation evaluation (volumes [rows, cols, z]; masks binary).

  Returns iou, dice, rvd of the 3-D masks and the mean global / patch PSNR and SSIM over the slices of the
  central `central_fraction` of the original mask's z-range that hold more than `min_pixels` vertebra pixels
  (patch: the vertebra's rows [x1, x2] of that slice); NaN values are skipped, an empty list gives 0.
  """
  ct_o, ct_f = np.asarray(original_ct, np.float64), np.asarray(fake_ct, np.float64)
  mo, mf = np.asarray(original_mask) != 0, np.asarray(fake_mask) != 0
  if not (ct_o.ndim == 3 and ct_o.shape == ct_f.shape == mo.shape == mf.shape):
    raise ValueError(f"the four volumes must share one 3-D shape, got {ct_o.shape}, {ct_f.shape}, "
                     f"{mo.shape}, {mf.shape}")
  out: dict[str, Any] = {"iou": float(iou(mo, mf)), "dice": float(dice(mo, mf)), "rvd": float(rvd(mo, mf))}
  lists = {k: [] for k in ("global_psnr", "global_ssim", "patch_psnr", "patch_ssim")}
  zs = np.where(mo.any(axis=(0, 1)))[0]
  if zs.size:
    z0, z1 = zs.min(), zs.max()
    length = z1 - z0 + 1
    new_len = int(length * central_fraction)
    start = z0 + (length - new_len) // 2
    for z in range(start, start + new_len):
      if mo[:, :, z].sum() <= min_pixels:
        continue
      rows = np.where(mo[:, :, z].any(axis=1))[0]
      for kind, sl in (("global", slice(None)), ("patch", slice(rows.min(), rows.max() + 1))):
        a, b = ct_o[sl, :, z], ct_f[sl, :, z]
        dr = a.max() - a.min()
        with np.errstate(divide="ignore", invalid="ignore"):
          p = float(_psnr_jit(a, b, data_range=dr))
          s = float(_ssim_jit(a, b, data_range=dr)) if min(a.shape) >= 7 else float("nan")
        for key, v in ((f"{kind}_psnr", p), (f"{kind}_ssim", s)):
          if not np.isnan(v):
            lists[key].append(v)
  out.update({k: float(np.mean(v)) if v else 0. for k, v in lists.items()})
  return out


def svm_grading(features, labels, is_val, *, n_splits: int = 5, class_weight: Optional[str] = "balanced",
                kernel: str = "linear") -> dict[str, Any]:
  """The reference's fracture-grading protocol on RHLV features (requires scikit-learn, the `vision` extra).

  features: [N, F] (e.g. pre/mid/post RHLV; concatenate sagittal and coronal ones for 2.5-D); labels: [N] grades;
  is_val: [N] bool, the held-out validation vertebrae. The scaler is fitted on the others (train + test), which
  are split by StratifiedKFold(n_splits, no shuffle); each fold's SVC (fitted on its training part) predicts the
  validation set. Returns per-fold lists and their mean / variance: f1, precision, recall (macro), accuracy, and
  the confusion matrices.
  """
  try:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("svm_grading needs scikit-learn: pip install 'lostjax[vision]'") from e
  x = np.asarray(features, np.float64)
  y = np.asarray(labels)
  v = np.asarray(is_val, bool)
  if x.ndim != 2 or y.shape != (x.shape[0],) or v.shape != (x.shape[0],):
    raise ValueError(f"features must be [N, F] with labels and is_val of shape [N], got {x.shape}, {y.shape}, "
                     f"{v.shape}")
  if not v.any() or v.all():
    raise ValueError(f"is_val must mark some but not all vertebrae as validation, got {int(v.sum())} of {v.size}")
  scaler = StandardScaler().fit(x[~v])
  xt, yt, xv, yv = scaler.transform(x[~v]), y[~v], scaler.transform(x[v]), y[v]
  folds = {k: [] for k in ("f1", "precision", "recall", "accuracy", "confusion")}
  for tr, _ in StratifiedKFold(n_splits=n_splits).split(xt, yt):
    pred = SVC(kernel=kernel, class_weight=class_weight).fit(xt[tr], yt[tr]).predict(xv)
    folds["f1"].append(f1_score(yv, pred, average="macro", zero_division=0))
    folds["precision"].append(precision_score(yv, pred, average="macro", zero_division=0))
    folds["recall"].append(recall_score(yv, pred, average="macro", zero_division=0))
    folds["accuracy"].append(accuracy_score(yv, pred))
    folds["confusion"].append(confusion_matrix(yv, pred, labels=np.unique(y)))
  out: dict[str, Any] = {"folds": folds}
  for k in ("f1", "precision", "recall", "accuracy"):
    out[k] = float(np.mean(folds[k]))
    out[f"{k}_var"] = float(np.var(folds[k]))
  return out
