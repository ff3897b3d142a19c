"""Scale plan computed by the compiler: per-device memory of the real train step for 1B / 7B on TPU and GPU slices.

Each row compiles `train.state.compiled_memory` (the step exactly as the loop jits it, from abstract inputs:
nothing is allocated) on N fake CPU devices, one subprocess per device count with
XLA_FLAGS=--xla_force_host_platform_device_count=N. It records XLA's per-device bytes against the slice's
device memory (train/flops.py tables), the step time the FLOPs imply at 50 % MFU (6·N_matmul + 12·L·d·T FLOPs per
token, `train.flops.flops_per_token`), and what `--summary_only` estimates and advises for the same config.

    python3 bench/scale_plan.py                        # every row (slow: 7B on 64 devices compiles for minutes)
    python3 bench/scale_plan.py --rows 1b-lost-v5e16   # one row (names: --list)
    python3 bench/scale_plan.py --estimate_only        # the estimates alone, no compile (seconds)

Prints one JSON line per row. Caveats: XLA:CPU's memory analysis, not the TPU/GPU compiler's (XLA:CPU keeps
float32-sized temporaries under bfloat16 compute, docs/benchmarks/memory.md); compute in bfloat16 with float32
master weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, not bench/

GIB = 2.0 ** 30
# slice: (devices, device kind in train/flops.py, mesh axis sizes a user would pick)
SLICES = {
    "v5e16": (16, "tpu v5e", {"fsdp": 16}),
    "v5p32": (32, "tpu v5p", {"fsdp": 32}),
    "v4-64": (64, "tpu v4", {"fsdp": 64}),
    "8xh100": (8, "h100", {"fsdp": 8}),
    "16xh100": (16, "h100", {"data": 2, "fsdp": 8}),
}


def _rows():
  rows = {}
  for size in ("1b", "7b"):
    for method in ("dense", "lost"):
      for sl in SLICES:
        for remat in (False, True):
          name = f"{size}-{method}-{sl}" + ("-remat" if remat else "")
          rows[name] = dict(size=size, method=method, slice=sl, remat=remat, batch=512, seq=256)
      for seq in (1024, 2048):
        rows[f"{size}-{method}-v5p32-remat-seq{seq}"] = dict(size=size, method=method, slice="v5p32", remat=True,
                                                               batch=512 * 256 // seq, seq=seq)
  return rows


ROWS = _rows()


def row_config(row: dict):
  from train.configs.llama import get_config
  devices, _, axes = SLICES[row["slice"]]
  cfg = get_config(f"{row['size']},{row['method']}")
  cfg.model.dtype = "bfloat16"
  cfg.model.remat = row["remat"]
  cfg.train.global_batch, cfg.train.seq_len = row["batch"], row["seq"]
  cfg.mesh.num_devices = devices
  cfg.mesh.data = axes.get("data", -1)
  cfg.mesh.fsdp, cfg.mesh.tensor = axes.get("fsdp", 1), axes.get("tensor", 1)
  return cfg


def row_result(name: str, estimate_only: bool = False) -> dict:
  """One row's JSON record; `estimate_only` skips the compile and reports `--summary_only`'s closed form alone."""
  from train import flops, summary
  from train import state as state_lib
  row = ROWS[name]
  cfg = row_config(row)
  devices, kind, axes = SLICES[row["slice"]]
  t0 = time.perf_counter()
  mc = state_lib.llama_config(cfg)
  s = summary.summarize(cfg)
  memory = flops.device_memory(kind)
  estimate = s["memory_estimate_per_device_bytes"]["total"]
  step_flops = flops.flops_per_token(mc, cfg.train.seq_len) * cfg.train.global_batch * cfg.train.seq_len
  out = {"row": name, **row, "devices": devices, "device": kind, "mesh": axes, "device_gib": round(memory / GIB, 1),
         "estimate_gib": round(estimate / GIB, 2),
         "step_s_at_50pct_mfu": round(step_flops / (devices * flops.peak_flops(kind) * 0.5), 2)}
  if estimate_only:
    out.update(fits=estimate <= summary.FIT_FRACTION * memory,
               command=f"python3 bench/scale_plan.py --estimate_only --rows {name}")
    return out
  compiled = state_lib.compiled_memory(cfg, mesh=state_lib.make_mesh(cfg))
  out.update(compiled_gib=round(compiled["total"] / GIB, 2), temp_gib=round(compiled["temp"] / GIB, 2),
             fits=compiled["total"] <= summary.FIT_FRACTION * memory,
             involuntary_remat=compiled["involuntary_remat"], command=f"python3 bench/scale_plan.py --rows {name}",
             compile_s=round(time.perf_counter() - t0, 1))
  return out


def worker(names, estimate_only: bool = False):
  for name in names:
    print(json.dumps(row_result(name, estimate_only)), flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
  p.add_argument("--list", action="store_true")
  p.add_argument("--estimate_only", action="store_true",
                 help="skip the compile: print only the `--summary_only` estimate (seconds, any device count)")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  names = [r for r in args.rows.split(",") if r] or list(ROWS)
  for n in names:
    if n not in ROWS:
      raise SystemExit(f"unknown row {n!r}; see --list")
  if args.list:
    print("\n".join(ROWS))
    return
  if args.worker or args.estimate_only:
    worker(names, args.estimate_only)
    return
  by_devices = {}
  for n in names:
    by_devices.setdefault(SLICES[ROWS[n]["slice"]][0], []).append(n)
  for n_dev, group in sorted(by_devices.items()):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_dev}").strip())
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--rows", ",".join(group)], env=env,
                   check=True)


if __name__ == "__main__":
  main()
