"""HealthiVert-GAN evaluation: RHLV (the spec's box and wedge values, and a float64 loop transcription of the
reference on irregular masks), PSNR / SSIM (scikit-image's algorithm with scipy filters), IoU / Dice / RVD and the
SVM grading protocol (scikit-learn)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import ndimage

from lostjax.metrics import healthivert as M

VOL = (64, 64, 20)
RHLV = jax.jit(M.rhlv)
SSIM, PSNR = jax.jit(M.ssim), jax.jit(M.psnr)


def _box():
  fake = np.zeros(VOL)
  fake[12:52, 10:55, 2:18] = 1
  return fake


def np_rhlv(fake, label, div=5, thr=0.7):
  """Loop transcription of the reference's RHLV quantification (float64)."""
  z = np.where(label)[2]
  c, n = int(np.mean(z)), (z.max() - z.min()) // div
  acc = {k: ([], []) for k in ("all", "pre", "mid", "post")}
  for s in range(max(c - n, 0), c + n):
    f, lab = fake[:, :, s], label[:, :, s]
    if not (f.any() and lab.any()):
      continue
    cols = np.where(f)[1]
    lo, hi = cols.min(), cols.max()
    a, b = int(lo + (hi - lo) / 3), int(lo + 2 * (hi - lo) / 3)
    cf = np.count_nonzero(f[:, int(np.mean(cols))])
    cl = np.count_nonzero(lab[:, int(np.mean(np.where(lab)[1]))])
    hf, hl = np.count_nonzero(f, axis=0).astype(float), np.count_nonzero(lab, axis=0).astype(float)
    parts = {"all": slice(None), "pre": slice(0, a), "mid": slice(a, b), "post": slice(b, None)}
    ratios = {}
    for k, sl in parts.items():
      rf, rl = hf[sl], hl[sl]
      ratios[k] = rl.max() / (rf.max() + 1e-6) if rf.size and rl.size and rl.max() > rf.max() else 1.
    cf = cf * ratios["all"]
    for k, sl in parts.items():
      rf, rl = hf[sl] * ratios[k], hl[sl]
      acc[k][0].extend(rf[rf > cf * thr])
      acc[k][1].extend(rl[rl > cl * thr])
  out, means = {}, {}
  for k, (f, lab) in acc.items():
    means[k] = (np.mean(f) if f else 0., np.mean(lab) if lab else 0.)
    out[k] = (means[k][0] - means[k][1]) / (means[k][0] + 1e-6)
  lh = [means[k][1] for k in ("pre", "mid", "post")]
  out["relative_height_label"] = min(lh) / (max(lh) + 1e-6)
  return out


def test_rhlv_box_and_wedge_values():
  fake = _box()
  crush = np.zeros(VOL)
  crush[22:52, 10:55, 2:18] = 1
  wedge = np.zeros(VOL)
  for y in range(10, 55):
    h = round(20 + 20 * (y - 10) / 44)
    wedge[52 - h:52, y, 2:18] = 1
  f = RHLV
  got = {k: float(v) for k, v in f(fake, crush).items()}
  for k in ("all", "pre", "mid", "post"):
    np.testing.assert_allclose(got[k], 0.25, rtol=1e-5)
  got = {k: float(v) for k, v in f(fake, wedge).items()}
  np.testing.assert_allclose([got[k] for k in ("all", "pre", "mid", "post")],
                             [0.22683, 0.40250, 0.26167, 0.08437], atol=1e-5)
  np.testing.assert_allclose(got["relative_height_label"], np_rhlv(fake, wedge)["relative_height_label"], rtol=1e-5)
  with pytest.raises(ValueError, match="fake must have shape"):
    M.rhlv(fake[:, :, :10], wedge)


