"""Tests for lostjax.metrics.scaling_law: reference values, parameter recovery, scipy on the same objective,
run-directory loading and the CLI."""
import json
import os

import numpy as np
import pytest
import scipy.optimize
import scipy.special

from lostjax.metrics import fit_scaling_law
from lostjax.metrics import scaling_law as sl

TEX = np.array([6.0073404, 6.0179186, 0.5267228, 0.33917084, 0.2849083])  # Chinchilla (a, b, e, alpha, beta)
SMALL_GRID = sl.chinchilla_grid()[::37]  # 122 of the 4500 starts, to keep most tests fast


def law_np(p, n, d):
  a, b, e, alpha, beta = p
  return np.exp(e) + np.exp(a) / n ** alpha + np.exp(b) / d ** beta


def huber_objective_np(p, n, d, loss, delta=1e-3):
  """Oracle objective with scipy: sum Huber(logsumexp(...) - log L)."""
  a, b, e, alpha, beta = p
  terms = np.stack([a - alpha * np.log(n), b - beta * np.log(d), np.full_like(n, e)])
  return float(np.sum(scipy.special.huber(delta, scipy.special.logsumexp(terms, axis=0) - np.log(loss))))


def noisy_design(seed=0, noise=1e-3):
  n, d = np.meshgrid(np.geomspace(1e7, 1e10, 6), np.geomspace(1e9, 1e12, 8), indexing="ij")
  n, d = n.ravel(), d.ravel()
  loss = law_np(TEX, n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.shape))
  return n, d, loss


def test_reference_values():
  np.testing.assert_allclose(law_np(TEX, 70e9, 1.4e12), 1.9208460, atol=5e-8)
  np.testing.assert_allclose(np.asarray(sl.scaling_law(np.asarray(TEX), 70e9, 1.4e12)), 1.9208460, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sl.scaling_law(np.asarray(TEX), 1e9, 2e10)), 2.5306682, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sl.scaling_law(np.asarray(sl.P0_DATABLATIONS), 70e9, 1.4e12)),
                             2.0245971, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sl.huber(np.array([0.01, 5e-4, -0.01]), 1e-3)),
                             [9.5e-6, 1.25e-7, 9.5e-6], rtol=1e-6)
  r = np.linspace(-0.01, 0.01, 11)
  np.testing.assert_allclose(np.asarray(sl.huber(r, 1e-3)), scipy.special.huber(1e-3, r), rtol=1e-6, atol=1e-14)
  np.testing.assert_allclose(sl.absolute_relative_error([2.0, 2.1], [2.2, 2.0]), 0.0704545, atol=1e-7)
  assert len(sl.chinchilla_grid()) == 4500


def spec_design():
  n, d = np.meshgrid([1e8, 3e8, 1e9, 3e9], [2e9, 6e9, 2e10, 6e10], indexing="ij")
  return n.ravel(), d.ravel()


@pytest.mark.parametrize("grid", [
    pytest.param(None, marks=pytest.mark.slow),  # the default 4500-start Chinchilla grid
    SMALL_GRID,
])
def test_huber_recovers_noise_free_spec_design(grid):
  # scipy L-BFGS-B with default tolerances stops early on this design; ours must recover to 1e-4.
  n, d = spec_design()
  fit = fit_scaling_law(n, d, law_np(TEX, n, d), method="huber", init_grid=grid)
  np.testing.assert_allclose(fit.params, TEX, atol=1e-4)
  assert fit.objective < 1e-12
  np.testing.assert_allclose([fit.E, fit.A, fit.B], np.exp(TEX[[2, 0, 1]]), rtol=1e-4)


def test_huber_recovers_noisy_and_matches_scipy_on_same_objective():
  n, d, loss = noisy_design()
  fit = fit_scaling_law(n, d, loss, method="huber", init_grid=SMALL_GRID, chunk=61)
  np.testing.assert_allclose(fit.params, TEX, atol=0.15)
  np.testing.assert_allclose(fit.predict(70e9, 1.4e12), law_np(TEX, 70e9, 1.4e12), rtol=3e-3)
  np.testing.assert_allclose(fit.objective, huber_objective_np(fit.params, n, d, loss), rtol=1e-9)
  # scipy L-BFGS-B with tight tolerances from several starts on the same (scipy-built) objective
  best = None
  for x0 in [TEX, np.asarray(sl.P0_DATABLATIONS), *SMALL_GRID[::30]]:
    res = scipy.optimize.minimize(huber_objective_np, x0, args=(n, d, loss), method="L-BFGS-B",
                                  options=dict(ftol=1e-15, gtol=1e-13, maxiter=20000, maxfun=50000))
    if best is None or res.fun < best.fun:
      best = res
  assert fit.objective <= best.fun * (1 + 1e-6) + 1e-15
  np.testing.assert_allclose(fit.params, best.x, atol=2e-3)


def test_least_squares_recovers_and_is_a_stationary_point():
  n, d, loss = noisy_design(seed=1)
  fit = fit_scaling_law(n, d, loss, method="least_squares")
  np.testing.assert_allclose(fit.params, TEX, atol=0.15)
  sse = lambda p: float(np.sum((law_np(p, n, d) - loss) ** 2))
  np.testing.assert_allclose(fit.objective, sse(fit.params), rtol=1e-9)
  assert fit.objective <= sse(TEX)
  # first-order optimality by central differences (numpy oracle); alpha, beta are inside their bounds here
  grad = np.array([(sse(fit.params + h) - sse(fit.params - h)) / 2e-7 for h in 1e-7 * np.eye(5)])
  assert np.linalg.norm(grad) < 1e-3 * np.linalg.norm(
      [(sse(TEX + h) - sse(TEX - h)) / 2e-7 for h in 1e-7 * np.eye(5)]) + 1e-9


