"""Same-process A/B of the 2-D weight-gradient GEMM (`lostjax.layers.common.matmul`) against plain autodiff
(`jnp.dot`): 60M train steps built as `bench/train_step.py` builds them, round-robin. Prints one JSON line.

  python bench/matmul_2d_ab.py --methods dense,lost --rounds 6
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_step import JaxRunner  # noqa: E402  (first: it applies train.cpu_malloc.tune() before JAX starts)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lostjax.layers import common  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--methods", default="dense,lost")
  p.add_argument("--size", default="60m")
  p.add_argument("--rounds", type=int, default=6)
  args = p.parse_args(argv)
  new, runs = common.matmul, {}
  for method in args.methods.split(","):
    for name in ("2d", "autodiff"):
      common.matmul = new if name == "2d" else (lambda x, w: jnp.dot(x, w))
      r = JaxRunner(args.size, method, 4, 256)
      r()
      r()
      runs[f"{method}/{name}"] = r
  common.matmul = new
  times = {m: [] for m in runs}
  for _ in range(args.rounds):
    for m, r in runs.items():
      t0 = time.perf_counter()
      r()
      times[m].append(time.perf_counter() - t0)
  out = {m: {"median_s": round(float(np.median(v)), 4), "min_s": round(min(v), 4), "loss": runs[m].loss}
         for m, v in times.items()}
  print(json.dumps({"size": args.size, "batch": 4, "seq": 256, "loadavg": os.getloadavg(), "results": out}))


if __name__ == "__main__":
  main()
