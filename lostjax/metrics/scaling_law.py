"""Scaling-law fitting L(N, D) = E + A / N^alpha + B / D^beta from the checkpoints of several training runs.

Papers:
- L. Choshen, Y. Zhang, J. Andreas, "A Hitchhiker's Guide to Scaling Law Estimation", ICML 2025,
  arXiv:2410.11840 (official code IBM/ColPret). Its default fit, reproduced by `method="least_squares"`, is
  plain least squares on the raw loss of every intermediate checkpoint (one (N, D, L) point per checkpoint),
      L(N, D) = exp(e) + exp(a) / N^alpha + exp(b) / D^beta,         alpha >= 0, beta >= 0,
  with scipy.optimize.curve_fit (Trust Region Reflective because of the bounds), a single start at the
  Muennighoff et al. (2023) values p0 = (a, b, e, alpha, beta) = (6.255414, 7.3049974, 0.6254804, 0.3526596,
  0.3526596), retried with method="dogbox", x_scale=p0 on RuntimeError. Checkpoints with tokens <= 1e10 are
  dropped from the fit ("cut_beginning"); the error is the absolute relative error
      ARE = mean_i |L_i - L_hat_i| / L_i
  over the target (largest) model's checkpoints with tokens >= 0.7 x its final tokens.
- J. Hoffmann et al., "Training Compute-Optimal Large Language Models", arXiv:2203.15556, App. D.2
  ("Approach 3"), reproduced by `method="huber"`:
      min_{a,b,e,alpha,beta} sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),
  delta = 1e-3, L-BFGS from every point of the grid alpha, beta in {0, .5, 1, 1.5, 2}, e in {-1, -.5, 0, .5, 1},
  a, b in {0, 5, ..., 25} (4500 starts), keeping the lowest objective; A = e^a, B = e^b, E = e^e.

Deliberate choices / deviations:
- Following Besiroglu et al. (arXiv:2404.10102), the Huber loss is *summed* (not averaged) and optimised in
  float64 with a tight gradient tolerance, because the averaged loss made the original optimiser stop early.
  The L-BFGS is optax.lbfgs (zoom line search), vmapped over the 4500 starts (not scipy's L-BFGS-B). To keep
  a fit to seconds on CPU, every start first runs `screen_iters`=10 iterations and only the 32 lowest are
  then run to convergence (gradient norm < 1e-12 or 1000 iterations); `screen_iters=max_iter` restores the
  run-every-start-to-convergence procedure.
- The Hitchhiker cut of 1e10 tokens is a parameter (`min_tokens`); for the small runs of this project the CLI
  instead defaults to its relative form, dropping each run's first 10% of tokens (`min_fraction=0.1`).
- N is the run's *total* parameter count (as in ColPret and Chinchilla); the CLI's --n-key selects another count
  from summary.json (e.g. non_embedding, as Kaplan et al.). The loss is eval_loss when a run logged any eval
  line, else train_loss.

CLI:
  python -m train.analyze scaling --runs runs/a,runs/b,runs/c [--out fit.json --plot fit.png]
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lostjax.metrics._checks import check_finite

P0_DATABLATIONS = (6.255414, 7.3049974, 0.6254804, 0.3526596, 0.3526596)  # (a, b, e, alpha, beta)
PARAM_NAMES = ("a", "b", "e", "alpha", "beta")


def chinchilla_grid() -> np.ndarray:
  """The 4500 Approach-3 initialisations (a, b, e, alpha, beta) of Hoffmann et al. App. D.2."""
  a = np.arange(0.0, 30.0, 5.0)
  e = np.arange(-1.0, 1.5, 0.5)
  ab = np.arange(0.0, 2.5, 0.5)
  grid = np.stack(np.meshgrid(a, a, e, ab, ab, indexing="ij"), axis=-1).reshape(-1, 5)
  return grid


def scaling_law(params, n, d):
  """L(N, D) = exp(e) + exp(a) / N^alpha + exp(b) / D^beta for params = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = (params[..., i] for i in range(5))
  terms = jnp.stack([a - alpha * jnp.log(n), b - beta * jnp.log(d), jnp.broadcast_to(e, jnp.shape(n))], -1)
  return jnp.exp(jax.scipy.special.logsumexp(terms, axis=-1))


