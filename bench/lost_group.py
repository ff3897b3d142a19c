"""q/k/v projections together vs one by one: forward+backward time of three LOST layers (kernels.lost_group_matmul
vs three kernels.lost_matmul calls) and of three dense layers (one GEMM on the stacked kernels vs three GEMMs).

60M shapes by default (d=512, r=128, s=0.05 → k=25), float32, round-robin in one process, median of --reps.
Loss = Σ_g sum(sin(y_g)), gradients w.r.t. x and every weight. Prints one JSON line.

  python bench/lost_group.py --tokens 1024 4096
  python bench/lost_group.py --impl fused_onehot     # any fused sparse-path name (lostjax.kernels.registry)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train import cpu_malloc  # noqa: E402

cpu_malloc.tune()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lostjax.kernels import lost_group_matmul, lost_matmul, resolve_sparse_impl  # noqa: E402


def run(tokens, d, r, k, groups, reps, impl="fused_concat", seed=0):
  rng = np.random.default_rng(seed)
  arr = lambda *s, scale=0.05: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
  x = arr(tokens, d, scale=1.0)
  a = [arr(d, r) for _ in range(groups)]
  b = [arr(r, d) for _ in range(groups)]
  idx = [jnp.asarray(np.sort(rng.choice(d, k, replace=False)), jnp.int32) for _ in range(groups)]
  w = [arr(k, d) for _ in range(groups)]
  wd = [arr(d, d) for _ in range(groups)]

  def lost_sep(x, a, b, w):
    return sum(jnp.sum(jnp.sin(lost_matmul(x, a[g], b[g], idx[g], w[g], 0.5, impl=impl))) for g in range(groups))

  def lost_grp(x, a, b, w):
    return sum(jnp.sum(jnp.sin(y)) for y in lost_group_matmul(x, a, b, idx, w, 0.5, impl=impl))

  def dense_sep(x, wd):
    return sum(jnp.sum(jnp.sin(x @ m)) for m in wd)

  def dense_grp(x, wd):
    y = jax.lax.dot_general(x, jnp.stack(wd, axis=1), (((1,), (0,)), ((), ())))
    return sum(jnp.sum(jnp.sin(y[:, g])) for g in range(groups))

  fns = {"lost_separate": (jax.jit(jax.grad(lost_sep, (0, 1, 2, 3))), (x, a, b, w)),
         "lost_grouped": (jax.jit(jax.grad(lost_grp, (0, 1, 2, 3))), (x, a, b, w)),
         "dense_separate": (jax.jit(jax.grad(dense_sep, (0, 1))), (x, wd)),
         "dense_grouped": (jax.jit(jax.grad(dense_grp, (0, 1))), (x, wd))}
  for f, args in fns.values():
    jax.block_until_ready(f(*args))
  times = {n: [] for n in fns}
  for _ in range(reps):
    for n, (f, args) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[n].append(time.perf_counter() - t0)
  ms = {n: round(1e3 * float(np.median(v)), 3) for n, v in times.items()}
  return {"tokens": tokens, "median_ms": ms,
          "lost_grouped_over_separate": round(ms["lost_grouped"] / ms["lost_separate"], 3),
          "dense_grouped_over_separate": round(ms["dense_grouped"] / ms["dense_separate"], 3),
          "lost_over_dense_grouped": round(ms["lost_grouped"] / ms["dense_grouped"], 3)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
  p.add_argument("--d", type=int, default=512)
  p.add_argument("--rank", type=int, default=128)
  p.add_argument("--k", type=int, default=25)
  p.add_argument("--groups", type=int, default=3)
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--impl", default="fused_concat", help="fused sparse-path name: fused_concat | fused_onehot")
  args = p.parse_args(argv)
  if not resolve_sparse_impl(args.impl).fused:
    raise SystemExit(f"--impl {args.impl!r} is not a fused sparse path (nothing is shared across the group)")
  rows = [run(t, args.d, args.rank, args.k, args.groups, args.reps, resolve_sparse_impl(args.impl).name)
          for t in args.tokens]
  out = {"jax": jax.__version__, "backend": jax.default_backend(), "impl": args.impl, "d": args.d, "rank": args.rank, "k": args.k,
         "groups": args.groups, "loadavg": os.getloadavg(), "rows": rows}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
