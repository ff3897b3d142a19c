"""--summary_only's memory estimate against XLA's memory analysis of the compiled train step (one device).

    python3 bench/memory_estimate.py                       # 60M dense/LOST/FRUGAL at 8×256, 130M dense at 4×256
    python3 bench/memory_estimate.py --cases small:lost:adamw:8

A case is size:method:optimizer:global_batch[:fsdp] (seq 256, float32, the llama.py config of that size; tiny/small
use the byte vocabulary 257). With an fsdp field the step is compiled SPMD over `--devices` devices (fake CPU
devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8) with the trainer's shardings, and the
analysis is per device. Prints one JSON line per case: the estimate's parts, the compiled step's argument /
output / temp / alias bytes and ratio = estimate total / compiled total (argument + output + temp − alias).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, not bench/ (bench/losses.py)

from train import summary  # noqa: E402
from train.configs.llama import get_config  # noqa: E402

DEFAULT = "60m:dense:adamw:8,60m:lost:adamw:8,60m:dense:frugal:8,130m:dense:adamw:4"


def case_config(case: str, devices: int = 1):
  size, method, opt, batch, *fsdp = case.split(":")
  cfg = get_config(f"{size},{method}")
  cfg.optim.name = opt
  cfg.train.global_batch = int(batch)
  cfg.mesh.num_devices = devices if fsdp else 1
  cfg.mesh.fsdp = int(fsdp[0]) if fsdp else 1
  if size in ("tiny", "small"):
    cfg.model.vocab_size = 257
  return cfg


def sharded_compiled_memory(cfg) -> dict:
  """compiled_memory of the step jitted as the trainer does it, on the config's mesh."""
  from train import state as state_lib
  return summary.compiled_memory(cfg, mesh=state_lib.make_mesh(cfg))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--cases", default=DEFAULT)
  p.add_argument("--devices", type=int, default=8, help="devices of the mesh for cases with an fsdp field")
  p.add_argument("--dtype", default="float32", help="model.dtype (compute); parameters stay float32")
  args = p.parse_args()
  for case in args.cases.split(","):
    cfg = case_config(case, args.devices)
    cfg.model.dtype = args.dtype
    t0 = time.perf_counter()
    sharded = len(case.split(":")) == 5
    compiled = sharded_compiled_memory(cfg) if sharded else summary.compiled_memory(cfg)
    est = summary.summarize(cfg)["memory_estimate_per_device_bytes"]
    print(json.dumps({"case": case, "dtype": args.dtype, "estimate": est, "compiled": compiled,
                      "ratio": round(est["total"] / compiled["total"], 3),
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
  main()
