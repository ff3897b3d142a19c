"""Geographic generalization metrics vs float64 numpy loops and the spec's given numbers (disparity 0.15, progress
gap 2.5, growth 3.2, reduction 0.70)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

from lostjax.metrics import geographic as G
from oracle_utils import raises_while_tracing


def np_topk_correct(z, sets, k):
  out = []
  for row, s in zip(z, sets):
    order = sorted(range(len(row)), key=lambda c: (-row[c], c))   # ties: lowest index first
    out.append(float(bool(set(order[:k]) & set(s))))
  return np.array(out)


def test_topk_given_numbers_and_ties():
  z = np.array([[3, 2, 1, 0], [0, 1, 2, 3]], np.float32)
  y = G.label_sets_to_multihot([[1], [0, 3]], 4)
  topk = jax.jit(G.topk_set_correct, static_argnames="k")
  np.testing.assert_array_equal(topk(z, y, k=1), [0, 1])
  np.testing.assert_array_equal(topk(z, y, k=2), [1, 1])
  # ties: all logits equal -> the top-2 are classes 0 and 1
  flat = np.zeros((3, 5), np.float32)
  np.testing.assert_array_equal(G.topk_set_correct(flat, np.array([1, 2, 0]), k=2), [1, 0, 1])


def test_topk_random_vs_numpy_and_int_labels():
  rng = np.random.default_rng(0)
  z = rng.integers(0, 4, (40, 12)).astype(np.float32)        # many ties
  sets = [list(rng.choice(12, rng.integers(1, 4), replace=False)) for _ in range(40)]
  for k in (1, 3, 5):
    np.testing.assert_array_equal(G.topk_set_correct(z, G.label_sets_to_multihot(sets, 12), k=k),
                                  np_topk_correct(z, sets, k))
  single = rng.integers(0, 12, 40)
  np.testing.assert_array_equal(G.topk_set_correct(z, single, k=2), np_topk_correct(z, single[:, None], 2))


def test_group_accuracy_and_by_name():
  rng = np.random.default_rng(1)
  correct = rng.integers(0, 2, 50).astype(np.float32)
  groups = rng.integers(0, 4, 50)
  groups[groups == 2] = 1                                      # group 2 has no image -> NaN
  got = np.asarray(jax.jit(G.group_accuracy, static_argnames="num_groups")(correct, groups, num_groups=4))
  for g in (0, 1, 3):
    assert got[g] == pytest.approx(correct[groups == g].mean())
  assert np.isnan(got[2])
  names = np.array(["Europe", "Africa", "Asia"])[rng.integers(0, 3, 50)]
  z = rng.normal(size=(50, 6)).astype(np.float32)
  y = rng.integers(0, 6, 50)
  acc = G.accuracy_by_group(z, y, names, k=1)
  ref = np_topk_correct(z, y[:, None], 1)
  assert set(acc) == {"Africa", "Asia", "Europe"}
  for n in acc:
    assert acc[n] == pytest.approx(ref[names == n].mean())


def test_disparity_given_numbers():
  acc = {"Europe": 0.80, "Americas": 0.76, "Asia": 0.72, "Africa": 0.65}
  assert G.disparity(acc) == pytest.approx(0.15)
  assert G.disparity(acc, pair=("Europe", "Africa")) == pytest.approx(0.15)
  assert G.disparity(acc, pair=("Americas", "Asia")) == pytest.approx(0.04)
  assert G.disparity(np.array([0.5, np.nan, 0.7])) == pytest.approx(0.2)


@pytest.mark.parametrize("scale", ["linear", "probit", "logit"])
def test_progress_rate_vs_scipy(scale):
  rng = np.random.default_rng(2)
  x, y = rng.uniform(0.5, 0.9, 9), rng.uniform(0.2, 0.8, 9)
  t = {"linear": lambda a: a, "probit": stats.norm.ppf, "logit": lambda a: np.log(a / (1 - a))}[scale]
  with jax.enable_x64(True):
    got = float(jax.jit(G.progress_rate, static_argnames=("scale", "eps"))(x, y, scale=scale))
  assert got == pytest.approx(stats.linregress(t(x), t(y)).slope, rel=1e-9)


def test_progress_gap_given_numbers():
  x = np.array([0.60, 0.70, 0.80, 0.90])
  with jax.enable_x64(True):
    assert float(G.progress_rate(x, 0.1 + 1.0 * x)) == pytest.approx(1.0, rel=1e-12)
    assert float(G.progress_rate(x, 0.3 + 0.4 * x)) == pytest.approx(0.4, rel=1e-12)
    assert float(G.progress_gap(x, 0.1 + 1.0 * x, 0.3 + 0.4 * x)) == pytest.approx(2.5, rel=1e-12)
    assert float(G.progress_rate(x, x)) == pytest.approx(1.0)            # ImageNet itself
  assert float(G.progress_gap(x.astype(np.float32), 0.1 + x, 0.3 + 0.4 * x)) == pytest.approx(2.5, rel=1e-5)
  # the default axis is linear; probit gives another number on the same data
  assert float(G.progress_gap(x, 0.1 + x * 0.9, 0.3 + 0.4 * x, scale="probit")) != pytest.approx(2.25, rel=1e-3)
  assert float(G.progress_gap(x, 0.1 + x * 0.9, 0.3 + 0.4 * x)) == pytest.approx(2.25, rel=1e-5)


def test_growth_and_reduction_given_numbers():
  assert float(G.disparity_growth([0.6, 0.9], [0.05, 0.16], n=1)) == pytest.approx(3.2, rel=1e-6)
  x = np.linspace(0.5, 0.9, 12)
  d = np.linspace(0.02, 0.2, 12)[::-1].copy()[np.argsort(-x)]   # more accurate -> larger disparity
  ref = d[np.argsort(x)][-5:].mean() / d[np.argsort(x)][:5].mean()
  assert float(G.disparity_growth(x, d)) == pytest.approx(ref, rel=1e-6)           # n = 5 default
  assert float(G.disparity_growth(x, d, n=5)) != pytest.approx(float(G.disparity_growth(x, d, n=3)), rel=1e-3)
  assert float(G.disparity_reduction(0.15, 0.045)) == pytest.approx(0.70, rel=1e-6)


def test_bad_input():
  z = np.zeros((2, 4), np.float32)
  raises_while_tracing("k must", lambda: G.topk_set_correct(z, np.array([0, 1]), k=5))
  raises_while_tracing("labels", lambda: G.topk_set_correct(z, np.zeros((2, 3), bool), k=1))
  raises_while_tracing("groups", lambda: G.group_accuracy(np.ones(3), np.ones(3), num_groups=2))
  raises_while_tracing("scale", lambda: G.progress_rate(np.ones(3), np.ones(3), scale="log"))
  raises_while_tracing("same length", lambda: G.progress_rate(np.ones(3), np.ones(4)))
  raises_while_tracing("n must", lambda: G.disparity_growth(np.ones(3), np.ones(3), n=4))
  with pytest.raises(ValueError, match="pair"):
    G.disparity({"Europe": 0.8, "Africa": 0.6}, pair=("Europe", "Asia"))
  with pytest.raises(ValueError, match="x has non-finite"):
    G.progress_rate(np.array([0.5, np.nan]), np.ones(2))
  with pytest.raises(ValueError, match="outside"):
    G.label_sets_to_multihot([[0, 4]], 4)
