"""HealthiVert-GAN losses vs float64 numpy transcriptions and the spec's closed-form values."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses as L
from losses import healthivert as LH

RNG = np.random.default_rng(0)


def np_bce(z, t):
  z = np.asarray(z, np.float64)
  return np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))


def np_dice(p, g, smooth=1e-5):
  p, g = np.asarray(p, np.float64).reshape(len(p), -1), np.asarray(g, np.float64).reshape(len(g), -1)
  return np.mean([(2 * np.sum(a * b) + smooth) / (a.sum() + b.sum() + smooth) for a, b in zip(p, g)])


def np_sobel(x):
  """[B, H, W] float64, replicate padding, explicit 3x3 cross-correlation."""
  gx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
  gy = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float64)
  out = np.zeros(x.shape)
  for b in range(x.shape[0]):
    xp = np.pad(x[b], 1, mode="edge")
    for i in range(x.shape[1]):
      for j in range(x.shape[2]):
        win = xp[i:i + 3, j:j + 3]
        out[b, i, j] = min(np.sqrt(np.sum(win * gx) ** 2 + np.sum(win * gy) ** 2), 1.)
  return out


def test_height_loss_closed_form():
  # p1 = 0.75 -> 30 px vs H = 32: 40 * 2 / 32 = 2.5; p2 = 0.8 -> 32 px: 0
  got = LH.height_loss(jnp.array([0.75]), jnp.array([0.8]), jnp.array([32.]))
  np.testing.assert_allclose(float(got), 2.5, rtol=1e-6)
  p1, p2, h = RNG.uniform(size=4), RNG.uniform(size=4), RNG.integers(20, 40, 4).astype(float)
  want = np.mean(40 * np.abs(40 * p1 - h) / h + 40 * np.abs(40 * p2 - h) / h)
  np.testing.assert_allclose(float(jax.jit(LH.height_loss)(p1, p2, h)), want, rtol=1e-5)


def test_sobel_step_and_random_against_loops():
  x = np.zeros((1, 6, 8, 1), np.float32)
  x[..., 5:, 0] = 1.  # vertical step at column k = 5
  e = np.asarray(LH.sobel_edges(jnp.asarray(x)))[0, :, :, 0]
  want = np.zeros((6, 8))
  want[:, 4:6] = 1.  # |gx| = 4 at columns k - 1 and k, clipped to 1
  np.testing.assert_array_equal(e, want)
  r = RNG.uniform(0, 0.3, (2, 5, 7))
  np.testing.assert_allclose(np.asarray(LH.sobel_edges(jnp.asarray(r[..., None], jnp.float32)))[..., 0],
                             np_sobel(r), rtol=1e-5, atol=1e-6)
  for bad in ((2, 5, 7), (2, 5, 7, 3)):   # no channel axis; three channels
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
      LH.sobel_edges(jnp.zeros(bad))


def test_masked_l1_official_and_per_pixel():
  b, s, band = 3, 8, 2
  fake, coarse, real = (RNG.uniform(-1, 1, (b, s, s, 1)) for _ in range(3))
  mask = np.zeros((b, s, s, 1))
  mask[:, 3:3 + band] = 1
  sf, sc = np.abs(fake - real).sum(), np.abs(coarse - real).sum()
  # reference: (mean_f + mean_c) / 2 * 200 * (W^2 / nnz) * 2, nnz over the whole batch
  official = (np.abs(fake - real).mean() + np.abs(coarse - real).mean()) * 0.5 * 200 * (s * s / mask.sum()) * 2
  np.testing.assert_allclose(official, 200 / b * (sf + sc) / (b * band * s))  # the 1/B identity of the spec
  f = jax.jit(LH.masked_l1_loss, static_argnames=("norm",))
  args = [jnp.asarray(a, jnp.float32) for a in (fake, coarse, real, mask)]
  np.testing.assert_allclose(float(f(*args)), official, rtol=1e-5)
  np.testing.assert_allclose(float(f(*args, norm="per_pixel")), official * b, rtol=1e-5)
  with pytest.raises(ValueError, match="norm"):
    LH.masked_l1_loss(*args, norm="mean")


def test_dice_bce_and_adversarial_terms():
  p = RNG.uniform(size=(3, 4, 5, 1))
  g = (RNG.uniform(size=(3, 4, 5, 1)) > 0.5).astype(float)
  np.testing.assert_allclose(float(LH.dice_coefficient(jnp.asarray(p, jnp.float32), g)), np_dice(p, g), rtol=1e-6)
  np.testing.assert_allclose(float(LH.dice_loss(jnp.asarray(p, jnp.float32), g, weight=15.)),
                             15 * (1 - np_dice(p, g)), rtol=1e-5)
  zr, zf = RNG.normal(size=(2, 3, 3, 1)) * 3, RNG.normal(size=(2, 3, 3, 1)) * 3
  np.testing.assert_allclose(float(LH.discriminator_loss(jnp.asarray(zr, jnp.float32), jnp.asarray(zf, jnp.float32))),
                             0.5 * (np_bce(zr, 1) + np_bce(zf, 0)), rtol=1e-5)
  zs = [RNG.normal(size=(2, 3, 3, 1)) for _ in range(3)]
  np.testing.assert_allclose(float(LH.generator_adversarial_loss([jnp.asarray(z, jnp.float32) for z in zs])),
                             sum(np_bce(z, 1) for z in zs) / 6, rtol=1e-5)
  empty = jnp.zeros((2, 3, 3, 1))  # both empty: (0 + 1e-5) / (0 + 1e-5) = 1, the reference's value
  assert float(LH.dice_coefficient(empty, empty)) == 1.
  with pytest.raises(ValueError, match="at least one"):
    LH.generator_adversarial_loss([])


def test_generator_loss_total_and_official_weights():
  b, s = 2, 8
  u = lambda *sh: RNG.uniform(size=sh)
  out = {"fake": u(b, s, s, 1) * 2 - 1, "fake_coarse": u(b, s, s, 1) * 2 - 1, "fine_seg": u(b, s, s, 1),
         "coarse_seg": u(b, s, s, 1), "p1": u(b), "p2": u(b)}
  out["fake_mask"] = out["fine_seg"]
  mask = np.zeros((b, s, s, 1))
  mask[:, 2:5] = 1
  batch = {"real": u(b, s, s, 1) * 2 - 1, "mask": mask, "real_mask": (u(b, s, s, 1) > 0.5) * 1.,
           "normal_vert": (u(b, s, s, 1) > 0.5) * 1., "height": np.array([20., 30.])}
  logits = [RNG.normal(size=(b, 2, 2, 1)) for _ in range(3)]
  cast = lambda d: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
  total, terms = jax.jit(LH.healthivert_generator_loss)(cast(out), cast(batch), [jnp.asarray(z, jnp.float32)
                                                                                  for z in logits])
  sf = np.abs(out["fake"] - batch["real"]).sum() + np.abs(out["fake_coarse"] - batch["real"]).sum()
  want = {"gan": sum(np_bce(z, 1) for z in logits) / 6,
          "l1": 200 / b * sf / mask.sum(),
          "dice_fine": 15 * (1 - np_dice(out["fine_seg"], batch["real_mask"])),
          "edge": 800 * np.mean((np_sobel(out["fake_mask"][..., 0]) - np_sobel(batch["real_mask"][..., 0])) ** 2),
          "dice_coarse": 10 * (1 - np_dice(out["coarse_seg"], batch["normal_vert"])),
          "height": np.mean(40 * np.abs(40 * out["p1"] - batch["height"]) / batch["height"]
                            + 40 * np.abs(40 * out["p2"] - batch["height"]) / batch["height"])}
  for k, v in want.items():
    np.testing.assert_allclose(float(terms[k]), v, rtol=2e-5, err_msg=k)
  np.testing.assert_allclose(float(total), sum(want.values()), rtol=2e-5)


def test_exported_from_the_package():
  assert L.healthivert_generator_loss is LH.healthivert_generator_loss  # the terms: losses.healthivert.*
