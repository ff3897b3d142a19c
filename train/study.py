"""The reproduction study: train the methods side by side and write the results table.

    python -m train.study --config=train/configs/study.py:cpu --workdir=runs/study_cpu
    python -m train.study --config=train/configs/study.py:cpu --workdir=runs/study_cpu --config.train.steps=30 \
        --config.only=dense,lost

Claims checked (verdicts in results.md):
* LOST (Li et al., "LOST: Low-rank and Sparse Pre-training for Large Language Models", arXiv 2508.02668): LOST
  reaches the dense model's loss (here: within 2 % eval loss) with about half the linear parameters.
* GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", arXiv 2403.03507):
  pure low-rank pre-training is clearly worse than full rank; GaLore stays close to AdamW (within 2 %) with
  less optimizer state.
* FRUGAL (Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable
  Training", arXiv 2411.07837): FRUGAL (ρ = 0.25) stays close to AdamW (within 2 %) with less optimizer state.

Protocol: sweep, then confirm. The learning rates of every run are swept with the grid's `seeds` (usually one);
the best learning rate of each run is the lowest final eval loss (mean over those seeds). Then the run is trained
`confirm_seeds` more times at that learning rate, with seeds max(seeds)+1, max(seeds)+2, ... — the same seeds for
every run, and a seed fixes both the initialisation and the data order, so runs are compared seed by seed. The
results report the mean ± std and a 95 % Student-t interval of each run's final eval loss over all its seeds at the
best learning rate, and the paired difference to dense with its interval (`train/stats.py`). A verdict holds only
when the whole interval of the paired difference lies on the claim's side of the margin, does not hold when it
lies wholly on the other side, and is inconclusive otherwise (always with one seed). Runs shorter than the grid's
`min_steps` get no verdict: "too short to conclude". The seed at which the learning rate was chosen is part of
the statistics; its value is the minimum over the sweep, a small bias that is the same for every run.

How it runs. A grid (train/configs/study.py) expands into one ordinary `train.main` run per (run, lr, seed) in
`DIR/<run>_lr<lr>[_s<seed>]`, each started as a subprocess (`python -m train.main`): a crash, an out-of-memory
kill or a ValueError of one run is recorded as that run's failure and the study goes on; each run's device memory
is its own (a GPU's peak memory statistics are per process). The run's full config is written to
`<run dir>/study_config.json` and read back by `train/configs/study.py:run=<path>`. A run whose
`study_result.json` says it finished all `train.steps` is skipped on a rerun; any other run is started again, and
`train.main` resumes it from its latest checkpoint (its own resume rules: a changed model/optimizer/data config is
refused, and reported as a failure). A finished run whose config differs from the grid's now (fields added to the
code since count as equal) is handed to `train.main` again as well; use a new DIR for a different study.

Before training, one more subprocess (`python -m train.study --measure=...`) builds each distinct configuration
(learning rate and seed do not change memory) with `train.state.create_train_state`, lowers and compiles the
jitted step with the run's shapes without running it, and records `compiled.memory_analysis()` (arguments +
outputs + temporaries − donated aliases) beside the `--summary_only` estimate and the exact counts
(`train.summary.summarize`). Where the backend has device memory statistics (GPU, TPU), the peak measured by the
training process itself (`peak_bytes_in_use`, printed by train.main) is reported instead, with its source.

Outputs in DIR: `results.csv` (every run and learning rate), `results.md` (best learning rate per run, the full
sweep, the verdicts), `curves.png` (eval and train loss against tokens, best learning rate per run), `lr.png`
(final eval loss against learning rate per run). The best learning rate is marked `edge` when it is the smallest
or largest value swept. This module is a command: no other module of `train/` imports it.
"""

from __future__ import annotations

import ast
import copy
import csv
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import time

from train import stats
from train.cli import did_you_mean

CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "study.py")
STUDY_FIELDS = ("grid", "only", "seeds", "runs")   # required; the optional ones have defaults below
OPTIONAL_FIELDS = {"confirm_seeds": 0, "min_steps": 0, "reference": "dense"}
METHODS = ("dense", "lowrank", "lost", "sltrain")   # linear kinds (CoLA: lowrank with model.lowrank_act=silu)
RESULT_FILE = "study_result.json"
RUN_CONFIG_FILE = "study_config.json"
LOG_FILE = "study.log"
TOLERANCE = 0.02  # "close to" / "within": relative eval-loss difference

CSV_FIELDS = ("name", "run", "method", "optimizer", "lr", "group_mult", "seed", "phase", "status", "best", "edge",
              "final_step", "tokens",
              "eval_loss", "eval_ppl", "eval_bpb", "train_loss", "params_total", "params_non_embedding",
              "params_linear", "opt_state_bytes", "peak_bytes", "peak_source", "estimate_bytes", "tokens_per_s",
              "wall_s", "error")


def lr_tag(lr: float) -> str:
  return f"{float(lr):g}"


# The parameter groups a run's `group_mults` sweep scales together (train/optimizer.py: optim.lr_mult): everything
# but the projection matrices.
MULT_GROUPS = ("embed", "head", "norm")


def setting_tag(r: dict) -> str:
  """A run's swept setting as text: its learning rate, and its group multiplier when one was swept."""
  m = r.get("group_mult")
  return lr_tag(r["lr"]) + ("" if m is None else f" ×{m:g}")


def _group_mults(name: str, r: dict) -> list:
  """The run's `group_mults` (the learning-rate multipliers of the embedding, head and norms swept together with
  the learning rate), or [None] when it sweeps the learning rate only."""
  mults = r.get("group_mults")
  if mults is None:
    return [None]
  if (not isinstance(mults, (list, tuple)) or not mults
      or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in mults)):
    raise ValueError(f"runs.{name}.group_mults={mults!r} must be a non-empty list of positive numbers")
  clash = [k for k, _ in parse_set(r.get("set", "")) if k.startswith("optim.lr_mult.")]
  if clash:
    raise ValueError(f"runs.{name}: set assigns {clash[0]} and group_mults sweeps it; use one of the two")
  return [float(x) for x in mults]