def write_run(root, name, n_total, law, tokens_per_step=1000, steps=200, eval_every=20, with_eval=True,
              noise=0.0, seed=0):
  run = os.path.join(root, name)
  os.makedirs(run)
  with open(os.path.join(run, "summary.json"), "w") as f:
    json.dump({"params": {"total": n_total, "trainable": n_total, "linear": n_total // 2,
                          "dense_equivalent": n_total, "non_embedding": n_total // 2},
               "tokens_per_step": tokens_per_step}, f)
  rng = np.random.default_rng(seed)
  with open(os.path.join(run, "metrics.jsonl"), "w") as f:
    for step in range(1, steps + 1):
      tokens = step * tokens_per_step
      loss = float(law(n_total, tokens) * np.exp(rng.normal(0, noise)))
      f.write(json.dumps({"step": step, "tokens": tokens, "train_loss": loss + 0.05, "lr": 1e-3}) + "\n")
      if with_eval and step % eval_every == 0:
        f.write(json.dumps({"step": step, "tokens": tokens, "eval_loss": loss, "eval_ppl": float(np.exp(loss)),
                            "eval_bpb": loss / np.log(2)}) + "\n")
  return run


SMALL_LAW = np.array([3.0, 4.0, 0.6, 0.3, 0.35])  # a law for runs of ~1e5-1e6 params and ~1e6 tokens


def test_load_run_prefers_eval_loss_and_derives_tokens(tmp_path):
  law = lambda n, t: law_np(SMALL_LAW, n, t)
  run = write_run(tmp_path, "r1", 100_000, law)
  curve = sl.load_run(run)
  assert curve.loss_key == "eval_loss" and curve.tokens.size == 10 and curve.n == 100_000
  np.testing.assert_allclose(curve.loss, law(100_000, curve.tokens), rtol=1e-12)
  curve = sl.load_run(run, n_key="non_embedding")
  assert curve.n == 50_000
  run2 = write_run(tmp_path, "r2", 100_000, law, with_eval=False, steps=30)
  lines = [json.loads(l) for l in open(os.path.join(run2, "metrics.jsonl"))]
  with open(os.path.join(run2, "metrics.jsonl"), "w") as f:  # drop 'tokens': use step x tokens_per_step
    for rec in lines:
      rec.pop("tokens")
      f.write(json.dumps(rec) + "\n")
  curve = sl.load_run(run2)
  assert curve.loss_key == "train_loss" and curve.tokens.size == 30
  np.testing.assert_allclose(curve.tokens, 1000 * np.arange(1, 31))


def test_fit_points_cuts():
  run = sl.RunCurve("r", 10.0, np.arange(1.0, 101.0), np.ones(100) * 2.0, "eval_loss")
  n, d, loss = sl.fit_points([run], min_tokens=0, min_fraction=0.1)
  assert d.min() == 11 and d.max() == 100 and n.size == 90
  n, d, loss = sl.fit_points([run], min_tokens=50, min_fraction=0.1, max_fraction=0.8)
  assert d.min() == 51 and d.max() == 80


@pytest.mark.parametrize("n, d, loss, match", [
    ([], [], [], "at least 5"),
    ([1e8] * 5, [1e9, 2e9, 3e9, 4e9, 5e9], [3.0] * 5, "distinct model sizes"),
    ([1e8, 2e8, 3e8, 4e8, 5e8], [1e9] * 5, [3.0] * 5, "distinct token"),
    ([1e8, 2e8, 3e8, 4e8, 5e8], [1e9, 2e9, 3e9, 4e9], [3.0] * 5, "mismatched"),
    ([1e8, 2e8, 3e8, 4e8, 5e8], [1e9, 2e9, 3e9, 4e9, 5e9], [3.0, np.nan, 3.0, 3.0, 3.0], "NaN"),
    ([1e8, 2e8, 3e8, 4e8, 5e8], [1e9, 2e9, 3e9, 4e9, 5e9], [3.0, -1.0, 3.0, 3.0, 3.0], "positive loss"),
    ([[1e8, 2e8, 3e8, 4e8, 5e8]], [1e9, 2e9, 3e9, 4e9, 5e9], [3.0] * 5, "1-D"),
])
def test_bad_points_raise(n, d, loss, match):
  with pytest.raises(ValueError, match=match):
    fit_scaling_law(n, d, loss)


def test_bad_options_and_too_few_runs(tmp_path):
  n, d, loss = noisy_design()
  with pytest.raises(ValueError, match="method"):
    fit_scaling_law(n, d, loss, method="adam")
  with pytest.raises(ValueError, match="init_grid"):
    fit_scaling_law(n, d, loss, init_grid=np.zeros((3, 4)))
  with pytest.raises(ValueError, match="at least 2 runs"):
    sl.fit_runs([sl.RunCurve("r", 10.0, np.arange(1.0, 11.0), np.ones(10), "eval_loss")])
  two = [sl.RunCurve(f"r{i}", 10.0 * (i + 1), np.arange(1.0, 11.0), np.ones(10), "eval_loss") for i in range(2)]
  with pytest.raises(ValueError, match="besides the largest"):
    sl.fit_runs(two)
  with pytest.raises(ValueError, match="summary.json"):
    sl.load_run(str(tmp_path))
  with pytest.raises(ValueError, match="length"):
    sl.absolute_relative_error([1.0, 2.0], [1.0])