def huber(r, delta):
  """Huber_delta(r) = r^2 / 2 if |r| <= delta else delta (|r| - delta / 2)  (scipy.special.huber)."""
  abs_r = jnp.abs(r)
  return jnp.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))


def huber_objective(params, n, d, loss, delta=1e-3, weights=None):
  """Chinchilla Approach-3 objective: sum_i w_i Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L)
  (w_i = 1 by default; the fit uses 0/1 weights to pad the data to a few fixed sizes and reuse compilations)."""
  a, b, e, alpha, beta = (params[i] for i in range(5))
  pred_log = jax.scipy.special.logsumexp(
      jnp.stack([a - alpha * jnp.log(n), b - beta * jnp.log(d), jnp.broadcast_to(e, n.shape)], -1), axis=-1)
  per_point = huber(pred_log - jnp.log(loss), delta)
  return jnp.sum(per_point if weights is None else weights * per_point)


def absolute_relative_error(predicted, actual) -> float:
  """ARE = mean |actual - predicted| / actual (ColPret `mean_normalized_distance`)."""
  predicted = np.asarray(predicted, np.float64)
  actual = np.asarray(actual, np.float64)
  if predicted.shape != actual.shape or predicted.ndim != 1:
    raise ValueError(f"absolute_relative_error needs two 1-D arrays of equal length, got {predicted.shape} "
                     f"and {actual.shape}")
  if predicted.size == 0:
    raise ValueError("absolute_relative_error got empty arrays")
  check_finite(predicted, "predicted loss")
  check_finite(actual, "actual loss")
  return float(np.mean(np.abs(actual - predicted) / actual))


@dataclasses.dataclass(frozen=True)
class ScalingLawFit:
  """Fitted L(N, D) = E + A / N^alpha + B / D^beta with A = e^a, B = e^b, E = e^e."""
  a: float
  b: float
  e: float
  alpha: float
  beta: float
  method: str
  objective: float
  num_points: int

  @property
  def A(self) -> float:  # pylint: disable=invalid-name
    return math.exp(self.a)

  @property
  def B(self) -> float:  # pylint: disable=invalid-name
    return math.exp(self.b)

  @property
  def E(self) -> float:  # pylint: disable=invalid-name
    return math.exp(self.e)

  @property
  def params(self) -> np.ndarray:
    return np.array([self.a, self.b, self.e, self.alpha, self.beta])

  def predict(self, n, d) -> np.ndarray:
    """Predicted loss at parameter counts `n` and token counts `d` (broadcast), float64 numpy."""
    n = np.asarray(n, np.float64)
    d = np.asarray(d, np.float64)
    return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out.update(A=self.A, B=self.B, E=self.E)
    return out


def _check_points(n, d, loss):
  arrays = []
  for name, x in (("n (parameters)", n), ("d (tokens)", d), ("loss", loss)):
    x = np.asarray(x, np.float64)
    if x.ndim != 1:
      raise ValueError(f"fit_scaling_law expects 1-D {name}, got shape {x.shape}")
    check_finite(x, name)
    if x.size and np.any(x <= 0):
      raise ValueError(f"fit_scaling_law needs positive {name}, got min {x.min()}")
    arrays.append(x)
  n, d, loss = arrays
  if not n.size == d.size == loss.size:
    raise ValueError(f"fit_scaling_law got mismatched lengths: n {n.size}, d {d.size}, loss {loss.size}")
  if n.size < 5:
    raise ValueError(f"fit_scaling_law needs at least 5 points for 5 parameters, got {n.size}")
  if np.unique(n).size < 2:
    raise ValueError(f"fit_scaling_law needs at least 2 distinct model sizes (runs), got {np.unique(n).size}")
  if np.unique(d).size < 2:
    raise ValueError(f"fit_scaling_law needs at least 2 distinct token counts, got {np.unique(d).size}")
  return n, d, loss