def parse_set(text: str) -> list[tuple[str, object]]:
  """'optim.frugal.rho=0.25 optim.name=frugal' -> [('optim.frugal.rho', 0.25), ('optim.name', 'frugal')]."""
  out = []
  for item in (text or "").split():
    if "=" not in item:
      raise ValueError(f"bad run field assignment {item!r}: expected 'section.field=value'")
    key, raw = item.split("=", 1)
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    out.append((key, value))
  return out


def _assign(d: dict, key: str, value, where: str) -> None:
  parts = key.split(".")
  node = d
  for i, p in enumerate(parts):
    if not isinstance(node, dict) or p not in node or (i < len(parts) - 1 and not isinstance(node[p], dict)):
      prefix = ".".join(parts[:i])
      hint = did_you_mean(p, node, prefix=f"{prefix}." if prefix else "") if isinstance(node, dict) else ""
      raise ValueError(f"{where}: unknown config field {key!r}{hint}")
    if i < len(parts) - 1:
      node = node[p]
  node[parts[-1]] = value


def _run_names(runs: dict) -> list[str]:
  from train.configs.study import RUNS
  return [n for n in RUNS if n in runs] + sorted(n for n in runs if n not in RUNS)


def expand(cfg) -> list[dict]:
  """The grid's runs: dicts with name, run, method, optimizer, lr, seed and the full run config (a plain dict)."""
  d = cfg.to_dict()
  for f in STUDY_FIELDS:
    if f not in d:
      raise ValueError(f"not a study config: field {f!r} missing (use --config=train/configs/study.py:<grid>)")
  shared = {k: v for k, v in d.items() if k not in STUDY_FIELDS and k not in OPTIONAL_FIELDS}
  runs = d["runs"]
  only = [s.strip() for s in str(d["only"] or "").split(",") if s.strip()]
  unknown = [n for n in only if n not in runs]
  if unknown:
    raise ValueError(f"only={d['only']!r}: unknown run {unknown[0]!r} (runs: {', '.join(_run_names(runs))})"
                     f"{did_you_mean(unknown[0], runs.keys())}")
  seeds = list(d["seeds"])
  if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
    raise ValueError(f"seeds={d['seeds']!r} must be a non-empty list of ints")
  out = []
  for name in _run_names(runs):
    if only and name not in only:
      continue
    r = runs[name]
    lrs = list(r.get("lrs", ()))
    if not lrs or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in lrs):
      raise ValueError(f"runs.{name}.lrs={r.get('lrs')!r} must be a non-empty list of positive numbers")
    if r.get("method") not in METHODS:
      raise ValueError(f"runs.{name}.method={r.get('method')!r}: expected one of {', '.join(METHODS)}")
    for mult in _group_mults(name, r):
      for lr in lrs:
        for seed in seeds:
          out.append(_spec(shared, name, r, lr, seed, "sweep", mult))
  if not out:
    raise ValueError("the study selects no runs")
  return out


def _spec(shared: dict, name: str, r: dict, lr: float, seed: int, phase: str, mult: float | None = None) -> dict:
  """One run: the shared config with the run's fields, learning rate, seed and (if swept) group multiplier. The
  directory is `<run>_lr<lr>[_m<mult>][_s<seed>]`; a multiplier of 1 (the default) adds no `_m`, so a run that
  starts sweeping multipliers keeps its finished runs."""
  c = copy.deepcopy(shared)
  c["model"]["attn_kind"] = c["model"]["mlp_kind"] = r["method"]
  c["optim"]["name"] = r["optimizer"]
  for key, value in parse_set(r.get("set", "")):
    _assign(c, key, value, f"runs.{name}.set")
  c["optim"]["lr"] = float(lr)
  if mult is not None:
    c["optim"]["lr_mult"] = {**c["optim"].get("lr_mult", {}), **{g: float(mult) for g in MULT_GROUPS}}
  c["train"]["seed"] = int(seed)
  run_name = (f"{name}_lr{lr_tag(lr)}" + (f"_m{lr_tag(mult)}" if mult not in (None, 1.0) else "")
              + (f"_s{seed}" if seed != 0 else ""))
  return {"name": run_name, "run": name, "method": r["method"], "optimizer": c["optim"]["name"], "lr": float(lr),
          "group_mult": mult, "seed": int(seed), "phase": phase, "config": c}


