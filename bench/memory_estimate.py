"""--summary_only's memory estimate against XLA's memory analysis of the compiled train step.

    python3 bench/memory_estimate.py                       # 60M dense/LOST/FRUGAL at 8×256, 130M dense at 4×256
    python3 bench/memory_estimate.py --cases small:lost:adamw:8
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python3 bench/memory_estimate.py --mesh_table

A case is size:method:optimizer:global_batch[:mesh] (seq 256, float32, the llama.py config of that size; tiny/small
use the byte vocabulary 257). method is dense | lowrank | lost | moe (dense attention, 8 dense experts, top-2) and
may carry '+remat' (model.remat=True). mesh is either an int (mesh.fsdp, the rest data) or the axis sizes as
letters and numbers: d=data, f=fsdp, t=tensor, e=expert, e.g. 'f8', 'd4t2', 'd2f2t2', 'd4e2'. With a mesh the
step is compiled SPMD over `--devices` devices (fake CPU devices: run with
XLA_FLAGS=--xla_force_host_platform_device_count=8) with the trainer's shardings, and the analysis is per device.
Prints one JSON line per case: the estimate's parts, the compiled step's argument / output / temp / alias bytes,
the number of "Involuntary full rematerialization" warnings XLA printed while compiling it, and
ratio = estimate total / compiled total (argument + output + temp − alias).

--mesh_table runs the sharding table (small and 60M; dense, LOST, FRUGAL, GaLore; global batch 16×256 on 8 devices;
meshes d8, f8, d4t2, f4t2, d2f2t2, and a mixture of experts on d4e2).

--reestimate FILE reads the JSON lines of an earlier run and prints them again with the estimate (and ratio)
recomputed by the current `train/summary.py`, compiling nothing: the compiled figures depend on the model and the
step only, so a change to the estimate alone is checked against all cases in seconds instead of recompiling them.
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
MESHES = ("d8", "f8", "d4t2", "f4t2", "d2f2t2")
MESH_TABLE = ",".join(
    [f"{size}:{m}:{o}:16:{mesh}" for size in ("small", "60m")
     for m, o in (("dense", "adamw"), ("lost", "adamw"), ("dense", "frugal"), ("dense", "galore"))
     for mesh in MESHES] + [f"{size}:moe:adamw:16:{mesh}" for size in ("small", "60m") for mesh in ("d8", "d4e2")])
AXES = {"d": "data", "f": "fsdp", "t": "tensor", "e": "expert"}


def parse_mesh(spec: str) -> dict:
  """'d4t2' -> {'data': 4, 'tensor': 2}; an int n -> {'fsdp': n} (data takes the rest)."""
  if spec.isdigit():
    return {"fsdp": int(spec)}
  out, i = {}, 0
  while i < len(spec):
    letter, j = spec[i], i + 1
    while j < len(spec) and spec[j].isdigit():
      j += 1
    if letter not in AXES or j == i + 1:
      raise ValueError(f"bad mesh spec {spec!r}: expected letters d/f/t/e each followed by a size, e.g. 'd4t2'")
    out[AXES[letter]] = int(spec[i + 1:j])
    i = j
  return out


def case_config(case: str, devices: int = 1):
  size, method, opt, batch, *mesh = case.split(":")
  method, *flags = method.split("+")
  moe = method == "moe"
  cfg = get_config(f"{size},{'dense' if moe else method}")
  if moe:
    cfg.model.moe_experts, cfg.model.moe_top_k = 8, 2
  cfg.model.remat = "remat" in flags
  cfg.optim.name = opt
  cfg.train.global_batch = int(batch)
  cfg.mesh.num_devices = devices if mesh else 1
  axes = parse_mesh(mesh[0]) if mesh else {}
  cfg.mesh.data = axes.get("data", -1)
  for name in ("fsdp", "tensor", "expert"):
    cfg.mesh[name] = axes.get(name, 1)
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
  p.add_argument("--mesh_table", action="store_true", help="run the sharding table (module docstring)")
  p.add_argument("--devices", type=int, default=8, help="devices of the mesh for cases with an fsdp field")
  p.add_argument("--dtype", default="float32", help="model.dtype (compute); parameters stay float32")
  p.add_argument("--reestimate", default="", help="JSON lines of an earlier run: recompute their estimates only")
  args = p.parse_args()
  if args.reestimate:
    for line in open(args.reestimate):
      row = json.loads(line)
      cfg = case_config(row["case"], row.get("devices", args.devices))
      cfg.model.dtype = row["dtype"]
      est = summary.summarize(cfg)["memory_estimate_per_device_bytes"]
      print(json.dumps({**row, "estimate": est, "state_bytes": est["params"] + est["grads"] + est["optimizer"],
                        "ratio": round(est["total"] / row["compiled"]["total"], 3), "reestimated": True}), flush=True)
    return
  for case in (MESH_TABLE if args.mesh_table else args.cases).split(","):
    cfg = case_config(case, args.devices)
    cfg.model.dtype = args.dtype
    t0 = time.perf_counter()
    sharded = len(case.split(":")) == 5
    compiled = sharded_compiled_memory(cfg) if sharded else summary.compiled_memory(cfg)
    est = summary.summarize(cfg)["memory_estimate_per_device_bytes"]
    print(json.dumps({"case": case, "dtype": args.dtype, "devices": args.devices, "estimate": est, "compiled": compiled,
                      "state_bytes": est["params"] + est["grads"] + est["optimizer"],
                      "ratio": round(est["total"] / compiled["total"], 3),
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
  main()
