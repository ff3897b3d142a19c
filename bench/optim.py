"""Optimizer-state memory for the LLaMA presets and update time per step vs AdamW (60M shapes, CPU). Prints JSON.

Memory is computed from parameter SHAPES only (jax.ShapeDtypeStruct trees + jax.eval_shape of tx.init): no
arrays are allocated. "gib_bf16" = (params + optimizer moments) x 2 bytes, the convention of GaLore's Table 2
(projectors excluded); "state_gib_actual" = every state leaf at its real dtype (fp32 moments, projectors, LIFT
int32 indices, counters).

  python bench/optim.py                 # memory table + timing
  python bench/optim.py --no-timing     # memory only (a few seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from optim import frugal, galore, lift, state_size  # noqa: E402
from lostjax.models import preset  # noqa: E402
from train.state import abstract_params  # noqa: E402

PRESETS = {  # hidden, intermediate, layers, rank (GaLore table / LOST)
    "60M": (512, 1376, 8, 128),
    "130M": (768, 2048, 12, 256),
    "350M": (1024, 2736, 24, 256),
    "1B": (2048, 5461, 24, 512),
}
PUBLISHED_GIB = {"60M": (0.36, 0.24), "130M": (0.76, 0.52), "350M": (2.06, 1.22), "1B": (7.80, 4.38)}
GIB = 2.0 ** 30


def llama_param_shapes(name, lost_rank=None):
  """The real model's abstract parameter tree for a preset (lostjax.models), dense or LOST."""
  kind = "lost" if lost_rank else "dense"
  return abstract_params(preset(name.lower(), attn_kind=kind, mlp_kind=kind))


def methods(rank):
  return {
      "adamw": optax.adamw(1e-3),
      f"galore_r{rank}": galore(1e-3, rank=rank),
      "frugal_rho0.25_blockwise": frugal(1e-3, rho=0.25, proj_type="blockwise"),
      "frugal_rho0.25_svd": frugal(1e-3, rho=0.25, proj_type="svd"),
      "frugal_rho0": frugal(1e-3, rho=0.0, proj_type="blockwise"),
      # state size does not depend on filter_rank; 16 fits the smallest LOST w_sparse (25 rows at 60M)
      "lift_lora128": lift(1e-3, lora_rank=128, filter_rank=16),
  }


def n_elements(tree):
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def memory_table():
  rows = []
  for name, (d, ff, layers, rank) in PRESETS.items():
    for model in ("dense", "lost"):
      params = llama_param_shapes(name, lost_rank=rank if model == "lost" else None)
      n_params = n_elements(params)
      for mname, tx in methods(rank).items():
        if model == "lost" and mname.startswith("galore"):
          # GaLore's rank-r projection on LOST factors whose smaller side is < r is not defined
          continue
        s = state_size(tx, params)
        rows.append({"preset": name, "model": model, "method": mname, "params_M": round(n_params / 1e6, 1),
                     "moments_M": round(s.moment_elements / 1e6, 1),
                     "gib_bf16": round((n_params + s.moment_elements) * 2 / GIB, 2),
                     "state_gib_actual": round(s.bytes / GIB, 3),
                     "published_gib_full_galore": PUBLISHED_GIB[name]})
  return rows


def time_updates(steps: int):
  d, ff, layers, rank = PRESETS["60M"]
  shapes = llama_param_shapes("60M")
  key = jax.random.PRNGKey(0)
  params = jax.tree.map(lambda s: 0.02 * jax.random.normal(key, s.shape, s.dtype), shapes)
  grads = jax.tree.map(lambda p: jnp.sin(p * 37.0), params)
  out = {}
  for mname, factory in [
      ("adamw", lambda gap: optax.adamw(1e-3)),
      (f"galore_r{rank}", lambda gap: galore(1e-3, rank=rank, update_gap=gap)),
      ("frugal_rho0.25_blockwise", lambda gap: frugal(1e-3, rho=0.25, update_gap=gap, proj_type="blockwise")),
      ("frugal_rho0.25_svd", lambda gap: frugal(1e-3, rho=0.25, update_gap=gap, proj_type="svd")),
      ("frugal_rho0", lambda gap: frugal(1e-3, rho=0.0, update_gap=gap, proj_type="blockwise")),
      ("lift_lora128", lambda gap: lift(1e-3, lora_rank=128, filter_rank=64, update_gap=gap)),
  ]:
    res = {}
    for label, gap in (("steady", 10 ** 6), ("alternating", 2)):
      tx = factory(gap)
      state = tx.init(params)
      step = jax.jit(tx.update)
      t0 = time.perf_counter()
      u, state = step(grads, state, params)  # compile (+ the refresh at count 0)
      jax.block_until_ready(u)
      print(f"{mname} {label}: first call {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
      if label == "alternating" and mname.startswith("lift"):
        u, state = step(grads, state, params)  # LIFT refreshes when (count+1) % gap == 0: align the pairs
      t0 = time.perf_counter()
      for _ in range(steps):
        u, state = step(grads, state, params)
      jax.block_until_ready(u)
      res[label] = (time.perf_counter() - t0) / steps
      print(f"{mname} {label}: {res[label]:.4f} s/step", file=sys.stderr, flush=True)
    steady = res["steady"]
    refresh = max(2 * res["alternating"] - steady, steady) if mname != "adamw" else steady
    res = {"steady_s": round(steady, 4), "refresh_step_s": round(refresh, 4),
           "amortized_T200_s": round(steady + (refresh - steady) / 200, 4)}
    out[mname] = res
  base = out["adamw"]["amortized_T200_s"]
  for v in out.values():
    v["vs_adamw"] = round(v["amortized_T200_s"] / base, 2)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--no-timing", action="store_true")
  ap.add_argument("--steps", type=int, default=4)
  args = ap.parse_args()
  result = {"backend": jax.default_backend(), "memory": memory_table()}
  if not args.no_timing:
    result["update_time_60M"] = time_updates(args.steps)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