def study_option(cfg, field: str) -> int:
  """An optional study field (`confirm_seeds`, `min_steps`): a non-negative int, its default when absent."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  v = d.get(field, OPTIONAL_FIELDS[field])
  if field == "reference":
    if v not in d["runs"]:
      raise ValueError(f"reference={v!r} is not a run of the grid; runs: {_run_names(d['runs'])}")
    return v
  if isinstance(v, bool) or not isinstance(v, int) or v < 0:
    raise ValueError(f"{field}={v!r} must be a non-negative int")
  return v


def confirm_seeds(cfg) -> list[int]:
  """The seeds of the confirmation phase: max(seeds)+1 ... max(seeds)+confirm_seeds."""
  n = study_option(cfg, "confirm_seeds")
  top = max(int(s) for s in cfg.to_dict()["seeds"])
  return list(range(top + 1, top + 1 + n))


def expand_confirm(cfg, best: dict) -> list[dict]:
  """The confirmation runs: every run that has a best learning rate, once per confirm seed at that rate."""
  d = cfg.to_dict()
  shared = {k: v for k, v in d.items() if k not in STUDY_FIELDS and k not in OPTIONAL_FIELDS}
  seeds = confirm_seeds(cfg)
  only = [x.strip() for x in str(d["only"] or "").split(",") if x.strip()]
  out = []
  for name in _run_names(d["runs"]):
    if name in best and (not only or name in only):
      out += [_spec(shared, name, d["runs"][name], best[name]["lr"], seed, "confirm", best[name].get("group_mult"))
              for seed in seeds]
  return out


def _memory_key(config: dict) -> str:
  c = copy.deepcopy(config)
  c["optim"]["lr"] = 0.0
  c["train"]["seed"] = 0
  c["train"]["stop_at"] = 0
  return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _to_configdict(config: dict):
  import ml_collections
  return ml_collections.ConfigDict(config)


# ----------------------------------------------------------------------------------------------- measurement child

def measure_one(config: dict) -> dict:
  """Counts, optimizer state and the `--summary_only` estimate, and the compiled step's memory analysis."""
  import jax
  from train import state as state_lib
  from train import summary as summary_lib

  cfg = _to_configdict(config)
  s = summary_lib.summarize(cfg)
  out = {"params": s["params"], "opt_state_bytes": s["optimizer"]["state_bytes"],
         "estimate_bytes": s["memory_estimate_per_device_bytes"]["total"]}
  mesh = state_lib.make_mesh(cfg)
  state_lib.validate_config(cfg, mesh, vocab_size=s["model"]["vocab_size"])
  m = state_lib.compiled_memory(cfg, mesh=mesh, vocab_size=s["model"]["vocab_size"])
  out["memory_analysis"] = {"argument_size_in_bytes": m["argument"], "output_size_in_bytes": m["output"],
                            "temp_size_in_bytes": m["temp"], "alias_size_in_bytes": m["alias"]}
  out["compiled_peak_bytes"] = m["total"]
  out["backend"] = jax.default_backend()
  return out


def measure_main(paths: list[str]) -> None:
  for p in paths:
    with open(p) as f:
      job = json.load(f)
    try:
      res = measure_one(job["config"])
    except Exception as e:  # recorded for this configuration; the study goes on  # noqa: BLE001
      res = {"error": f"{type(e).__name__}: {e}"}
    with open(job["out"], "w") as f:
      json.dump(res, f, indent=1)


def _measure_all(specs: list[dict], workdir: str, log) -> dict:
  """key -> measurement, computed once per distinct configuration in one subprocess, cached in DIR/_memory."""
  mdir = os.path.join(workdir, "_memory")
  os.makedirs(mdir, exist_ok=True)
  jobs, seen = [], set()
  for s in specs:
    k = _memory_key(s["config"])
    out = os.path.join(mdir, f"{k}.json")
    if k in seen or os.path.exists(out):
      continue
    seen.add(k)
    job = os.path.join(mdir, f"{k}.job.json")
    with open(job, "w") as f:
      json.dump({"config": s["config"], "out": out}, f)
    jobs.append(job)
  if jobs:
    log(f"measuring memory of {len(jobs)} configuration(s)")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    with open(os.path.join(mdir, "measure.log"), "a") as lf:
      subprocess.run([sys.executable, "-m", "train.study", "--measure=" + ",".join(jobs)], stdout=lf,
                     stderr=subprocess.STDOUT, env=env, cwd=_repo_root())
  res = {}
  for s in specs:
    k = _memory_key(s["config"])
    p = os.path.join(mdir, f"{k}.json")
    if os.path.exists(p):
      with open(p) as f:
        res[k] = json.load(f)
    else:
      res[k] = {"error": "memory measurement did not finish (see _memory/measure.log)"}
  return res


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------------ one run

def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _same_config(old, new, path="") -> bool:
  """True when `old` (a stored run config) equals `new`, reading fields added to the code since as equal."""
  if isinstance(new, dict):
    if not isinstance(old, dict):
      return False
    return all(k not in old or _same_config(old[k], v, f"{path}{k}.") for k, v in new.items()
               if f"{path}{k}" != "train.stop_at")
  return old == new


def is_finished(rdir: str, config: dict) -> bool:
  """A run is skipped when it finished all train.steps with this same config (a changed one is run again)."""
  r = _read_json(os.path.join(rdir, RESULT_FILE))
  stored = _read_json(os.path.join(rdir, RUN_CONFIG_FILE))
  if not r or r.get("status") != "ok" or r.get("final_step", 0) < config["train"]["steps"] or stored is None:
    return False
  return _same_config(stored, json.loads(json.dumps(config)))


def _last_json_line(text: str) -> dict:
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{") and line.endswith("}"):
      try:
        return json.loads(line)
      except ValueError:
        continue
  return {}


def _error_line(text: str) -> str:
  lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
  for ln in reversed(lines):
    if ln.startswith("error:"):
      return ln[len("error:"):].strip()
  return lines[-1] if lines else ""


def train_run(spec: dict, rdir: str) -> dict:
  """Starts (or resumes) one run as `python -m train.main`; writes and returns its study_result.json."""
  os.makedirs(rdir, exist_ok=True)
  cpath = os.path.join(rdir, RUN_CONFIG_FILE)
  with open(cpath, "w") as f:
    json.dump(spec["config"], f, indent=1)
  prev = _read_json(os.path.join(rdir, RESULT_FILE)) or {}
  cmd = [sys.executable, "-m", "train.main", f"--config={CONFIG_FILE}:run={os.path.abspath(cpath)}",
         f"--workdir={os.path.abspath(rdir)}"]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_repo_root())
  wall = time.perf_counter() - t0
  with open(os.path.join(rdir, LOG_FILE), "a") as f:
    f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n[exit {proc.returncode} after {wall:.1f} s]\n")
  final = _last_json_line(proc.stdout) if proc.returncode == 0 else {}
  steps = spec["config"]["train"]["steps"]
  res = {"wall_s": prev.get("wall_s", 0.0) + wall, "returncode": proc.returncode}
  if proc.returncode != 0:
    res.update(status="failed", error=_error_line(proc.stderr) or f"exit code {proc.returncode}")
  elif final.get("final_step", 0) < steps:
    res.update(status="interrupted", final_step=final.get("final_step", 0))
  else:
    res.update(status="ok", final_step=final["final_step"])
  if "peak_bytes_in_use" in final:
    res["peak_bytes_in_use"] = int(final["peak_bytes_in_use"])
  with open(os.path.join(rdir, RESULT_FILE), "w") as f:
    json.dump(res, f, indent=1)
  return res


