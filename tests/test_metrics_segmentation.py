"""Per-zone Dice / MASD / HD95 / RAVD vs a brute-force float64 oracle (explicit neighbour loops and pairwise
distances), the closed-form cases (shifted cube, concentric balls, identical masks) and the abstract's numbers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from lostjax.metrics import segmentation as S


def bf_contour(m, conn=1):
  """Foreground voxels with a background neighbour, by looping over the neighbour offsets (outside = background)."""
  pad = np.pad(m, 1)
  out = np.zeros_like(m)
  offs = [o for o in itertools.product((-1, 0, 1), repeat=m.ndim) if 0 < sum(map(abs, o)) <= conn]
  for idx in zip(*np.nonzero(m)):
    for o in offs:
      q = tuple(i + 1 + d for i, d in zip(idx, o))
      if not pad[q]:
        out[idx] = True
        break
  return out


def bf_distances(p, g, spacing, conn=1):
  cp, cg = np.argwhere(bf_contour(p, conn)) * spacing, np.argwhere(bf_contour(g, conn)) * spacing
  d = np.sqrt(((cg[:, None, :] - cp[None, :, :]) ** 2).sum(-1))
  return d.min(1), d.min(0)          # GT -> P, P -> GT


def bf_metrics(p, g, spacing, conn=1):
  d_gp, d_pg = bf_distances(p, g, np.asarray(spacing, float), conn)
  both = np.concatenate([d_gp, d_pg])
  return (2 * (p & g).sum() / (p.sum() + g.sum()), both.mean(),
          max(np.percentile(d_gp, 95), np.percentile(d_pg, 95)), abs(p.sum() / g.sum() - 1) * 100)


def blob(shape, centre, radii, rng=None, noise=0.0):
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
  r = (((grid - centre) / radii) ** 2).sum(-1)
  if rng is not None:
    r = r + noise * rng.normal(size=shape)
  return r <= 1.0


@pytest.mark.parametrize("conn", [1, 3])
def test_random_blobs_vs_brute_force(conn):
  rng = np.random.default_rng(0)
  spacing = (3.0, 0.5, 0.7)
  for _ in range(3):
    p = blob((9, 14, 13), rng.uniform(3, 8, 3), rng.uniform(2, 5, 3), rng, 0.3)
    g = blob((9, 14, 13), rng.uniform(3, 8, 3), rng.uniform(2, 5, 3), rng, 0.3)
    np.testing.assert_array_equal(S.contour(p, contour_connectivity=conn), bf_contour(p, conn))
    d_gp, d_pg = S.surface_distances(p, g, spacing, contour_connectivity=conn)
    o_gp, o_pg = bf_distances(p, g, np.asarray(spacing), conn)
    np.testing.assert_allclose(d_gp, o_gp, rtol=1e-12)
    np.testing.assert_allclose(d_pg, o_pg, rtol=1e-12)
    got = S.case_metrics(p, g, spacing, contour_connectivity=conn)
    np.testing.assert_allclose([got["dice"], got["masd"], got["hd95"], got["ravd"]], bf_metrics(p, g, spacing, conn),
                               rtol=1e-12)
    assert got["masd"] == pytest.approx(S.masd(p, g, spacing, contour_connectivity=conn))
    assert got["hd95"] == pytest.approx(S.hd95(p, g, spacing, contour_connectivity=conn))


def test_masd_pools_both_directions():
  # a small P inside a big G: the pooled mean differs from the mean of the two directed means
  g = np.zeros((1, 20, 20), bool)
  g[0, 2:18, 2:18] = True
  p = np.zeros_like(g)
  p[0, 8:11, 8:11] = True
  d_gp, d_pg = S.surface_distances(p, g)
  assert d_gp.size != d_pg.size
  assert S.masd(p, g) == pytest.approx(np.concatenate([d_gp, d_pg]).mean())
  assert S.masd(p, g) != pytest.approx((d_gp.mean() + d_pg.mean()) / 2)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shifted_cube_dice(k):
  side = 8
  a = np.zeros((12, 12, 16), bool)
  a[2:2 + side, 2:2 + side, 2:2 + side] = True
  b = np.roll(a, k, axis=2)
  assert S.dice(a, b) == pytest.approx(1 - k / side)
  # the faces normal to x are k voxels apart, the others coincide
  assert 0 < S.masd(a, b) <= k and S.hd95(a, b) == pytest.approx(k)
  assert S.ravd(a, b) == 0.0


def test_concentric_balls_masd_about_two():
  a = blob((31, 31, 31), np.full(3, 15.0), np.full(3, 10.0))
  b = blob((31, 31, 31), np.full(3, 15.0), np.full(3, 12.0))
  assert abs(S.masd(a, b) - 2.0) <= 0.5
  # anisotropic spacing scales the distances: doubling every spacing doubles MASD
  assert S.masd(a, b, (2.0, 2.0, 2.0)) == pytest.approx(2 * S.masd(a, b))


def test_identical_masks():
  a = blob((10, 12, 12), np.array([5.0, 6, 6]), np.array([3.0, 4, 4]))
  got = S.case_metrics(a, a, (3.0, 0.5, 0.5))
  assert got == {"dice": 1.0, "masd": 0.0, "hd95": 0.0, "ravd": 0.0, "empty": False}


def test_empty_cases_and_lab_convention():
  a = blob((10, 12, 12), np.array([5.0, 6, 6]), np.array([3.0, 4, 4]))
  z = np.zeros_like(a)
  got = S.case_metrics(z, a)
  assert got["dice"] == 0.0 and np.isnan(got["masd"]) and np.isnan(got["hd95"]) and got["empty"]
  assert got["ravd"] == 100.0
  lab = S.case_metrics(z, a, empty="zero")
  assert lab["masd"] == 0.0 and lab["hd95"] == 0.0
  both = S.case_metrics(z, z)
  assert both["dice"] == 1.0 and np.isnan(both["ravd"])
  assert S.masd(a, z, empty="zero") == 0.0 and np.isnan(S.hd95(a, z))


def test_zone_metrics_and_aggregate():
  rng = np.random.default_rng(1)
  gt = rng.integers(0, 3, (6, 10, 10))
  pred = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(0, 3, gt.shape))
  pred2 = pred.copy()
  pred2[pred2 == 1] = 0                       # zone 1 missing from the second case
  zones = {"PZ": 1, "TZ": 2}
  cases = [S.zone_metrics(pred, gt, zones, (3.0, 0.5, 0.5)), S.zone_metrics(pred2, gt, zones, (3.0, 0.5, 0.5))]
  for z, i in zones.items():
    ref = bf_metrics(pred == i, gt == i, (3.0, 0.5, 0.5))
    np.testing.assert_allclose([cases[0][z][m] for m in ("dice", "masd", "hd95", "ravd")], ref, rtol=1e-12)
  agg = S.aggregate_cases(cases)
  assert agg["PZ"]["n_empty"] == 1 and agg["TZ"]["n_empty"] == 0
  assert agg["PZ"]["masd"]["n"] == 1 and agg["PZ"]["masd"]["mean"] == pytest.approx(cases[0]["PZ"]["masd"])
  assert agg["PZ"]["dice"]["n"] == 2 and agg["PZ"]["dice"]["mean"] == pytest.approx(cases[0]["PZ"]["dice"] / 2)
  assert agg["PZ"]["dice"]["std"] == pytest.approx(cases[0]["PZ"]["dice"] / 2)   # population std of (d, 0)
  assert agg["TZ"]["ravd"]["median"] == pytest.approx(np.median([c["TZ"]["ravd"] for c in cases]))


def test_improvement_abstract_numbers():
  new = np.array([0.9244, 0.89, 0.4157, 0.8033])
  np.testing.assert_allclose(S.improvement(np.ones(4), new), [7.56, 11.00, 58.43, 19.67], atol=1e-9)
  assert S.improvement(2.0, 2.5) == pytest.approx(-25.0)


def test_bad_input():
  a = np.ones((4, 4, 4), bool)
  with pytest.raises(ValueError, match="same shape"):
    S.dice(a, a[:3])
  with pytest.raises(ValueError, match="binary"):
    S.masd(a * 2, a)
  with pytest.raises(ValueError, match="spacing"):
    S.masd(a, a, (1.0, -1.0, 1.0))
  with pytest.raises(ValueError, match="spacing"):
    S.hd95(a, a, (1.0, 1.0))
  with pytest.raises(ValueError, match="contour_connectivity"):
    S.contour(a, contour_connectivity=4)
  with pytest.raises(ValueError, match="empty"):
    S.masd(a, a, empty="skip")
  with pytest.raises(ValueError, match="base"):
    S.improvement([0.0], [1.0])
  with pytest.raises(ValueError, match="integer"):
    S.zone_metrics(a.astype(float), a.astype(float), {"PZ": 1})


def test_aggregate_given_values():
  vals = [0.1, 0.2, 0.9, float("nan")]
  cases = [{"Z": {"dice": v, "masd": v, "hd95": v, "ravd": v, "empty": np.isnan(v)}} for v in vals]
  agg = S.aggregate_cases(cases)["Z"]
  assert agg["n_empty"] == 1
  assert agg["masd"] == {"mean": pytest.approx(0.4), "median": pytest.approx(0.2),
                         "std": pytest.approx(np.sqrt(((0.3 ** 2) + 0.2 ** 2 + 0.5 ** 2) / 3)), "n": 3}
