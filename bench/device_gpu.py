"""Every missing GPU row of BENCHMARKS.md in one command: LOST (arXiv 2508.02668) against dense on one GPU.

    PYTHONPATH=$PWD:$PWD/bench python3 bench/device_gpu.py --out $OUT/device_gpu.json

Parts, in this order (each one a child process with its own time limit, so a crash, an out-of-memory error or a
hung compilation in one part is recorded in the JSON as that part's error and the next part still runs; the JSON
is rewritten after every part, so a run cut short keeps what finished):

  env        jax/torch versions, the device
  peak       8192^3 bf16 matmul TFLOP/s (the measured MFU denominator)
  profile    XLA profile of the LOST 350M train step (the model default `sparse_impl='auto'`, seq 1024): a
             `jax.profiler` trace of 3 steps, device ops summed by name, the top 15 by time (falling back to the
             compiled HLO's op counts and cost analysis when tracing fails)
  model_350m train step (AdamW, bf16 compute, f32 master weights, 16384 tokens, seq 1024): dense and LOST on
             every sparse path of `lostjax.kernels.registry` that runs on the backend, q/k/v and gate/up grouped;
             LOST also with `model.lost_contiguous_down` ('+contiguous_down': down's gather a slice)
  grouped    the same model with q/k/v and gate/up one by one (`fuse_projections=False`), dense and the fused paths
  torch      Hugging Face `LlamaForCausalLM` with the 350M dense shape, `torch.compile`d (and eager for reference)
  model_1b   as model_350m at 1B (8192 tokens per step so that it fits an 80 GB card beside the optimizer state)
  layers     the per-layer rows of bench/layers_gpu.py (forward+backward of one projection, every variant) at
             350M and 1B

Each row of the model parts has tokens/s, MFU and `speedup_vs_dense` (against the dense row of the same part).
The total time is capped by --total-budget-s (default 540 s: one call within a 10-minute command limit); a part
that does not fit is recorded as skipped, and `--only part,part` reruns just those.

  python bench/device_gpu.py --smoke --inprocess --out /tmp/d.json   # tiny shapes on CPU, a few seconds
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (name, default seconds): the order in which parts run and their time limits (sum 565 > 540: the last part gets
# what is left).
PARTS = (("env", 25), ("peak", 35), ("profile", 70), ("model_350m", 150), ("grouped", 70), ("torch", 110),
         ("model_1b", 120), ("layers", 80))
# Smoke: one-layer tiny model, one row per code path (every part still runs), so that a test can afford it.
SMOKE = dict(size="tiny", big="tiny", seq=16, tokens=32, big_tokens=32, steps=1, layer_tokens=16, reps=1,
             layers=("d->d",), profile_steps=1, overrides={"n_layers": 1},
             layer_variants=("dense", "lost_concat", "sparse_xla"))
FULL = dict(size="350m", big="1b", seq=1024, tokens=16384, big_tokens=8192, steps=10, layer_tokens=16384, reps=10,
            layers=("d->d", "d->ff", "ff->d"), profile_steps=3, overrides={}, layer_variants=None)
TOP_OPS = 15


def _err(e):
  return {"error": f"{type(e).__name__}: {str(e)[:400]}", "traceback_tail": traceback.format_exc()[-1500:]}


# ----------------------------------------------------------------------------- parts (run in a child process)

def _setup(smoke):
  """Imports bench/layers_gpu.py and gives it the settings its functions read."""
  sys.path[:0] = [ROOT]
  sys.path.append(HERE)   # after the repo root: bench/losses.py must not shadow the losses package
  import layers_gpu as lg
  s = SMOKE if smoke else FULL
  lg.ARGS = argparse.Namespace(model_steps=s["steps"], model_tokens=s["tokens"], tokens=s["layer_tokens"],
                               reps=s["reps"], attention_impl=None if smoke else "cudnn", peak_n=256 if smoke
                               else 8192, total_budget_s=1e9, model_overrides=s["overrides"])
  return lg, s


def _sparse_paths(backend):
  """Every registered sparse path that runs on `backend` (the Pallas entries only on their accelerator)."""
  from lostjax.kernels.registry import IMPLS
  return [n for n, e in IMPLS.items() if backend in e.backends]


def part_env(smoke, deadline, peak):
  lg, _ = _setup(smoke)
  import jax
  info = lg.env_info()
  info["sparse_paths"] = _sparse_paths(jax.default_backend())
  info["loadavg"] = os.getloadavg()
  return info


def part_peak(smoke, deadline, peak):
  lg, _ = _setup(smoke)
  return lg.peak(deadline)


def _model_rows(lg, plan, deadline, peak, tokens):
  import jax
  lg.RESULT.clear()
  if peak:
    lg.RESULT["peak"] = {"jax_bf16_tflops": peak}
  lg.ARGS.model_tokens = tokens
  rows = []
  for item in plan:  # row by row, each finished row written at once: a part killed at its limit keeps them
    rows += lg.model_section(deadline, [item])["rows"]
    _speedups(rows)
    _partial({"rows": rows, "tokens_per_step": tokens, "partial": "rows finished before the part's time limit"})
  return {"tokens_per_step": tokens, "rows": rows, "backend": jax.default_backend()}


def _speedups(rows):
  """speedup_vs_dense of every row: tokens/s over the dense 'auto' row of the same size and seq."""
  dense = {(r["size"], r["seq"]): r["tokens_per_s"] for r in rows
           if r.get("kind") == "dense" and r.get("sparse_impl") == "auto" and "tokens_per_s" in r}
  for r in rows:
    if "tokens_per_s" in r and (r["size"], r["seq"]) in dense:
      r["speedup_vs_dense"] = round(r["tokens_per_s"] / dense[(r["size"], r["seq"])], 4)


PART_OUT = None  # the child's result file (partial results are written there as they come)


def _partial(res):
  if PART_OUT:
    with open(PART_OUT, "w") as f:
      json.dump(res, f, default=str)


def _model_plan(size, seq, backend, separate=False, smoke=False):
  if smoke:  # one row per code path: dense, LOST 'auto' (contiguous down channels), one grouped path one by one
    return ([(size, "lost", seq, "fused_concat-sep")] if separate else
            [(size, "dense", seq, "auto"), (size, "lost", seq, "auto+contiguous_down")])
  from lostjax.kernels.registry import IMPLS, resolve_sparse_impl
  if separate:  # dense and the fused paths (the ones that share work across q/k/v and gate/up) one by one; their
    # grouped rows are in the model parts
    return [(size, "dense", seq, "auto"), (size, "dense", seq, "auto-sep")] + [
        (size, "lost", seq, n + "-sep") for n in _sparse_paths(backend) if IMPLS[n].fused]
  auto = resolve_sparse_impl("auto", backend).name
  return [(size, "dense", seq, "auto"), (size, "lost", seq, "auto"), (size, "lost", seq, "auto+contiguous_down")] + [
      (size, "lost", seq, n) for n in _sparse_paths(backend) if n != auto] + [
      (size, "lost", seq, "fused_concat+contiguous_down")]


def part_model_350m(smoke, deadline, peak):
  lg, s = _setup(smoke)
  import jax
  return _model_rows(lg, _model_plan(s["size"], s["seq"], jax.default_backend(), smoke=smoke), deadline, peak, s["tokens"])


def part_model_1b(smoke, deadline, peak):
  lg, s = _setup(smoke)
  import jax
  plan = _model_plan(s["big"], s["seq"], jax.default_backend(), smoke=smoke)
  return _model_rows(lg, plan[:1] if smoke else plan, deadline, peak, s["big_tokens"])


def part_grouped(smoke, deadline, peak):
  lg, s = _setup(smoke)
  import jax
  return _model_rows(lg, _model_plan(s["size"], s["seq"], jax.default_backend(), separate=True, smoke=smoke), deadline, peak,
                     s["tokens"])


def part_torch(smoke, deadline, peak):
  """The compiled peer first (the row that is missing), then eager; `jax_dense_over_torch` is filled in by the
  parent from model_350m."""
  lg, s = _setup(smoke)
  lg.RESULT.clear()
  rows = []
  # On CPU (smoke) the 'eager' torch.compile backend exercises the compile path without a C++ toolchain.
  for compiled in (("eager" if smoke else True), False):
    if time.time() > deadline:
      rows.append({"size": s["size"], "compiled": compiled, "skipped": "part time limit"})
      continue
    try:
      rows.append(lg.torch_train_step_bench(s["size"], s["seq"], max(1, s["tokens"] // s["seq"]), compiled))
    except Exception as e:  # noqa: BLE001
      rows.append({"size": s["size"], "compiled": compiled, **_err(e)})
  return {"rows": rows}


def part_layers(smoke, deadline, peak):
  lg, s = _setup(smoke)
  import jax
  import jax.numpy as jnp
  lb = lg.layer_bench
  backend = jax.default_backend()
  variants = [v for v in s["layer_variants"] or lb.LAYER_VARIANTS + lb.SPARSE_VARIANTS
              if lb.variant_backend_ok(v, backend)]
  rows, skipped = [], []
  for size in (s["size"], s["big"]) if s["big"] != s["size"] else (s["size"],):
    for name, d_in, d_out, rank in lb.layer_shapes(size, s["layers"]):
      if time.time() > deadline:
        skipped.append(f"{size} {name}")
        continue
      try:
        r = lb.bench_layer(size, d_in, d_out, rank, s["layer_tokens"], jnp.float32 if smoke else jnp.bfloat16,
                           variants, s["reps"])
      except Exception as e:  # noqa: BLE001
        r = [{"size": size, **_err(e)}]
      for row in r:
        row["layer"] = name
      rows.extend(r)
  return {"tokens": s["layer_tokens"], "variants": variants, "block_summary": lb.block_summary(rows), "rows": rows,
          "skipped": skipped}


def _trace_top_ops(trace_dir, steps, top=TOP_OPS):
  """Top ops by summed duration from the perfetto trace `jax.profiler` writes: device processes ('/device:...')
  when there are any (GPU kernels), else the XLA:CPU executor threads (the host Python thread is left out)."""
  import glob
  import gzip
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(sorted(paths)[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e.get("pid")] = e.get("args", {}).get("name", "")
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", "")
  device_pids = {p for p, n in procs.items() if n.startswith("/device:")}

  def keep(e):
    if device_pids:
      return e.get("pid") in device_pids
    name = e.get("name", "")
    return (threads.get((e.get("pid"), e.get("tid"))) != "python" and not name.startswith(("$", "end: "))
            and "::" not in name)

  tot, count, detail = {}, {}, {}
  for e in events:
    if e.get("ph") != "X" or not keep(e):
      continue
    name = e.get("name", "?")
    tot[name] = tot.get(name, 0.0) + float(e.get("dur", 0.0))
    count[name] = count.get(name, 0) + 1
    if name not in detail:
      args = e.get("args", {}) or {}
      detail[name] = {k: str(v)[:160] for k, v in args.items() if k in ("hlo_op", "hlo_module", "long_name",
                                                                          "kernel_details", "tf_op")}
  total = sum(tot.values())
  rows = [{"op": n, "ms_per_step": round(t / 1e3 / steps, 4), "share": round(t / total, 4) if total else None,
           "calls_per_step": count[n] / steps, **({"detail": detail[n]} if detail[n] else {})}
          for n, t in sorted(tot.items(), key=lambda kv: -kv[1])[:top]]
  return {"source": "device" if device_pids else "host executor threads", "ops_seen": len(tot),
          "total_ms_per_step": round(total / 1e3 / steps, 3), "top": rows}


def _hlo_summary(compiled, top=TOP_OPS):
  """Op counts of the optimized HLO and XLA's cost analysis (the fallback when no trace can be taken)."""
  import re
  counts = {}
  for m in re.finditer(r"=\s*\S+\s+([a-z][a-z0-9\-_]*)\(", compiled.as_text()):
    counts[m.group(1)] = counts.get(m.group(1), 0) + 1
  out = {"hlo_op_counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["cost_analysis"] = {k: float(v) for k, v in cost.items()
                            if k in ("flops", "bytes accessed", "transcendentals", "optimal_seconds")}
  except Exception as e:  # noqa: BLE001
    out["cost_analysis"] = _err(e)["error"]
  return out


