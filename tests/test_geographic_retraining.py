"""Last-layer retraining (DFR-style, region-balanced) vs scikit-learn / the optimality condition, its pinned
ASSUMED defaults, the report harness, and the synthetic geographic-shift world (disparity falls after retraining,
progress gap > 1)."""
from __future__ import annotations

import importlib.util
import inspect
import json
import os

import jax
import numpy as np
import pytest

from lostjax.vision import last_layer_retraining as R
from train import geographic as H

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
  spec = importlib.util.spec_from_file_location("geographic_shift_example",
                                                os.path.join(ROOT, "examples", "geographic_shift.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_fit_linear_head_is_the_regularised_optimum():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(120, 4)), rng.integers(0, 3, 120)
  lam = 1e-2
  with jax.enable_x64(True):
    w, b = R.fit_linear_head(x, y, 3, l2=lam, steps=60)
  # stationarity of mean CE + lam ||W||^2 (float64 numpy gradient)
  z = x @ w + b
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  err = (p - np.eye(3)[y]) / len(y)
  np.testing.assert_allclose(x.T @ err + 2 * lam * w, 0, atol=1e-8)
  np.testing.assert_allclose(err.sum(0), 0, atol=1e-8)
  sk = pytest.importorskip("sklearn.linear_model")
  ref = sk.LogisticRegression(C=1 / (2 * len(y) * lam), tol=1e-12, max_iter=10000).fit(x, y)
  np.testing.assert_allclose(w - w.mean(1, keepdims=True), ref.coef_.T, atol=1e-6)


def test_region_balanced_indices():
  regions = np.array(["Europe"] * 50 + ["Africa"] * 7 + ["Asia"] * 20)
  idx = R.region_balanced_indices(regions, seed=3)
  assert sorted(np.unique(regions[idx], return_counts=True)[1].tolist()) == [7, 7, 7]
  assert len(set(idx.tolist())) == len(idx)
  np.testing.assert_array_equal(idx, R.region_balanced_indices(regions, seed=3))
  assert not np.array_equal(idx, R.region_balanced_indices(regions, seed=4))


def test_assumed_defaults_pinned():
  sig = inspect.signature(R.retrain_last_layer).parameters
  assert sig["l2"].default == 1e-4 and sig["holdout"].default == 0.1 and sig["num_subsamples"].default == 5
  assert sig["select_by"].default == "worst_region" and sig["standardize"].default is True


def test_retrain_averages_subsamples_and_tunes_l2():
  # float64 features with the shapes and steps of the test above (every subsample pads to 128 rows of 4 features,
  # 3 classes, 60 L-BFGS steps): all fits here reuse its compiled solver
  rng = np.random.default_rng(1)
  x = rng.normal(size=(120, 4))
  y = rng.integers(0, 3, 120)
  r = np.array(["A", "B", "C"])[rng.integers(0, 3, 120)]
  with jax.enable_x64(True):
    head = R.retrain_last_layer(x, y, r, 3, num_subsamples=2, steps=60)
    mean, std = x.mean(0), x.std(0) + 1e-8
    h = (x - mean) / std
    ws = [R.fit_linear_head(h[R.region_balanced_indices(r, seed=s)], y[R.region_balanced_indices(r, seed=s)], 3,
                            l2=1e-4, steps=60) for s in (0, 1)]
    np.testing.assert_allclose(head.kernel, np.mean([w for w, _ in ws], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(head(x)), h @ head.kernel + head.bias, rtol=1e-5, atol=1e-5)
    tuned = R.retrain_last_layer(x, y, r, 3, l2=(1e-4, 10.0), num_subsamples=1, steps=60)
  assert tuned.l2 in (1e-4, 10.0)
  with pytest.raises(ValueError, match="select_by"):
    R.retrain_last_layer(x, y, r, 2, select_by="best")
  with pytest.raises(ValueError, match="must agree"):
    R.retrain_last_layer(x, y[:5], r, 2)
  with pytest.raises(ValueError, match="num_classes"):
    R.fit_linear_head(x, y, 1)


@pytest.mark.slow  # runs the example end to end (tiny settings); `pytest -m slow tests`
def test_synthetic_world_disparity_falls_and_gap_above_one(tmp_path):
  out = _example().main([f"--out={tmp_path}", "--n_imagenet=1000", "--n_train=1000", "--n_test=2000", "--zoo=6",
                         "--steps=60", "--num_subsamples=2"])
  b, a = out["before"], out["after"]
  assert b["region_top1"]["Europe"] > b["region_top1"]["Africa"] + 0.2
  assert a["disparity_top1"] < b["disparity_top1"] and out["disparity_reduction_top1"] >= 0.5
  assert out["progress_gap_linear"] > 1.0
  for f in ("disparity.png", "results.json", "results.md", "report/scatter.png", "report/models.csv",
            "report/regions_geo.csv", "report/tables.md", "report/summary.json"):
    assert os.path.getsize(tmp_path / f) > 0
  with pytest.raises(SystemExit, match="already holds"):
    _example().main([f"--out={tmp_path}"])


def test_harness_tables_and_summary(tmp_path):
  rng = np.random.default_rng(2)
  regions = np.array(["Europe", "Africa", "Asia"])[rng.integers(0, 3, 60)]
  incomes = np.array(["low", "high"])[rng.integers(0, 2, 60)]
  labels = rng.integers(0, 6, 60)
  x = np.array([0.6, 0.7, 0.8, 0.9])
  models = []
  for i, xi in enumerate(x):
    logits = rng.normal(size=(60, 6)).astype(np.float32)
    models.append({"name": f"m{i}", "imagenet_acc": xi, "benchmarks": {"v2": 0.1 + xi, "sketch": 0.2 + 0.5 * xi},
                   "geographic": {"ds": H.evaluate_classifier(logits, labels, regions, incomes)}})
  r0 = models[0]["geographic"]["ds"]
  assert set(r0["region_top1"]) == {"Europe", "Africa", "Asia"} and set(r0["income_top5"]) == {"low", "high"}
  assert r0["pair_disparity_top1"] == pytest.approx(r0["region_top1"]["Europe"] - r0["region_top1"]["Africa"])
  geo = np.array([m["geographic"]["ds"]["top1"] for m in models])
  summary = H.write_report(models, str(tmp_path), n_extreme=1)
  lin = summary["scales"]["linear"]
  assert lin["progress_rate"]["v2"] == pytest.approx(1.0, rel=1e-5)
  assert lin["progress_gap"]["sketch/ds"] == pytest.approx(0.5 / np.polyfit(x, geo, 1)[0], rel=1e-4)
  assert lin["max_gap"]["ds"]["benchmark"] == ("v2" if np.polyfit(x, geo, 1)[0] > 0 else "sketch")
  assert json.load(open(tmp_path / "summary.json"))["num_models"] == 4
  rows = open(tmp_path / "regions_ds.csv").read().splitlines()
  assert len(rows) == 1 + 4 * (3 + 3 + 2 + 2)
  with pytest.raises(ValueError, match="already holds"):
    H.write_report(models, str(tmp_path))
  with pytest.raises(ValueError, match="same benchmarks"):
    H.summarize(models[:1] + [{**models[1], "benchmarks": {"v2": 0.5}}])
