"""Per-layer forward+backward timing: dense vs low-rank vs LOST variants (any backend, JSON output).

LOST layer (Li et al., arXiv 2508.02668): y = gamma*silu(x A) B + (1-gamma)*x[..., I] W_s, with the
GaLore/LOST LLaMA shapes (60M/130M/350M/1B: d, ff, rank) and s = 0.05 (|I| = floor(s*d_in)).

Each variant is timed as one jitted call returning (dx, dparams) for a fixed output cotangent
(forward + backward), median over --reps runs taken round-robin across variants so that the ratios
within one run share the same machine noise. Also times the sparse branch alone (x[..., I] @ W_s).

  python bench/layers.py --sizes 350m --tokens 2048 --dtype float32 --reps 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lostjax.kernels import gather_matmul, lost_matmul  # noqa: E402

# name: (d, ff, rank) -- GaLore LLaMA configs; ranks as the LOST/CoLA presets (docs/lost.md).
SIZES = {
    "tiny": (64, 176, 16),  # smoke tests only
    "60m": (512, 1376, 128),
    "130m": (768, 2048, 256),
    "350m": (1024, 2736, 256),
    "1b": (2048, 5461, 512),
}
SPARSITY = 0.05
GAMMA = 0.5

# lost_<x>: lost_matmul(impl=<x>) with x a sparse-path registry name or its legacy alias (separate = gather_xla,
# concat = fused_concat, onehot = fused_onehot, pallas = pallas_gpu); lostjax.kernels.registry.
LAYER_VARIANTS = ("dense", "lowrank", "lost_separate", "lost_separate_onehotdx", "lost_concat",
                  "lost_onehot", "lost_pallas", "lost_pallas_tpu")
SPARSE_VARIANTS = ("sparse_xla", "sparse_xla_onehotdx", "sparse_onehot_gemm", "sparse_pallas",
                   "sparse_pallas_tpu")


def variant_backend_ok(variant, backend):
  """Pallas variants are listed by default only on their accelerator (pallas = GPU Triton, pallas_tpu = TPU)."""
  if "pallas" not in variant:
    return True
  return backend == ("tpu" if variant.endswith("_tpu") else "gpu")


def make_params(key, d_in, d_out, rank, dtype, s=SPARSITY):
  ks = jax.random.split(key, 5)
  k = max(1, int(s * d_in))
  idx = jnp.asarray(np.sort(np.random.default_rng(0).choice(d_in, k, replace=False)), jnp.int32)
  std = 0.02
  return {
      "w": (std * jax.random.normal(ks[0], (d_in, d_out))).astype(dtype),
      "a": (std * jax.random.normal(ks[1], (d_in, rank))).astype(dtype),
      "b": (std * jax.random.normal(ks[2], (rank, d_out))).astype(dtype),
      "ws": (std * jax.random.normal(ks[3], (k, d_out))).astype(dtype),
  }, idx


def layer_fn(variant, idx, interpret=None):
  """Returns f(x, params) -> y for the named variant (params: dict of trainable arrays)."""
  if variant == "dense":
    return lambda x, p: jnp.dot(x, p["w"], preferred_element_type=jnp.float32).astype(x.dtype)
  if variant == "lowrank":
    return lambda x, p: jnp.dot(jax.nn.silu(x @ p["a"]), p["b"],
                                preferred_element_type=jnp.float32).astype(x.dtype)
  if variant == "lost_separate_onehotdx":
    def f(x, p):
      lr = jax.nn.silu(x @ p["a"]) @ p["b"]
      sp = gather_matmul(x, idx, p["ws"], impl="gather_onehot_grad")
      return (GAMMA * lr + (1 - GAMMA) * sp).astype(x.dtype)
    return f
  if variant.startswith("lost_"):
    impl = variant[len("lost_"):]
    return lambda x, p: lost_matmul(x, p["a"], p["b"], idx, p["ws"], GAMMA, act="silu", impl=impl,
                                    interpret=interpret)
  if variant == "sparse_xla":
    return lambda x, p: gather_matmul(x, idx, p["ws"], impl="xla")
  if variant == "sparse_xla_onehotdx":
    return lambda x, p: gather_matmul(x, idx, p["ws"], impl="gather_onehot_grad")
  if variant in ("sparse_pallas", "sparse_pallas_tpu"):
    impl = "pallas_tpu" if variant.endswith("_tpu") else "pallas_gpu"
    return lambda x, p: gather_matmul(x, idx, p["ws"], impl=impl, interpret=interpret)
  if variant == "sparse_onehot_gemm":  # plain autodiff of (x @ P) @ W_s, P one-hot constant
    def f(x, p):
      sel = jax.nn.one_hot(idx, x.shape[-1], dtype=x.dtype).T
      return ((x @ sel) @ p["ws"]).astype(x.dtype)
    return f
  raise ValueError(f"unknown variant {variant!r}")


def _params_for(variant, params):
  if variant == "dense":
    return {"w": params["w"]}
  if variant == "lowrank":
    return {"a": params["a"], "b": params["b"]}
  if variant.startswith("sparse_"):
    return {"ws": params["ws"]}
  return {"a": params["a"], "b": params["b"], "ws": params["ws"]}


def fwd_bwd_step(f):
  def step(x, p, ct):
    _, pullback = jax.vjp(f, x, p)
    return pullback(ct)
  return jax.jit(step)


def _block(tree):
  jax.block_until_ready(tree)


def time_variants(fns: dict, reps: int, warmup: int = 1):
  """fns: name -> zero-arg callable. Round-robin timing; returns name -> list of seconds."""
  for f in fns.values():
    for _ in range(warmup):
      _block(f())
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, f in fns.items():
      t0 = time.perf_counter()
      _block(f())
      times[k].append(time.perf_counter() - t0)
  return times


def bench_layer(size, d_in, d_out, rank, tokens, dtype, variants, reps, interpret=None, seed=0):
  params, idx = make_params(jax.random.key(seed), d_in, d_out, rank, dtype)
  x = jax.random.normal(jax.random.key(seed + 1), (tokens, d_in), dtype)
  ct = jax.random.normal(jax.random.key(seed + 2), (tokens, d_out), dtype)
  fns, errors = {}, {}
  for v in variants:
    try:
      step = fwd_bwd_step(layer_fn(v, idx, interpret))
      p = _params_for(v, params)
      jax.block_until_ready(step(x, p, ct))  # compile (and surface errors) before timing
      fns[v] = (lambda step=step, p=p: step(x, p, ct))
    except Exception as e:  # noqa: BLE001 -- record and keep benchmarking the other variants
      errors[v] = f"{type(e).__name__}: {str(e)[:300]}"
  times = time_variants(fns, reps)
  med = {k: statistics.median(t) for k, t in times.items()}
  base = med.get("dense")
  sparse_base = med.get("sparse_xla")
  rows = []
  for v in variants:
    row = {"size": size, "d_in": d_in, "d_out": d_out, "rank": rank, "k": int(idx.shape[0]),
           "tokens": tokens, "dtype": jnp.dtype(dtype).name, "variant": v}
    if v in med:
      row["ms_fwd_bwd"] = round(1e3 * med[v], 4)
      row["ms_min"] = round(1e3 * min(times[v]), 4)
      if base and not v.startswith("sparse_"):
        row["ratio_vs_dense"] = round(med[v] / base, 4)
      if sparse_base and v.startswith("sparse_"):
        row["speedup_vs_sparse_xla"] = round(sparse_base / med[v], 4)
    else:
      row["error"] = errors[v]
    rows.append(row)
  return rows


def layer_shapes(size, which=("d->d", "d->ff", "ff->d")):
  d, ff, rank = SIZES[size]
  table = {"d->d": (d, d), "d->ff": (d, ff), "ff->d": (ff, d)}
  return [(name, *table[name], rank) for name in which]


def run(sizes, tokens, dtype, reps, variants, layers, interpret=None):
  out = []
  for size in sizes:
    for name, d_in, d_out, rank in layer_shapes(size, layers):
      rows = bench_layer(size, d_in, d_out, rank, tokens, dtype, variants, reps, interpret)
      for r in rows:
        r["layer"] = name
      out.extend(rows)
  return out


# projections per transformer block: q, k, v, o (d->d), gate, up (d->ff), down (ff->d)
BLOCK_WEIGHTS = {"d->d": 4, "d->ff": 2, "ff->d": 1}


def block_summary(rows):
  """Per size and variant: time of one block's 7 projections and its ratio to dense."""
  out = {}
  for size in sorted({r["size"] for r in rows}):
    sel = [r for r in rows if r["size"] == size and "ms_fwd_bwd" in r]
    if {r["layer"] for r in sel} != set(BLOCK_WEIGHTS):
      continue
    tot = {}
    for r in sel:
      if not r["variant"].startswith("sparse_"):
        tot[r["variant"]] = tot.get(r["variant"], 0.0) + BLOCK_WEIGHTS[r["layer"]] * r["ms_fwd_bwd"]
    if "dense" in tot:
      out[size] = {v: {"ms_block": round(t, 3), "ratio_vs_dense": round(t / tot["dense"], 4)}
                   for v, t in tot.items()}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="350m", help="comma list of " + ",".join(SIZES))
  ap.add_argument("--layers", default="d->d,d->ff,ff->d")
  ap.add_argument("--tokens", type=int, default=2048)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--reps", type=int, default=5)
  default_v = [v for v in LAYER_VARIANTS + SPARSE_VARIANTS if variant_backend_ok(v, jax.default_backend())]
  ap.add_argument("--variants", default=",".join(default_v))
  args = ap.parse_args(argv)
  t0 = time.time()
  rows = run(args.sizes.split(","), args.tokens, jnp.dtype(args.dtype), args.reps,
             args.variants.split(","), args.layers.split(","))
  result = {"bench": "layers", "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "command": "python bench/layers.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "wall_s": round(time.time() - t0, 1), "block_summary": block_summary(rows),
            "rows": rows}
  print(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