def read_metrics(rdir: str) -> tuple[dict, dict, list]:
  """(train loss by tokens, eval rows by tokens, tokens_per_s values); the last value per step wins."""
  train, evals, speed = {}, {}, {}
  path = os.path.join(rdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}, {}, []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if "train_loss" in row:
        train[row["tokens"]] = row["train_loss"]
        speed[row["step"]] = row.get("tokens_per_s")
      if "eval_loss" in row:
        evals[row["tokens"]] = row
  steps = sorted(speed)
  tps = [speed[s] for s in steps[1:] if speed[s]]  # the first log interval includes compilation
  return train, evals, tps


def _median(xs):
  xs = sorted(xs)
  if not xs:
    return None
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def collect_row(spec: dict, rdir: str, result: dict, mem: dict) -> dict:
  train, evals, tps = read_metrics(rdir)
  last_eval = evals[max(evals)] if evals else {}
  params = mem.get("params", {})
  peak, source = None, ""
  if result.get("peak_bytes_in_use"):
    peak, source = result["peak_bytes_in_use"], "device memory_stats"
  elif mem.get("compiled_peak_bytes") is not None:
    peak, source = mem["compiled_peak_bytes"], "compiled memory_analysis"
  status = result.get("status", "not run")
  return {
      "name": spec["name"], "run": spec["run"], "method": spec["method"], "optimizer": spec["optimizer"],
      "lr": spec["lr"], "group_mult": spec.get("group_mult"), "seed": spec["seed"],
      "phase": spec.get("phase", "sweep"), "status": status, "best": False, "edge": False,
      "final_step": result.get("final_step", max(train) // _tokens_per_step(spec) if train else 0),
      "tokens": max(train) if train else 0,
      "eval_loss": last_eval.get("eval_loss"), "eval_ppl": last_eval.get("eval_ppl"),
      "eval_bpb": last_eval.get("eval_bpb"), "train_loss": train[max(train)] if train else None,
      "params_total": params.get("total"), "params_non_embedding": params.get("non_embedding"),
      "params_linear": params.get("linear"), "opt_state_bytes": mem.get("opt_state_bytes"),
      "peak_bytes": peak, "peak_source": source, "estimate_bytes": mem.get("estimate_bytes"),
      "tokens_per_s": _median(tps), "wall_s": result.get("wall_s"),
      "error": result.get("error", "") or mem.get("error", ""),
      "_train": train, "_eval": {k: v["eval_loss"] for k, v in evals.items()},
  }


def _tokens_per_step(spec):
  t = spec["config"]["train"]
  return t["global_batch"] * t["seq_len"]


# ------------------------------------------------------------------------------------------------------ results

def _ok(row) -> bool:
  return row["status"] == "ok" and row["eval_loss"] is not None and math.isfinite(row["eval_loss"])


def pick_best(rows: list[dict]) -> dict:
  """run -> its best row; marks best and edge in place.

  The best setting (learning rate, and group multiplier where the run sweeps one) is the lowest final eval loss
  averaged over the sweep seeds (rows of phase "sweep"); confirmation rows at that setting join its statistics:
  `losses` (seed -> final eval loss, every seed at the best setting), `eval_loss_mean` and `interval`
  (`train.stats.t_interval` of those losses). `edge`: the best learning rate is the smallest or largest swept at
  the best multiplier, or the best multiplier is the smallest or largest swept.
  """
  best = {}
  by_run: dict = {}
  for r in rows:
    by_run.setdefault(r["run"], []).append(r)
  for run, rs in by_run.items():
    sweep = [r for r in rs if r.get("phase", "sweep") == "sweep"]
    key = lambda r: (r["lr"], r.get("group_mult"))  # noqa: E731
    means = {}
    for k in sorted({key(r) for r in sweep}, key=lambda k: (k[0], k[1] or 0.0)):
      ok = [r["eval_loss"] for r in sweep if key(r) == k and _ok(r)]
      if ok:
        means[k] = sum(ok) / len(ok)
    if not means:
      continue
    lr, mult = min(means, key=means.get)
    lrs = sorted({r["lr"] for r in sweep if r.get("group_mult") == mult})
    mults = sorted({r.get("group_mult") or 0.0 for r in sweep})
    edge = ((len(lrs) > 1 and lr in (lrs[0], lrs[-1]))
            or (mult is not None and len(mults) > 1 and mult in (mults[0], mults[-1])))
    chosen = [r for r in rs if key(r) == (lr, mult) and _ok(r)]
    for r in chosen:
      r["best"], r["edge"] = True, edge
    losses = {r["seed"]: r["eval_loss"] for r in chosen}
    iv = stats.t_interval(list(losses.values()))
    drops = [d for d in (tail_drop(r.get("_eval") or {}) for r in chosen) if d is not None]
    best[run] = dict(min(chosen, key=lambda r: r["eval_loss"]), eval_loss_mean=iv["mean"], losses=losses,
                     interval=iv, sweep_mean=means[(lr, mult)], tail_drop=sum(drops) / len(drops) if drops else None)
  return best


def tail_drop(evals: dict, frac: float = 0.25) -> float | None:
  """How much the eval loss still fell over the last `frac` of training: (L(t₀) − L_final) / L_final, where t₀ is
  the evaluation closest to (1 − frac) of the final token count (`evals`: tokens -> eval loss). A capacity-bound
  run has flattened when this is small; None without an evaluation before the final one."""
  if len(evals) < 2:
    return None
  final = max(evals)
  earlier = [t for t in evals if t < final]
  t0 = min(earlier, key=lambda t: abs(t - (1.0 - frac) * final))
  return (evals[t0] - evals[final]) / evals[final]


def _losses(b: dict) -> dict:
  return b.get("losses") or {b.get("seed", 0): b["eval_loss_mean"]}


def _margin(iv) -> float:
  return TOLERANCE * iv["ref_mean"] if iv else 0.0


def _diff_text(name: str, ref: str, iv: dict | None) -> str:
  if iv is None:
    return f"{name} and {ref} share no seed"
  rel = iv["mean"] / iv["ref_mean"]
  word = "lower" if iv["mean"] < 0 else "higher"
  text = f"{name} {abs(rel):.1%} {word} than {ref} ({iv['mean']:+.4f} nats"
  if iv["lo"] is None:
    return text + f", n = {iv['n']} seed: no interval)"
  return text + (f", 95 % CI [{iv['lo'] / iv['ref_mean']:+.1%}, {iv['hi'] / iv['ref_mean']:+.1%}], "
                 f"n = {iv['n']} seeds)")


def verdicts(best: dict, steps: int | None = None, min_steps: int = 0) -> list[tuple[str, str, str]]:
  """(claim, verdict, numbers) for each ordering the papers claim; verdict is one of `train.stats`' HOLDS, FAILS,
  INCONCLUSIVE, NOT_MEASURED.

  Each claim compares paired differences over shared seeds (`train.stats.paired`) with a margin of TOLERANCE
  times the reference's mean loss: "A at most 2 % worse than B" holds when the whole 95 % interval of A − B lies
  at or below the margin, fails when it lies wholly above; "A more than 2 % worse than B" the other way round.
  Runs of fewer than `min_steps` steps get INCONCLUSIVE with "too short to conclude".
  """
  tol = TOLERANCE
  out = []
  short = steps is not None and steps < min_steps

  def finish(claim, verdict, detail):
    if short and verdict != stats.NOT_MEASURED:
      verdict, detail = stats.INCONCLUSIVE, f"too short to conclude ({steps} steps < min_steps {min_steps}); {detail}"
    out.append((claim, verdict, detail))

  def pair(a, b):
    return stats.paired(_losses(best[a]), _losses(best[b]))

  claim = (f"LOST no more than {tol:.0%} worse than dense (final eval loss) with at most 0.6× its linear "
           f"parameters (LOST paper)")
  if "dense" not in best or "lost" not in best:
    finish(claim, stats.NOT_MEASURED, "dense or lost not measured")
  else:
    iv = pair("lost", "dense")
    lost_p, dense_p = best["lost"]["params_linear"], best["dense"]["params_linear"]
    if lost_p and dense_p:
      ratio = lost_p / dense_p
      size, size_text = (stats.HOLDS if ratio <= 0.6 else stats.FAILS), f"linear parameters {ratio:.2f}× dense"
    else:   # a failed memory measurement: the size half of the claim is unknown
      size, size_text = stats.NOT_MEASURED, "linear parameters not measured"
    v = stats.all_of([stats.at_most(iv, _margin(iv)), size])
    finish(claim, v, _diff_text("LOST", "dense", iv) + f"; {size_text}")
  claim = f"low-rank clearly worse: more than {tol:.0%} higher eval loss than dense and than LOST (GaLore, LOST papers)"
  if "lowrank" not in best or "dense" not in best:
    finish(claim, stats.NOT_MEASURED, "lowrank or dense not measured")
  else:
    refs = [(n, label) for n, label in (("dense", "dense"), ("lost", "LOST")) if n in best]
    ivs = [(label, pair("lowrank", n)) for n, label in refs]
    v = stats.all_of(stats.above(iv, _margin(iv)) for _, iv in ivs)
    finish(claim, v, "; ".join(_diff_text("low-rank", label, iv) for label, iv in ivs))
  for name, label, paper in (("dense_galore", "GaLore", "GaLore paper"), ("dense_frugal", "FRUGAL ρ=0.25",
                                                                          "FRUGAL paper")):
    claim = f"{label} no more than {tol:.0%} worse than AdamW (final eval loss) with less optimizer state ({paper})"
    if name not in best or "dense" not in best:
      finish(claim, stats.NOT_MEASURED, f"{name} or dense not measured")
      continue
    iv = pair(name, "dense")
    s, sd = best[name]["opt_state_bytes"], best["dense"]["opt_state_bytes"]
    less = stats.HOLDS if s is not None and sd is not None and s < sd else stats.FAILS
    v = stats.all_of([stats.at_most(iv, _margin(iv)), less])
    finish(claim, v, _diff_text(label, "AdamW", iv) + f"; optimizer state {_mib(s)} vs {_mib(sd)}")
  return out


# The LOST paper's ablation findings that a run of the `ablate` grid can check: variant -> (the paper's statement,
# the test applied to the paired difference variant − LOST over seeds: "same" = within ±TOLERANCE, "at_most" = at
# most TOLERANCE worse). The other variants have no reported value to compare with; they are measured only.
ABLATION_CLAIMS = {
    "lost_score_l1": ("L1 and L2 channel scores do not differ significantly (60M: SVD_l1^rem 32.33 vs SVD_l2^rem "
                      "32.25 ppl)", "same"),
    "lost_score_random": ("the channel-selection strategies do not differ significantly", "same"),
    "lost_gamma90": ("a mostly low-rank LOST, γ = 0.9, still trains well (130M: 24.51 ppl)", "at_most"),
}
AGREES, DISAGREES = "agrees", "disagrees"


def ablation_findings(best: dict, ref: str = "lost") -> list[dict]:
  """One row per ablation variant measured beside `ref` (run names starting with 'lost_'): the paired difference
  variant − ref over shared seeds (`train.stats.paired`), and, where the LOST paper reports a finding
  (ABLATION_CLAIMS), whether the measurement agrees, disagrees or is inconclusive at the TOLERANCE margin:
  "same" agrees when the whole 95 % interval lies within ±TOLERANCE of the reference's mean loss and disagrees
  when it lies wholly beyond one side; "at_most" agrees when the whole interval is at or below +TOLERANCE and
  disagrees when it is wholly above."""
  out = []
  if ref not in best:
    return out
  for name in best:
    if name == ref or not name.startswith("lost_"):
      continue
    iv = stats.paired(_losses(best[name]), _losses(best[ref]))
    paper, test = ABLATION_CLAIMS.get(name, ("", ""))
    if test:
      v = (stats.within if test == "same" else stats.at_most)(iv, _margin(iv))
      here = {stats.HOLDS: AGREES, stats.FAILS: DISAGREES}.get(v, v)
    else:
      here = "–"
    out.append({"run": name, "interval": iv, "paper": paper, "verdict": here,
                "params_linear": best[name].get("params_linear"), "ref_params_linear": best[ref].get("params_linear")})
  return out


def differences(best: dict, ref: str = "dense") -> list[tuple[str, dict]]:
  """(run, paired interval of run − ref over shared seeds) for every other run with a best learning rate."""
  if ref not in best:
    return []
  return [(run, stats.paired(_losses(b), _losses(best[ref]))) for run, b in best.items() if run != ref]


def _mib(b):
  return "–" if b is None else f"{b / 2 ** 20:.2f} MiB"


def _fmt(v, nd=4):
  if v is None:
    return "–"
  if isinstance(v, float):
    return f"{v:.{nd}f}" if math.isfinite(v) else str(v)
  return str(v)


def write_csv(rows: list[dict], path: str) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def markdown(rows: list[dict], best: dict, verdict_list, header: str = "", reference: str = "dense") -> str:
  buf = io.StringIO()
  if header:
    buf.write(header.rstrip() + "\n\n")
  buf.write("### Best learning rate per run\n\n")
  buf.write("| run | optimizer | lr | eval loss | ppl | bpb | params total | non-emb. | linear | opt. state | "
            "peak memory | estimate | tokens/s | wall s | status |\n")
  buf.write("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
  order = []
  for r in rows:
    if r["run"] not in order:
      order.append(r["run"])
  for run in order:
    if run in best:
      r = best[run]
      lr = setting_tag(r) + (" (edge)" if r["edge"] else "")
      status = "ok"
    else:
      first = next(x for x in rows if x["run"] == run)
      r = {k: first[k] for k in ("optimizer", "params_total", "params_non_embedding", "params_linear",
                                 "opt_state_bytes", "peak_bytes", "peak_source", "estimate_bytes")}
      r.update(eval_loss=None, eval_ppl=None, eval_bpb=None, tokens_per_s=None, wall_s=None)
      lr, status = "–", "; ".join(sorted({f"{x['name']}: {x['status']}" + (f" ({x['error']})" if x["error"] else "")
                                          for x in rows if x["run"] == run}))
    peak = _mib(r["peak_bytes"]) + (" (device)" if r["peak_source"] == "device memory_stats" else "")
    buf.write(f"| {run} | {r['optimizer']} | {lr} | {_fmt(r['eval_loss'])} | {_fmt(r['eval_ppl'], 2)} | "
              f"{_fmt(r['eval_bpb'])} | {_fmt(r['params_total'])} | {_fmt(r['params_non_embedding'])} | "
              f"{_fmt(r['params_linear'])} | {_mib(r['opt_state_bytes'])} | {peak} | {_mib(r['estimate_bytes'])} "
              f"| {_fmt(r['tokens_per_s'], 0)} | {_fmt(r['wall_s'], 1)} | {status} |\n")
  buf.write("\nPeak memory: the compiled step's `memory_analysis()` (arguments + outputs + temporaries − donated "
            "aliases), or the training process's device `peak_bytes_in_use` where marked (device); estimate: "
            "`--summary_only`. `edge`: the best learning rate is the smallest or largest swept. `×m`: the "
            "embedding, head and norms trained at m times the learning rate (the best of the run's swept "
            "`group_mults`).\n\n")
  buf.write("### Final eval loss over seeds at the best learning rate\n\n")
  buf.write(f"| run | lr | seeds | mean ± std | 95 % interval | per seed | vs {reference} (paired, same seeds) | "
            "95 % interval of the difference | still falling: last ¼ |\n|---|---|---|---|---|---|---|---|---|\n")
  diffs = dict(differences(best, reference))
  for run in order:
    if run not in best:
      continue
    b = best[run]
    iv = b.get("interval") or stats.t_interval([b["eval_loss_mean"]])
    ms = f"{iv['mean']:.4f}" + (f" ± {iv['std']:.4f}" if iv["std"] is not None else "")
    ci = f"[{iv['lo']:.4f}, {iv['hi']:.4f}]" if iv["lo"] is not None else "– (one seed)"
    per = ", ".join(f"{seed}: {loss:.4f}" for seed, loss in sorted(_losses(b).items()))
    d = diffs.get(run)
    if run == reference or d is None:
      dtxt, dci = ("reference", "–") if run == reference else ("–", "–")
    else:
      dtxt = f"{d['mean']:+.4f} ({d['mean'] / d['ref_mean']:+.1%})"
      dci = ("– (one seed)" if d["lo"] is None else
             f"[{d['lo']:+.4f}, {d['hi']:+.4f}] ([{d['lo'] / d['ref_mean']:+.1%}, {d['hi'] / d['ref_mean']:+.1%}])")
    tail = "–" if b.get("tail_drop") is None else f"{b['tail_drop']:.1%}"
    buf.write(f"| {run} | {setting_tag(b)} | {iv['n']} | {ms} | {ci} | {per} | {dtxt} | {dci} | {tail} |\n")
  buf.write("\nStudent-t intervals (`train/stats.py`): mean ± t·s/√n over the seeds at the best learning rate; the "
            f"difference to {reference} is taken seed by seed (same seed: same initialisation stream and data order). "
            "Still falling: how much lower the final eval loss is than the evaluation at ¾ of the tokens, "
            "(L(¾) − L_final) / L_final, mean over the seeds (small: the curve has flattened).\n\n")
  buf.write(f"### Verdicts\n\nMargin {TOLERANCE:.0%} of the reference's mean loss; a claim holds only when the "
            "whole 95 % interval of the paired difference is on its side of the margin, does not hold when the whole "
            "interval is on the other side, and is inconclusive otherwise (always with a single seed).\n\n")
  if any(d.startswith("too short to conclude") for _, _, d in verdict_list):
    buf.write("**Warning: these runs are too short to conclude anything; every verdict is inconclusive.**\n\n")
  for claim, verdict, detail in verdict_list:
    mark = {stats.HOLDS: "**holds**", stats.FAILS: "**does not hold**", stats.INCONCLUSIVE: "**inconclusive**",
            stats.NOT_MEASURED: "not measured"}[verdict]
    buf.write(f"* {claim}: {mark} — {detail}\n")
  findings = ablation_findings(best, reference) if reference == "lost" else []
  if findings:
    buf.write(f"\n### Ablations against the LOST paper\n\nEach variant against {reference} (paired over the same "
              f"seeds); a reported finding agrees or disagrees only when the whole 95 % interval is on one side of "
              f"the {TOLERANCE:.0%} margin, and is inconclusive otherwise.\n\n| variant | linear params | vs {reference} "
              f"| 95 % interval | paper | here |\n|---|---|---|---|---|---|\n")
    for f in findings:
      iv = f["interval"]
      if iv is None:
        d, ci = "no shared seed", "–"
      else:
        d = f"{iv['mean']:+.4f} ({iv['mean'] / iv['ref_mean']:+.1%})"
        ci = ("– (one seed)" if iv["lo"] is None else
              f"[{iv['lo'] / iv['ref_mean']:+.1%}, {iv['hi'] / iv['ref_mean']:+.1%}]")
      verdict = f"**{f['verdict']}**" if f["verdict"] in (AGREES, DISAGREES) else f["verdict"]
      buf.write(f"| {f['run']} | {_fmt(f['params_linear'])} | {d} | {ci} | {f['paper'] or '–'} | {verdict} |\n")
    buf.write("\nFigure: `ablations.png` (each variant's difference with its interval and the margin).\n")
  buf.write("\n### All runs (learning-rate sweep, then confirmation seeds)\n\n| run dir | lr | seed | phase | status "
            "| step | eval loss | bpb | tokens/s | wall s |\n|---|---|---|---|---|---|---|---|---|---|\n")
  for r in rows:
    st = r["status"] + (" ★" if r["best"] else "") + (f" ({r['error']})" if r["error"] else "")
    buf.write(f"| {r['name']} | {setting_tag(r)} | {r['seed']} | {r.get('phase', 'sweep')} | {st} | "
              f"{r['final_step']} | "
              f"{_fmt(r['eval_loss'])} | {_fmt(r['eval_bpb'])} | {_fmt(r['tokens_per_s'], 0)} | "
              f"{_fmt(r['wall_s'], 1)} |\n")
  buf.write("\nFigures: `curves.png` (eval and train loss against tokens at the best learning rate per run, every "
            "seed: the thin lines), `lr.png` "
            "(final eval loss against learning rate).\n")
  return buf.getvalue()


def plot(rows: list[dict], best: dict, workdir: str, prefix: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for run, r in best.items():
    ev, tr = r["_eval"], r["_train"]
    seeds = [x for x in rows if x["run"] == run and x["best"] and x["seed"] != r["seed"] and x["_eval"]]
    label = f"{run} (lr {setting_tag(r)}" + (f", {len(seeds) + 1} seeds)" if seeds else ")")
    line, = ax1.plot(sorted(ev), [ev[k] for k in sorted(ev)], "o-", label=label)
    ax2.plot(sorted(tr), [tr[k] for k in sorted(tr)], color=line.get_color(), label=label)
    for x in seeds:   # the other seeds at the best learning rate, thin
      ax1.plot(sorted(x["_eval"]), [x["_eval"][k] for k in sorted(x["_eval"])], "-", lw=0.8, alpha=0.6,
               color=line.get_color())
      ax2.plot(sorted(x["_train"]), [x["_train"][k] for k in sorted(x["_train"])], "-", lw=0.5, alpha=0.5,
               color=line.get_color())
  for ax, title in ((ax1, "eval loss"), (ax2, "train loss")):
    ax.set_xlabel("tokens")
    ax.set_ylabel(f"{title} (nats/token)")
    ax.grid(alpha=0.3)
  if best:
    ax1.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, prefix + "curves.png"), dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  runs = []
  for r in rows:
    if r["run"] not in runs:
      runs.append(r["run"])
  for run in runs:
    pts = sorted((r["lr"], r["eval_loss"]) for r in rows if r["run"] == run and _ok(r))
    if not pts:
      continue
    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=run)
    if run in best:
      ax.plot([best[run]["lr"]], [best[run]["eval_loss_mean"]], "*", ms=14, color=line.get_color())
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("final eval loss (nats/token)")
  ax.grid(alpha=0.3)
  if best:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, prefix + "lr.png"), dpi=100)
  plt.close(fig)