def part_profile(smoke, deadline, peak):
  lg, s = _setup(smoke)
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lostjax.models import Llama, preset
  attn = lg.ARGS.attention_impl
  out = {}
  for attempt in (attn, None) if attn else (None,):
    try:
      cfg = preset(s["size"], dtype="bfloat16", param_dtype="float32", max_seq_len=max(1024, s["seq"]),
                   attn_kind="lost", mlp_kind="lost", sparse_impl="auto", attention_impl=attempt, **s["overrides"])
      graphdef, params, rest = lg._fast_init(cfg, Llama, nnx)
      step, opt_state = lg.adamw_step(graphdef, params)
      batch = max(1, s["tokens"] // s["seq"])
      tokens = jax.random.randint(jax.random.key(0), (batch, s["seq"] + 1), 0, cfg.vocab_size, jnp.int32)
      compiled = step.lower(params, opt_state, rest, tokens).compile()
      step = compiled  # the traced steps run this executable (step() would compile a second time)
      for _ in range(2):
        params, opt_state, loss = step(params, opt_state, rest, tokens)
      jax.block_until_ready(loss)
      break
    except Exception as e:  # noqa: BLE001
      out[f"build_error_attention_{attempt}"] = _err(e)["error"]
      if attempt is None:
        raise
  from lostjax.kernels.registry import resolve_sparse_impl
  out.update({"size": s["size"], "seq": s["seq"], "tokens_per_step": batch * s["seq"], "attention_impl": attempt,
              "sparse_impl": "auto -> " + resolve_sparse_impl("auto").name, "steps_traced": s["profile_steps"]})
  out.update(_hlo_summary(compiled))
  trace_dir = tempfile.mkdtemp(prefix="lostjax_profile_")
  try:
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(s["profile_steps"]):
        params, opt_state, loss = step(params, opt_state, rest, tokens)
      jax.block_until_ready(loss)
    out["traced_step_ms"] = round(1e3 * (time.perf_counter() - t0) / s["profile_steps"], 3)
    out["trace"] = _trace_top_ops(trace_dir, s["profile_steps"])
  except Exception as e:  # noqa: BLE001
    out["trace"] = _err(e)
  return out


PART_FNS = {"env": part_env, "peak": part_peak, "profile": part_profile, "model_350m": part_model_350m,
            "grouped": part_grouped, "torch": part_torch, "model_1b": part_model_1b, "layers": part_layers}


def run_part(name, smoke, deadline, peak):
  try:
    return PART_FNS[name](smoke, deadline, peak)
  except Exception as e:  # noqa: BLE001
    return _err(e)


# ----------------------------------------------------------------------------- driver (no JAX in this process)

def _child(name, args, limit_s, peak):
  """Runs one part in a fresh process (the whole GPU to itself) with a hard time limit."""
  with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
    path = f.name
  cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--part-out", path,
         "--part-deadline", str(time.time() + max(1.0, limit_s - 15.0)), "--peak", str(peak or 0)]
  if args.smoke:
    cmd.append("--smoke")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # one framework per process: most of the card
  if name == "torch":  # JAX must not take the card from PyTorch there
    env["JAX_PLATFORMS"] = "cpu"
  timeout = None
  try:
    proc = subprocess.run(cmd, env=env, timeout=limit_s, capture_output=True, text=True)
  except subprocess.TimeoutExpired as e:
    tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    timeout = {"error": f"timed out after {limit_s:.0f} s", "stderr_tail": tail[-800:]}
  try:
    with open(path) as f:
      res = json.load(f)
    if timeout:  # the rows the part had finished
      res.update(timeout)
  except (OSError, ValueError):
    res = timeout or {"error": f"exit status {proc.returncode}, no result", "stderr_tail": proc.stderr[-1500:]}
  finally:
    if os.path.exists(path):
      os.remove(path)
  return res