def _lbfgs_solve(fun, x0, max_iter, tol, max_linesearch_steps, ftol=1e-14):
  """Minimise `fun` from `x0` with optax L-BFGS (zoom line search); returns (x, f(x)).

  Stops after `max_iter` iterations, when the gradient norm is below `tol`, or when an iteration lowers the
  objective by no more than `ftol` x |f| (no progress left at float64 precision).
  """
  opt = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=max_linesearch_steps))
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    x, state, _, f_last = carry
    value, grad = value_and_grad(x, state=state)  # value = f(x) at the current iterate
    updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(x, updates), state, f_last, value

  def keep_going(carry):
    _, state, f_before, f_last = carry
    count = optax.tree_utils.tree_get(state, "count")
    grad = optax.tree_utils.tree_get(state, "grad")
    err = jnp.sqrt(jnp.sum(grad * grad))
    stalled = (count > 1) & (f_before - f_last <= ftol * jnp.abs(f_last))
    return (count == 0) | ((count < max_iter) & (err >= tol) & jnp.isfinite(err) & ~stalled)

  inf = jnp.asarray(jnp.inf, x0.dtype)
  x, _, _, _ = jax.lax.while_loop(keep_going, step, (x0, opt.init(x0), inf, inf))
  return x, fun(x)


def _huber_objective_logs(params, log_n, log_d, log_loss, weights, delta):
  """`huber_objective` on precomputed logs (keeps 3 logs per point out of the optimiser's loop)."""
  a, b, e, alpha, beta = (params[i] for i in range(5))
  pred_log = jax.scipy.special.logsumexp(
      jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.broadcast_to(e, log_n.shape)], -1), axis=-1)
  return jnp.sum(weights * huber(pred_log - log_loss, delta))


@functools.partial(jax.jit, static_argnames=("max_linesearch_steps",))
def _solve_many(x0s, n, d, loss, weights, delta, tol, max_iter, max_linesearch_steps):
  log_n, log_d, log_loss = jnp.log(n), jnp.log(d), jnp.log(loss)
  fun = lambda x: _huber_objective_logs(x, log_n, log_d, log_loss, weights, delta)
  return jax.vmap(lambda x0: _lbfgs_solve(fun, x0, max_iter, tol, max_linesearch_steps))(x0s)


def _pad_rows(x, size):
  """Pads the rows of `x` to `size` by repeating its first row (extra results are discarded)."""
  return np.concatenate([x, np.repeat(x[:1], size - x.shape[0], axis=0)]) if x.shape[0] < size else x


def _fit_huber(n, d, loss, delta, init_grid, max_iter, tol, screen_iters, polish_top, chunk):
  """L-BFGS from every start for `screen_iters` iterations, then the `polish_top` best to convergence.

  The data are padded with zero-weight points to a power-of-two length (>= 64), and every chunk of starts to
  `chunk` rows, so repeated fits reuse two compiled programs.
  """
  size = max(64, 1 << (int(n.size) - 1).bit_length())
  pad = lambda x: np.concatenate([x, np.ones(size - x.size)])
  weights = np.concatenate([np.ones(n.size), np.zeros(size - n.size)])
  chunk = min(chunk, init_grid.shape[0])
  with jax.enable_x64(True):
    data = tuple(jnp.asarray(x, jnp.float64) for x in (pad(n), pad(d), pad(loss), weights))
    xs, fs = [], []
    for start in range(0, init_grid.shape[0], chunk):
      rows = init_grid[start:start + chunk]
      x, f = _solve_many(jnp.asarray(_pad_rows(rows, chunk)), *data, delta, tol, screen_iters, 10)
      xs.append(np.asarray(x)[:rows.shape[0]])
      fs.append(np.asarray(f)[:rows.shape[0]])
    xs, fs = np.concatenate(xs), np.concatenate(fs)
    fs = np.where(np.isfinite(fs) & np.all(np.isfinite(xs), axis=1), fs, np.inf)
    top = np.argsort(fs, kind="stable")[:polish_top]
    top = top[np.isfinite(fs[top])]
    if top.size == 0:
      raise RuntimeError("fit_scaling_law(method='huber'): every L-BFGS start diverged")
    x, f = _solve_many(jnp.asarray(_pad_rows(xs[top], polish_top)), *data, delta, tol, max_iter, 10)
    x, f = np.asarray(x)[:top.size], np.asarray(f)[:top.size]
  f = np.where(np.isfinite(f), f, np.inf)
  # polishing never loses a screened optimum: fall back to the screened point if polishing diverged
  i = int(np.argmin(f))
  if not f[i] <= fs[top[0]]:
    return xs[top[0]], float(fs[top[0]])
  return x[i], float(f[i])