def test_rhlv_matches_loop_transcription_on_irregular_masks():
  rng = np.random.default_rng(0)
  rr, cc = np.mgrid[:40, :36]
  for trial in range(3):
    fake = np.zeros((40, 36, 12))
    label = np.zeros((40, 36, 12))
    for z in range(1, 11):
      e = ((rr - 20) / rng.uniform(9, 13)) ** 2 + ((cc - 18) / rng.uniform(10, 14)) ** 2 < 1
      fake[:, :, z] = e
      squash = (rr - 20 - rng.uniform(0, 6)) / rng.uniform(5, 14)  # taller / shorter, shifted, tilted
      label[:, :, z] = (squash ** 2 + ((cc - 18 + 2 * trial) / rng.uniform(8, 14)) ** 2 < 1) & (rr > 8 + cc // 6)
    want = np_rhlv(fake, label, thr=0.64 + 0.03 * trial)
    got = RHLV(fake, label, height_threshold=0.64 + 0.03 * trial)
    for k, v in want.items():
      np.testing.assert_allclose(float(got[k]), v, rtol=1e-4, atol=1e-6, err_msg=f"{trial} {k}")


def test_rhlv_threshold_default_is_pinned():
  import inspect
  assert inspect.signature(M.rhlv).parameters["height_threshold"].default == 0.7
  assert inspect.signature(M.rhlv).parameters["length_divisor"].default == 5


def np_ssim(x, y, dr, win=7):
  """scikit-image's default SSIM: uniform filter, sample covariance, border windows cropped."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  filt = lambda v: ndimage.uniform_filter(v, size=win)
  ux, uy = filt(x), filt(y)
  cov = win * win / (win * win - 1)
  vx, vy, vxy = cov * (filt(x * x) - ux * ux), cov * (filt(y * y) - uy * uy), cov * (filt(x * y) - ux * uy)
  c1, c2 = (0.01 * dr) ** 2, (0.03 * dr) ** 2
  s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
  p = (win - 1) // 2
  return s[p:-p, p:-p].mean()


def test_psnr_ssim_and_overlap_metrics():
  rng = np.random.default_rng(1)
  a = rng.uniform(0, 255, (20, 24))
  b = a + rng.normal(0, 20, a.shape)
  dr = a.max() - a.min()
  np.testing.assert_allclose(float(PSNR(a, b)), 10 * np.log10(dr ** 2 / np.mean((a - b) ** 2)), rtol=1e-5)
  np.testing.assert_allclose(float(SSIM(a, b)), np_ssim(a, b, dr), rtol=1e-4)
  np.testing.assert_allclose(float(SSIM(a, a)), 1., rtol=1e-6)
  flat = 100 + rng.normal(0, 3, (16, 16))  # local variances comparable to C2: the covariance convention matters
  noisy = flat + rng.normal(0, 3, flat.shape)
  np.testing.assert_allclose(float(SSIM(flat, noisy, data_range=255.)), np_ssim(flat, noisy, 255.), rtol=1e-4)
  with pytest.raises(ValueError, match="win_size"):
    M.ssim(a[:5], b[:5])
  x = np.zeros((4, 4, 2))
  y = np.zeros((4, 4, 2))
  x[:2] = 1  # 16 voxels
  y[1:3] = 1  # 16 voxels, 8 shared
  assert float(M.iou(x, y)) == pytest.approx(8 / 24)
  assert float(M.dice(x, y)) == pytest.approx(0.5)
  three_rows = np.broadcast_to((np.arange(4) < 3)[:, None, None], x.shape)  # 24 voxels vs 16
  assert float(M.rvd(x, three_rows)) == pytest.approx(8 / 16)
  z = np.zeros((3, 3, 3))
  assert float(M.iou(z, z)) == 0. and float(M.dice(z, z)) == 0. and float(M.rvd(z, x[:3, :3, :3])) == 0.


def test_generation_metrics_protocol():
  rng = np.random.default_rng(2)
  ct = rng.uniform(0, 255, (48, 40, 10))
  mask = np.zeros(ct.shape)
  mask[10:35, 5:30, 1:9] = 1  # 625 px per slice, z-range 1..8 -> central 4/5: 6 slices from z = 2
  fake = ct + rng.normal(0, 10, ct.shape)
  fmask = mask.copy()
  fmask[10:12] = 0
  out = M.generation_metrics(ct, fake, mask, fmask)
  zs = range(2, 8)
  np.testing.assert_allclose(out["global_psnr"], np.mean([float(PSNR(ct[:, :, z], fake[:, :, z])) for z in zs]),
                             rtol=1e-5)
  np.testing.assert_allclose(out["patch_ssim"], np.mean([np_ssim(ct[10:35, :, z], fake[10:35, :, z],
                                                                 np.ptp(ct[10:35, :, z])) for z in zs]), rtol=1e-4)
  assert out["rvd"] == pytest.approx(2 / 25) and out["dice"] == pytest.approx(2 * 23 / 48)


def test_svm_grading_recovers_threshold_grades():
  pytest.importorskip("sklearn")
  rng = np.random.default_rng(3)
  n = 160
  mid = rng.uniform(0, 0.6, n)
  grade = np.digitize(mid, [0.2, 0.25, 0.4])  # Genant-like cut-offs on the middle height loss
  feats = np.stack([mid + rng.normal(0, 0.02, n), mid, mid + rng.normal(0, 0.02, n)], 1)
  is_val = np.arange(n) % 4 == 0
  out = M.svm_grading(feats, grade, is_val)
  assert len(out["folds"]["f1"]) == 5
  assert out["accuracy"] > 0.9 and out["f1"] > 0.9
  np.testing.assert_allclose(out["f1_var"], np.var(out["folds"]["f1"]))
  with pytest.raises(ValueError, match="is_val"):
    M.svm_grading(feats, grade, np.zeros(n, bool))
