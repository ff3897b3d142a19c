"""Seed statistics of the study: t-intervals of a mean, paired differences, and three-way verdicts.

Every run of a study is trained with several seeds (`train.seed` sets both the initialisation and the data order,
so two methods trained with the same seed see the same batches in the same order). For a run at its best learning
rate, the final eval losses x_1..x_n over its seeds give

    mean x̄, sample std s = sqrt(Σ (x_i − x̄)² / (n − 1)),
    95 % interval  x̄ ± t_{0.975, n−1} · s / √n        (Student t, two-sided)

Two methods A and B are compared by the paired differences d_i = x_i^A − x_i^B over the seeds they share (the same
seed gives both the same data order, so the seed-to-seed variation common to both cancels); the interval of the
mean difference is the same formula applied to d (this is the interval of `scipy.stats.ttest_rel`).

A claim of the form "A is at most m worse than B" holds when the whole interval lies below the margin m, does not
hold when the whole interval lies above it, and is inconclusive when the interval contains m. With one seed there
is no interval and every comparison is inconclusive.
"""

from __future__ import annotations

import math

from scipy import stats as _sps

LEVEL = 0.95
HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED = "holds", "does not hold", "inconclusive", "not measured"


def t_interval(xs, level: float = LEVEL) -> dict:
  """{'n', 'mean', 'std', 'lo', 'hi'} of the values `xs`; std, lo and hi are None when n < 2."""
  xs = [float(x) for x in xs]
  n = len(xs)
  if n == 0:
    raise ValueError("t_interval of no values")
  if not all(math.isfinite(x) for x in xs):
    raise ValueError(f"t_interval of non-finite values {xs}")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level={level!r} must lie strictly between 0 and 1")
  mean = sum(xs) / n
  if n < 2:
    return {"n": n, "mean": mean, "std": None, "lo": None, "hi": None}
  std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
  half = float(_sps.t.ppf(0.5 + level / 2.0, n - 1)) * std / math.sqrt(n)
  return {"n": n, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def paired(a: dict, b: dict, level: float = LEVEL) -> dict | None:
  """Interval of the mean of a[s] − b[s] over the seeds s both have (dicts seed -> value); None if none shared."""
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return None
  out = t_interval([a[s] - b[s] for s in seeds], level)
  out["seeds"] = seeds
  out["ref_mean"] = sum(b[s] for s in seeds) / len(seeds)
  return out


def at_most(iv: dict | None, margin: float) -> str:
  """Verdict of "the mean is at most `margin`": the whole interval ≤ margin holds, wholly > margin fails."""
  if iv is None:
    return NOT_MEASURED
  if iv["lo"] is None:
    return INCONCLUSIVE
  if iv["hi"] <= margin:
    return HOLDS
  if iv["lo"] > margin:
    return FAILS
  return INCONCLUSIVE


def within(iv: dict | None, margin: float) -> str:
  """Verdict of "the mean lies within ±`margin`" (an equivalence test): the whole interval inside [−margin, margin]
  holds, the whole interval beyond one side fails, anything else is inconclusive."""
  if iv is None:
    return NOT_MEASURED
  if iv["lo"] is None:
    return INCONCLUSIVE
  if -margin <= iv["lo"] and iv["hi"] <= margin:
    return HOLDS
  if iv["lo"] > margin or iv["hi"] < -margin:
    return FAILS
  return INCONCLUSIVE


def above(iv: dict | None, margin: float) -> str:
  """Verdict of "the mean is above `margin`": the whole interval > margin holds, the whole interval ≤ margin fails."""
  v = at_most(iv, margin)
  return {HOLDS: FAILS, FAILS: HOLDS}.get(v, v)


def all_of(verdicts) -> str:
  """A conjunction: fails if any part fails, else not measured if any part is, holds if all hold, else inconclusive."""
  vs = list(verdicts)
  if FAILS in vs:
    return FAILS
  if NOT_MEASURED in vs:
    return NOT_MEASURED
  if vs and all(v == HOLDS for v in vs):
    return HOLDS
  return INCONCLUSIVE