def plot_ablations(findings: list[dict], workdir: str, ref: str = "lost", prefix: str = "") -> str | None:
  """`ablations.png`: each variant's paired difference to `ref` in % of ref's mean loss, with its 95 % interval
  (a point without a bar: one seed) and the ±TOLERANCE margin; returns the path, or None without findings."""
  pts = [(f["run"], f["interval"]) for f in findings if f["interval"] is not None]
  if not pts:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 0.35 * len(pts) + 1.2))
  for i, (name, iv) in enumerate(reversed(pts)):
    m = 100 * iv["mean"] / iv["ref_mean"]
    if iv["lo"] is None:
      ax.plot([m], [i], "o", color="C0")
    else:
      lo, hi = 100 * iv["lo"] / iv["ref_mean"], 100 * iv["hi"] / iv["ref_mean"]
      ax.errorbar([m], [i], xerr=[[m - lo], [hi - m]], fmt="o", color="C0", capsize=3)
  ax.set_yticks(range(len(pts)), [name for name, _ in reversed(pts)], fontsize=8)
  ax.axvline(0.0, color="k", lw=0.8)
  for x in (-100 * TOLERANCE, 100 * TOLERANCE):
    ax.axvline(x, color="gray", ls="--", lw=0.8)
  ax.set_xlabel(f"final eval loss − {ref}'s, % of {ref}'s (paired over seeds; 95 % interval)")
  ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  path = os.path.join(workdir, prefix + "ablations.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _train_all(specs: list[dict], workdir: str, jobs: int, log, done: int, total: int) -> list[dict]:
  """Trains (or skips) `specs`, `jobs` subprocesses at a time; returns their results in the order of `specs`."""
  import concurrent.futures

  def one(i_spec):
    i, spec = i_spec
    rdir = os.path.join(workdir, spec["name"])
    tag = f"[{done + i + 1}/{total}] {spec['name']}"
    if is_finished(rdir, spec["config"]):
      log(f"{tag}: finished, skipped")
      return _read_json(os.path.join(rdir, RESULT_FILE))
    log(f"{tag}: training")
    result = train_run(spec, rdir)
    err = f" {result['error']}" if result.get("error") else ""
    log(f"{tag}: {result['status']} ({result['wall_s']:.1f} s){err}")
    return result

  if jobs <= 1:
    return [one(x) for x in enumerate(specs)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    return list(pool.map(one, enumerate(specs)))


def _load() -> str:
  try:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "load average unknown"


OUTPUTS = ("study_config.json", "results.csv", "results.md", "curves.png", "lr.png", "ablations.png")


def output_paths(workdir: str, grid: str) -> dict:
  """Where a grid writes its tables and figures in `workdir`: the plain names (results.md, ...) for the grid that
  first used the directory, `<grid>_results.md` etc. for another grid sharing it (the `tuned` grid shares the
  `cpu` grid's runs), so neither overwrites the other's results."""
  owner = (_read_json(os.path.join(workdir, "study_config.json")) or {}).get("grid", grid)
  prefix = "" if owner == grid else f"{str(grid).replace(':', '_')}_"
  return {"prefix": prefix, "owner": owner, **{name: os.path.join(workdir, prefix + name) for name in OUTPUTS}}


def run_study(cfg, workdir: str, log=print, jobs: int = 1) -> list[dict]:
  """Sweep, then confirm: trains (or resumes, or skips) every run of the grid's sweep, then the confirmation seeds
  at each run's best learning rate; writes results.csv, results.md and the figures. `jobs` runs train at once."""
  if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
    raise ValueError(f"jobs={jobs!r} must be a positive int")
  specs = expand(cfg)
  n_confirm = len(confirm_seeds(cfg))
  min_steps = study_option(cfg, "min_steps")
  os.makedirs(workdir, exist_ok=True)
  out = output_paths(workdir, cfg.grid)
  if out["prefix"]:
    log(f"{workdir} holds the {out['owner']!r} grid's results; this grid's go to {out['prefix']}*")
  with open(out["study_config.json"], "w") as f:
    json.dump(cfg.to_dict(), f, indent=1, default=str)
  t0, load0 = time.time(), _load()
  mems = _measure_all(specs, workdir, log)
  n_runs = len({s["run"] for s in specs})
  total = len(specs) + n_runs * n_confirm
  results = _train_all(specs, workdir, jobs, log, 0, total)
  rows = [collect_row(s, os.path.join(workdir, s["name"]), r, mems[_memory_key(s["config"])])
          for s, r in zip(specs, results)]
  if n_confirm:
    confirm = expand_confirm(cfg, pick_best(rows))
    results = _train_all(confirm, workdir, jobs, log, len(specs), len(specs) + len(confirm))
    rows += [collect_row(s, os.path.join(workdir, s["name"]), r, mems.get(_memory_key(s["config"]), {}))
             for s, r in zip(confirm, results)]
  for r in rows:
    r["best"] = r["edge"] = False
  best = pick_best(rows)
  write_csv(rows, out["results.csv"])
  wall = time.time() - t0
  steps = cfg.to_dict()["train"]["steps"]
  header = (f"## Study `{cfg.grid}`: {len(rows)} runs ({len(specs)} in the sweep, {len(rows) - len(specs)} "
            f"confirmation runs), {steps} steps each\n\nThis invocation: {wall / 60:.1f} min wall time with "
            f"--jobs={jobs} (runs skipped as finished take no time); {_load()} at the end ({load0} at the start) on "
            f"{os.cpu_count()} cores.")
  with open(out["results.md"], "w") as f:
    f.write(markdown(rows, best, verdicts(best, steps=steps, min_steps=min_steps), header,
                     reference=study_option(cfg, "reference")))
  plot(rows, best, workdir, prefix=out["prefix"])
  if study_option(cfg, "reference") == "lost":
    plot_ablations(ablation_findings(best), workdir, prefix=out["prefix"])
  log(f"study wall time {wall:.1f} s ({_load()})")
  return rows


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  if f.measure:
    measure_main(f.measure.split(","))
    return 0
  if f.config is None or not f.workdir:
    print("error: --config=train/configs/study.py:<grid> and --workdir=DIR are required", file=sys.stderr)
    return 2
  try:
    run_study(f.config, f.workdir, log=lambda s: print(s, flush=True), jobs=f.jobs)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {output_paths(f.workdir, f.config.grid)['results.md']}")
  return 0


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Study grid: train/configs/study.py:<grid>.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Study directory: one sub-directory per run, results.csv/md, figures.")
  flags.DEFINE_integer("jobs", 1, "Runs trained at once (subprocesses); see docs/study.md for measured speed-ups.")
  flags.DEFINE_string("measure", None, "Internal: comma-separated measurement job files (memory analysis).")
  from train.cli import absl_flags_parser
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=absl_flags_parser)