def _cross_ratios(result):
  """lostjax dense / torch.compile peer, and the best LOST path per size (filled in from the parts' rows)."""
  summary = {}
  dense = {}
  for part in ("model_350m", "model_1b"):
    rows = [r for r in result.get(part, {}).get("rows", []) if "tokens_per_s" in r]
    for r in rows:
      if r["kind"] == "dense":
        dense[r["size"]] = r["tokens_per_s"]
        summary[f"dense_{r['size']}_mfu_measured_peak"] = r.get("mfu_measured_peak")
    lost = [r for r in rows if r["kind"] != "dense" and "speedup_vs_dense" in r]
    if lost:
      best = max(lost, key=lambda r: r["speedup_vs_dense"])
      summary[f"lost_over_dense_{best['size']}_best"] = {"sparse_impl": best["sparse_impl"],
                                                         "speedup": best["speedup_vs_dense"]}
  for r in result.get("torch", {}).get("rows", []):
    if "tokens_per_s" in r and r.get("size") in dense:
      r["jax_dense_over_torch"] = round(dense[r["size"]] / r["tokens_per_s"], 4)
      summary[f"jax_dense_over_torch_{'compiled' if r['compiled'] else 'eager'}"] = r["jax_dense_over_torch"]
  return summary


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="", help="JSON path (default: $OUT/device_gpu.json, else stdout only)")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU")
  ap.add_argument("--inprocess", action="store_true", help="run the parts in this process (no hard time limits)")
  ap.add_argument("--only", default="", help="comma list of parts: " + ",".join(n for n, _ in PARTS))
  ap.add_argument("--total-budget-s", type=float, default=None,
                  help="default 540 s; with --smoke 10x that, and 10x each part's limit (a shared CPU is slow)")
  ap.add_argument("--part", default="", help=argparse.SUPPRESS)
  ap.add_argument("--part-out", default="", help=argparse.SUPPRESS)
  ap.add_argument("--part-deadline", type=float, default=0.0, help=argparse.SUPPRESS)
  ap.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args.part:  # child: one part, its result as JSON
    global PART_OUT
    PART_OUT = args.part_out
    res = run_part(args.part, args.smoke, args.part_deadline, args.peak or None)
    with open(args.part_out, "w") as f:
      json.dump(res, f, default=str)
    return res

  names = [n for n, _ in PARTS]
  only = [p for p in args.only.split(",") if p]
  bad = [p for p in only if p not in names]
  if bad:
    raise SystemExit(f"error: unknown part(s) {bad} in --only; expected some of {names}")
  scale = 10.0 if args.smoke else 1.0
  if args.total_budget_s is None:
    args.total_budget_s = 540.0 * scale
  out = args.out or (os.path.join(os.environ["OUT"], "device_gpu.json") if os.environ.get("OUT") else "")
  t_start = time.time()
  result = {"command": "python bench/device_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "smoke": args.smoke, "total_budget_s": args.total_budget_s, "parts": {}}
  peak = None
  for name, budget in PARTS:
    if only and name not in only:
      continue
    budget *= scale
    left = args.total_budget_s - (time.time() - t_start)
    t0 = time.time()
    if left < 20:
      result[name] = {"skipped": f"total budget {args.total_budget_s:.0f} s used"}
    elif args.inprocess:
      result[name] = run_part(name, args.smoke, t0 + min(budget, left), peak)
    else:
      result[name] = _child(name, args, min(budget, left), peak)
    result["parts"][name] = round(time.time() - t0, 1)
    if name == "peak":
      peak = result[name].get("jax_bf16_tflops")
    result["summary"] = _cross_ratios(result)
    result["elapsed_s"] = round(time.time() - t_start, 1)
    print(f"[{result['elapsed_s']:6.1f}s] {name}: {'error' if 'error' in result[name] else 'done'}",
          file=sys.stderr, flush=True)
    if out:
      with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
  if not out:
    print(json.dumps(result, indent=1, default=str))
  return result


if __name__ == "__main__":
  main()