def _fit_least_squares(n, d, loss, p0):
  import scipy.optimize  # pylint: disable=import-outside-toplevel

  x = np.stack([n, d])

  def func(x, a, b, e, alpha, beta):
    return np.exp(e) + np.exp(a) / x[0] ** alpha + np.exp(b) / x[1] ** beta

  bounds = ([-np.inf, -np.inf, -np.inf, 0.0, 0.0], [np.inf] * 5)
  try:
    popt, _ = scipy.optimize.curve_fit(func, x, loss, p0=p0, bounds=bounds)
  except RuntimeError:
    popt, _ = scipy.optimize.curve_fit(func, x, loss, p0=p0, bounds=bounds, method="dogbox",
                                       x_scale=np.abs(np.asarray(p0)) + 1e-12)
  sse = float(np.sum((func(x, *popt) - loss) ** 2))
  return np.asarray(popt, np.float64), sse


def fit_scaling_law(n, d, loss, *, method: str = "huber", delta: float = 1e-3, init_grid=None,
                    p0: Sequence[float] = P0_DATABLATIONS, max_iter: int = 1000, tol: float = 1e-12,
                    screen_iters: int = 10, polish_top: int = 32, chunk: int = 1500) -> ScalingLawFit:
  """Fits L(N, D) = E + A / N^alpha + B / D^beta to points (n[i], d[i], loss[i]).

  Args:
    n: parameter count of the model of each point (one point per checkpoint).
    d: training tokens seen at each checkpoint.
    loss: the loss at each checkpoint (nats).
    method: "huber" (Chinchilla Approach 3: summed Huber on log-loss, L-BFGS from a grid of starts) or
      "least_squares" (Hitchhiker's-guide default: scipy curve_fit on raw loss from p0, alpha, beta >= 0).
    delta: Huber threshold (method="huber").
    init_grid: (S, 5) starts (a, b, e, alpha, beta) for method="huber"; default `chinchilla_grid()` (4500).
    p0: the single start of method="least_squares".
    max_iter, tol: L-BFGS iteration cap and gradient-norm tolerance of the final runs (method="huber").
    screen_iters, polish_top: every start first gets `screen_iters` L-BFGS iterations; the `polish_top`
      lowest are then continued to convergence (max_iter, tol). Set screen_iters=max_iter to run all starts
      to convergence as Hoffmann et al. (about 100x slower on CPU, same optimum in our tests).
    chunk: how many starts are vmapped at once (memory bound: chunk x len(n) float64 per evaluation).

  Returns:
    ScalingLawFit; `objective` is the summed Huber loss (huber) or the sum of squared errors (least_squares).

  Raises:
    ValueError: empty/mismatched/non-1-D inputs, NaN or non-positive values, fewer than 5 points, fewer than
      2 distinct model sizes or token counts, or an unknown method.
  """
  if method not in ("huber", "least_squares"):
    raise ValueError(f"fit_scaling_law method must be 'huber' or 'least_squares', got {method!r}")
  if not delta > 0:
    raise ValueError(f"fit_scaling_law delta must be > 0, got {delta}")
  n, d, loss = _check_points(n, d, loss)
  if method == "huber":
    grid = chinchilla_grid() if init_grid is None else np.asarray(init_grid, np.float64)
    if grid.ndim != 2 or grid.shape[1] != 5 or grid.shape[0] == 0:
      raise ValueError(f"fit_scaling_law init_grid must have shape (S, 5) with S >= 1, got {grid.shape}")
    for name, val in (("chunk", chunk), ("screen_iters", screen_iters), ("polish_top", polish_top),
                      ("max_iter", max_iter)):
      if not (isinstance(val, int) and val >= 1):
        raise ValueError(f"fit_scaling_law {name} must be an int >= 1, got {val!r}")
    x, obj = _fit_huber(n, d, loss, delta, grid, max_iter, tol, screen_iters, polish_top, chunk)
  else:
    if len(p0) != 5:
      raise ValueError(f"fit_scaling_law p0 must have 5 values (a, b, e, alpha, beta), got {len(p0)}")
    x, obj = _fit_least_squares(n, d, loss, np.asarray(p0, np.float64))
  return ScalingLawFit(*(float(v) for v in x), method=method, objective=obj, num_points=int(n.size))


