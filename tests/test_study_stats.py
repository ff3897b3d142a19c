"""train/stats.py against scipy.stats (t.ppf, ttest_rel, ttest_1samp) and the study's three-way verdicts on it."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from train import stats, study


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_t_interval_matches_scipy(n):
  x = np.random.default_rng(n).normal(2.0, 0.05, size=n)
  iv = stats.t_interval(x)
  assert iv["n"] == n and iv["mean"] == pytest.approx(x.mean(), rel=1e-12)
  assert iv["std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
  half = sps.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)
  assert (iv["lo"], iv["hi"]) == pytest.approx((x.mean() - half, x.mean() + half), rel=1e-12)
  ci = sps.ttest_1samp(x, 0.0).confidence_interval(0.95)
  assert (iv["lo"], iv["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
  lo90, hi90 = stats.t_interval(x, 0.90)["lo"], stats.t_interval(x, 0.90)["hi"]
  assert iv["lo"] < lo90 < hi90 < iv["hi"]


def test_t_interval_edge_cases():
  one = stats.t_interval([2.5])
  assert one == {"n": 1, "mean": 2.5, "std": None, "lo": None, "hi": None}
  same = stats.t_interval([2.0, 2.0, 2.0])
  assert same["std"] == 0.0 and same["lo"] == same["hi"] == 2.0
  for bad, match in (([], "no values"), ([1.0, float("nan")], "non-finite")):
    with pytest.raises(ValueError, match=match):
      stats.t_interval(bad)
  with pytest.raises(ValueError, match="level=1.5"):
    stats.t_interval([1.0, 2.0], 1.5)


def test_paired_interval_is_ttest_rel():
  rng = np.random.default_rng(0)
  base = rng.normal(2.0, 0.2, size=4)                 # large seed-to-seed variation, shared by both methods
  a = {s: float(base[i] + 0.01 + rng.normal(0, 0.002)) for i, s in enumerate((0, 1, 2, 3))}
  b = {s: float(base[i]) for i, s in enumerate((0, 1, 2, 3))}
  b[7] = 9.0                                          # a seed only one run has is left out
  iv = stats.paired(a, b)
  xa, xb = np.array([a[s] for s in range(4)]), np.array([b[s] for s in range(4)])
  res = sps.ttest_rel(xa, xb)
  ci = res.confidence_interval(0.95)
  assert iv["seeds"] == [0, 1, 2, 3] and iv["ref_mean"] == pytest.approx(xb.mean())
  assert (iv["lo"], iv["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
  assert iv["lo"] > 0 and res.pvalue < 0.05          # pairing resolves a difference far below the seed spread
  unpaired = sps.ttest_ind(xa, xb)
  assert unpaired.pvalue > 0.5
  assert stats.paired({0: 1.0}, {1: 1.0}) is None


def test_three_way_verdicts():
  iv = {"lo": -0.05, "hi": 0.01}
  assert stats.at_most(iv, 0.02) == stats.HOLDS and stats.above(iv, 0.02) == stats.FAILS
  assert stats.at_most(iv, 0.01) == stats.HOLDS                   # the bound itself is on the claim's side
  assert stats.at_most(iv, 0.0) == stats.INCONCLUSIVE == stats.above(iv, 0.0)
  assert stats.at_most(iv, -0.06) == stats.FAILS and stats.above(iv, -0.06) == stats.HOLDS
  assert stats.at_most({"lo": None, "hi": None}, 0.02) == stats.INCONCLUSIVE
  assert stats.at_most(None, 0.02) == stats.NOT_MEASURED
  h, f, i, n = stats.HOLDS, stats.FAILS, stats.INCONCLUSIVE, stats.NOT_MEASURED
  assert stats.all_of([h, h]) == h and stats.all_of([h, i]) == i and stats.all_of([i, f]) == f
  assert stats.all_of([n, f]) == f and stats.all_of([h, n]) == n


def test_within_is_an_equivalence_test():
  # inside on both sides (bounds included), beyond one side, straddling a bound or zero-width at a bound
  assert stats.within({"lo": -0.02, "hi": 0.02}, 0.02) == stats.HOLDS
  assert stats.within({"lo": -0.01, "hi": 0.005}, 0.02) == stats.HOLDS
  assert stats.within({"lo": 0.021, "hi": 0.05}, 0.02) == stats.FAILS
  assert stats.within({"lo": -0.05, "hi": -0.021}, 0.02) == stats.FAILS
  assert stats.within({"lo": 0.01, "hi": 0.03}, 0.02) == stats.INCONCLUSIVE
  assert stats.within({"lo": -0.03, "hi": -0.01}, 0.02) == stats.INCONCLUSIVE
  assert stats.within({"lo": -0.03, "hi": 0.03}, 0.02) == stats.INCONCLUSIVE   # wider than the margin
  assert stats.within({"lo": None, "hi": None}, 0.02) == stats.INCONCLUSIVE
  assert stats.within(None, 0.02) == stats.NOT_MEASURED


def _best(losses_by_run, linear=None, state=None):
  linear = linear or {"dense": 1000, "lost": 500, "lowrank": 300, "dense_galore": 1000, "dense_frugal": 1000}
  state = state or {"dense": 800, "dense_galore": 400, "dense_frugal": 500}
  out = {}
  for run, losses in losses_by_run.items():
    iv = stats.t_interval(list(losses.values()))
    out[run] = {"run": run, "lr": 1e-3, "seed": 0, "eval_loss": min(losses.values()), "eval_loss_mean": iv["mean"],
                "losses": losses, "interval": iv, "params_linear": linear.get(run, 1000),
                "opt_state_bytes": state.get(run, 800)}
  return out


def test_study_verdicts_use_paired_intervals():
  dense = {0: 2.00, 1: 2.10, 2: 1.95}
  # LOST 5 % better than dense on every seed: "no more than 2 % worse" holds (the wording says lower, not within).
  best = _best({"dense": dense, "lost": {s: v * 0.95 for s, v in dense.items()},
                "lowrank": {s: v * 1.10 for s, v in dense.items()},
                "dense_galore": {0: 2.00 * 1.01, 1: 2.10 * 0.97, 2: 1.95 * 1.06},
                "dense_frugal": {s: v * 1.05 for s, v in dense.items()}})
  v = study.verdicts(best)
  assert [x[1] for x in v] == [stats.HOLDS, stats.HOLDS, stats.INCONCLUSIVE, stats.FAILS]
  assert "LOST 5.0% lower than dense" in v[0][2] and "n = 3 seeds" in v[0][2] and "no more than 2%" in v[0][0]
  assert "95 % CI [-5.5%, -4.5%]" in v[0][2]
  # The interval straddles the 2 % margin: inconclusive, not "holds".
  best["lost"] = dict(best["lost"], losses={0: 2.00 * 1.00, 1: 2.10 * 1.04, 2: 1.95 * 1.01})
  assert study.verdicts(best)[0][1] == stats.INCONCLUSIVE
  # One seed: no interval, every measured claim inconclusive.
  one = _best({k: {0: d[0]} for k, d in {"dense": dense, "lost": {0: 1.5}, "lowrank": {0: 3.0}}.items()})
  v = study.verdicts(one)
  assert [x[1] for x in v] == [stats.INCONCLUSIVE] * 2 + [stats.NOT_MEASURED] * 2
  assert "n = 1 seed: no interval" in v[0][2]
  # Low-rank clearly worse than dense but within the margin of LOST on every seed: does not hold.
  best = _best({"dense": dense, "lost": {s: v * 1.09 for s, v in dense.items()},
                "lowrank": {s: v * 1.10 for s, v in dense.items()}})
  assert study.verdicts(best)[1][1] == stats.FAILS
  # Too short: verdicts become inconclusive with the reason first.
  best = _best({"dense": dense, "lost": {s: v * 0.95 for s, v in dense.items()}})
  v = study.verdicts(best, steps=30, min_steps=240)
  assert v[0][1] == stats.INCONCLUSIVE and v[0][2].startswith("too short to conclude (30 steps < min_steps 240)")
  assert v[1][1] == stats.NOT_MEASURED
  assert study.verdicts(best, steps=240, min_steps=240)[0][1] == stats.HOLDS