# ------------------------------------------------------------------------------------------------ run logs


@dataclasses.dataclass
class RunCurve:
  """The loss curve of one training run: N, and per checkpoint tokens and loss."""
  name: str
  n: float
  tokens: np.ndarray
  loss: np.ndarray
  loss_key: str


def load_run(run_dir: str, n_key: str = "total") -> RunCurve:
  """Reads `<run>/summary.json` (params[n_key], tokens_per_step) and `<run>/metrics.jsonl`.

  Uses eval_loss lines if the run logged any, else train_loss lines; tokens from the `tokens` key, or
  step x tokens_per_step when a line has none. Duplicate token counts keep the last line.
  """
  summary_path = os.path.join(run_dir, "summary.json")
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  for path in (summary_path, metrics_path):
    if not os.path.isfile(path):
      raise ValueError(f"run directory {run_dir!r} has no {os.path.basename(path)}")
  with open(summary_path) as f:
    summary = json.load(f)
  params = summary.get("params", {})
  if n_key not in params:
    raise ValueError(f"{summary_path} has no params[{n_key!r}] (keys: {sorted(params)})")
  n = float(params[n_key])
  tokens_per_step = summary.get("tokens_per_step")
  rows = {"eval_loss": {}, "train_loss": {}}
  with open(metrics_path) as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as err:
        raise ValueError(f"{metrics_path}:{lineno} is not valid JSON: {err}") from None
      for key in rows:
        if key in rec and rec[key] is not None:
          tokens = rec.get("tokens")
          if tokens is None:
            if tokens_per_step is None or "step" not in rec:
              raise ValueError(f"{metrics_path}:{lineno} has neither 'tokens' nor step x tokens_per_step")
            tokens = rec["step"] * tokens_per_step
          rows[key][float(tokens)] = float(rec[key])
  key = "eval_loss" if rows["eval_loss"] else "train_loss"
  if not rows[key]:
    raise ValueError(f"{metrics_path} has no eval_loss or train_loss lines")
  tokens = np.array(sorted(rows[key]))
  loss = np.array([rows[key][t] for t in tokens])
  return RunCurve(os.path.basename(os.path.normpath(run_dir)), n, tokens, loss, key)


def fit_points(runs: Sequence[RunCurve], min_tokens: float = 0.0, min_fraction: float = 0.1,
               max_fraction: float = 1.0):
  """(n, d, loss) of all checkpoints with tokens > max(min_tokens, min_fraction x T_run) and
  tokens <= max_fraction x T_run, where T_run is the run's last logged token count."""
  ns, ds, ls = [], [], []
  for run in runs:
    t_max = run.tokens.max()
    keep = (run.tokens > max(min_tokens, min_fraction * t_max)) & (run.tokens <= max_fraction * t_max) & (
        run.tokens > 0) & np.isfinite(run.loss) & (run.loss > 0)
    ns.append(np.full(keep.sum(), run.n))
    ds.append(run.tokens[keep])
    ls.append(run.loss[keep])
  return np.concatenate(ns), np.concatenate(ds), np.concatenate(ls)


def fit_runs(runs: Sequence[RunCurve], *, methods=("huber", "least_squares"), holdout: bool = True,
             min_tokens: float = 0.0, min_fraction: float = 0.1, target_train_fraction: float = 0.0,
             test_fraction: float = 0.7, **fit_kwargs) -> dict:
  """Fits the law on several runs and, with `holdout`, reports ARE on the largest run's late checkpoints.

  With holdout (the Hitchhiker protocol) the target is the run with the largest N: it contributes only its
  checkpoints below `target_train_fraction` x its final tokens to the fit, and ARE is measured on its
  checkpoints with tokens >= `test_fraction` x its final tokens. Without holdout every run is fitted and the
  in-sample ARE on all fitted points is reported.
  """
  if len(runs) < 2:
    raise ValueError(f"scaling-law fitting needs at least 2 runs of different sizes, got {len(runs)}")
  result = {"runs": [{"name": r.name, "n": r.n, "loss_key": r.loss_key, "num_checkpoints": int(r.tokens.size),
                      "max_tokens": float(r.tokens.max())} for r in runs], "fits": {}}
  if holdout:
    target = max(runs, key=lambda r: r.n)
    others = [r for r in runs if r is not target]
    if len({r.n for r in others}) < 2 and target_train_fraction <= 0:
      raise ValueError(f"hold-out fitting needs at least 2 runs of different sizes besides the largest (target) "
                       f"run, got {len(runs)} runs with sizes {sorted(r.n for r in runs)}; pass holdout=False "
                       f"(--no-holdout) or target_train_fraction > 0")
    n, d, loss = fit_points(others, min_tokens, min_fraction)
    if target_train_fraction > 0:
      tn, td, tl = fit_points([target], min_tokens, min_fraction, target_train_fraction)
      n, d, loss = np.concatenate([n, tn]), np.concatenate([d, td]), np.concatenate([l for l in (loss, tl)])
    t_max = target.tokens.max()
    test = target.tokens >= test_fraction * t_max
    test_d, test_l = target.tokens[test], target.loss[test]
    result["target"] = target.name
  else:
    n, d, loss = fit_points(runs, min_tokens, min_fraction)
  for method in methods:
    fit = fit_scaling_law(n, d, loss, method=method, **fit_kwargs)
    entry = fit.to_dict()
    if holdout:
      entry["are_heldout"] = absolute_relative_error(fit.predict(target.n, test_d), test_l)
      entry["num_test_points"] = int(test_d.size)
    else:
      entry["are_in_sample"] = absolute_relative_error(fit.predict(n, d), loss)
    result["fits"][method] = entry
  return result


def plot_fit(runs: Sequence[RunCurve], result: dict, path: str) -> None:
  """Loss against tokens for every run (points) with each fitted law's curve at that run's N."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.5))
  styles = {"huber": "-", "least_squares": "--"}
  for i, run in enumerate(sorted(runs, key=lambda r: r.n)):
    color = f"C{i % 10}"
    marker = "x" if run.name == result.get("target") else "o"
    ax.scatter(run.tokens, run.loss, s=10, color=color, marker=marker, label=f"{run.name} (N={run.n:.3g})")
    grid = np.geomspace(max(run.tokens.min(), 1.0), run.tokens.max(), 100)
    for method, entry in result["fits"].items():
      fit = ScalingLawFit(**{k: entry[k] for k in ("a", "b", "e", "alpha", "beta", "method", "objective",
                                                   "num_points")})
      ax.plot(grid, fit.predict(run.n, grid), styles.get(method, ":"), color=color, lw=1)
  ax.set_xscale("log")
  ax.set_xlabel("training tokens D")
  ax.set_ylabel(f"loss ({runs[0].loss_key})")
  ax.set_title("L(N, D) = E + A/N^α + B/D^β  (solid: Huber/L-BFGS, dashed: least squares)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
