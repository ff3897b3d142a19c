"""LOST sparse branch on TPU: the Pallas TPU kernel (sparse_impl='pallas_tpu') against the XLA paths, JSON output.

LOST layer (Li et al., arXiv 2508.02668): y = gamma*silu(x A) B + (1-gamma)*x[..., I] W_s. Sections (each one
wrapped so that a failure keeps the others; the JSON is rewritten after every section when --out is given):
  env     jax version, backend, device kind, date, command
  check   pallas_tpu vs gather_xla on the device: max |difference| of y, dx, dW_s (bf16 and float32)
  layers  forward+backward per layer (bench/layers.py, round-robin medians): dense, LOST with each sparse path
          (lost_separate = gather_xla, lost_pallas_tpu, lost_concat = fused_concat, lost_onehot = fused_onehot)
          and the sparse branch alone (sparse_xla, sparse_xla_onehotdx, sparse_onehot_gemm, sparse_pallas_tpu)
  model   the LLaMA train step (AdamW, bf16 compute, float32 master weights) at 60M and 350M: dense and LOST with
          model.sparse_impl = gather_xla | pallas_tpu | fused_concat | fused_onehot; tokens/s and speed-up of
          pallas_tpu over gather_xla
The last key, "auto_tpu", says whether pallas_tpu was faster than gather_xla in the train step at every size
(then lostjax.kernels.registry.AUTO['tpu'] may be switched to it; until then 'auto' on TPU is gather_xla).

  python bench/sparse_tpu.py --out sparse_tpu.json     # on a TPU VM (tpu_scripts/run_sparse_tpu.sh), a few minutes
  python bench/sparse_tpu.py --smoke                   # tiny shapes on CPU, kernels in TPU interpret mode
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import layers as layer_bench  # noqa: E402  (bench/layers.py)
import layers_gpu  # noqa: E402  (model FLOP count and the fast model init)
from lostjax.kernels import gather_matmul  # noqa: E402

LAYER_VARIANTS = ["dense", "lost_separate", "lost_pallas_tpu", "lost_concat", "lost_onehot",
                  "sparse_xla", "sparse_xla_onehotdx", "sparse_onehot_gemm", "sparse_pallas_tpu"]
MODEL_IMPLS = ["gather_xla", "pallas_tpu", "fused_concat", "fused_onehot"]


def _err(e):
  return {"error": f"{type(e).__name__}: {str(e)[:400]}", "traceback_tail": traceback.format_exc()[-1000:]}


def env_info(argv):
  dev = jax.devices()[0]
  return {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
          "command": "python bench/sparse_tpu.py " + " ".join(argv)}


def check(args):
  d, ff, _ = layer_bench.SIZES[args.sizes[-1]]
  rows = []
  for d_in, d_out in [(d, d), (ff, d)]:
    for dtype in (jnp.bfloat16, jnp.float32):
      k = max(1, int(0.05 * d_in))
      idx = jnp.asarray(np.sort(np.random.default_rng(0).choice(d_in, k, replace=False)), jnp.int32)
      x = jax.random.normal(jax.random.key(0), (args.tokens, d_in), dtype)
      w = (0.02 * jax.random.normal(jax.random.key(1), (k, d_out))).astype(dtype)
      dy = jax.random.normal(jax.random.key(2), (args.tokens, d_out), dtype)
      res = {}
      for impl in ("gather_xla", "pallas_tpu"):
        def y_dx_dw(x, w, dy, impl=impl):
          y, pullback = jax.vjp(lambda x_, w_: gather_matmul(x_, idx, w_, impl=impl), x, w)
          return (y,) + tuple(pullback(dy))
        res[impl] = jax.block_until_ready(jax.jit(y_dx_dw)(x, w, dy))
      row = {"d_in": d_in, "d_out": d_out, "k": k, "dtype": jnp.dtype(dtype).name}
      for name, i in (("y", 0), ("dx", 1), ("dw", 2)):
        a, b = (np.asarray(res[impl][i], np.float32) for impl in ("pallas_tpu", "gather_xla"))
        row[f"max_abs_diff_{name}"] = float(np.max(np.abs(a - b)))
        row[f"max_abs_{name}"] = float(np.max(np.abs(b)))
      rows.append(row)
  return {"size": args.sizes[-1], "tokens": args.tokens, "rows": rows}


def layers(args):
  rows = layer_bench.run(args.sizes, args.tokens, jnp.dtype(args.dtype), args.reps, LAYER_VARIANTS,
                         ["d->d", "d->ff", "ff->d"])
  return {"tokens": args.tokens, "dtype": args.dtype, "block_summary": layer_bench.block_summary(rows),
          "rows": rows}


def train_step(size, kind, seq, batch, sparse_impl, steps):
  from flax import nnx

  from lostjax.models import Llama, preset
  overrides = dict(dtype="bfloat16", param_dtype="float32", max_seq_len=max(1024, seq), sparse_impl=sparse_impl)
  if kind != "dense":
    overrides.update(attn_kind=kind, mlp_kind=kind)
  cfg = preset(size, **overrides)
  graphdef, params, rest = layers_gpu._fast_init(cfg, Llama, nnx)  # shapes only: no SVD init
  dt, compile_s, loss = layers_gpu.timed_adamw_steps(graphdef, params, rest, cfg.vocab_size, batch, seq, steps)
  flops_tok, n_matmul = layers_gpu.model_flops_per_token(cfg, seq)
  return {"size": size, "kind": kind, "seq": seq, "batch": batch, "sparse_impl": sparse_impl,
          "step_ms": round(1e3 * dt, 3), "tokens_per_s": round(batch * seq / dt, 1), "compile_s": round(compile_s, 2),
          "model_tflops": round(flops_tok * batch * seq / dt / 1e12, 2), "n_matmul_params": n_matmul,
          "loss": float(loss)}


def model(args):
  rows = []
  for size in args.model_sizes:
    plan = [("dense", "auto")] + [("lost", impl) for impl in MODEL_IMPLS]
    for kind, impl in plan:
      try:
        rows.append(train_step(size, kind, args.seq, args.model_tokens // args.seq, impl, args.model_steps))
      except Exception as e:  # noqa: BLE001 -- keep the other rows
        rows.append({"size": size, "kind": kind, "sparse_impl": impl, **_err(e)})
  speedup = {}
  for size in args.model_sizes:
    tps = {r["sparse_impl"]: r["tokens_per_s"] for r in rows
           if r["size"] == size and r["kind"] == "lost" and "tokens_per_s" in r}
    if "gather_xla" in tps and "pallas_tpu" in tps:
      speedup[size] = round(tps["pallas_tpu"] / tps["gather_xla"], 4)
  return {"seq": args.seq, "tokens_per_step": args.model_tokens, "rows": rows,
          "pallas_tpu_over_gather_xla": speedup}


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: kernels in TPU interpret mode)")
  ap.add_argument("--only", default="", help="comma list of sections: check,layers,model")
  ap.add_argument("--sizes", default="60m,350m", help="per-layer sizes (bench/layers.py SIZES)")
  ap.add_argument("--model-sizes", default="60m,350m")
  ap.add_argument("--tokens", type=int, default=16384, help="tokens per layer call")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--seq", type=int, default=256, help="train-step sequence length (GaLore/LOST protocol: 256)")
  ap.add_argument("--model-tokens", type=int, default=8192,
                  help="tokens per train step (batch = model_tokens / seq; raise it on chips with more HBM)")
  ap.add_argument("--model-steps", type=int, default=10)
  ap.add_argument("--out", default="", help="JSON file (rewritten after every section); always printed too")
  args = ap.parse_args(argv)
  if args.smoke:
    args.sizes, args.model_sizes, args.tokens, args.reps = "tiny", "tiny", 64, 1
    args.seq, args.model_tokens, args.model_steps, args.dtype = 16, 32, 1, "float32"
  args.sizes = [s for s in args.sizes.split(",") if s]
  args.model_sizes = [s for s in args.model_sizes.split(",") if s]
  args.only = [s for s in args.only.split(",") if s]
  return args


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  result = {"bench": "sparse_tpu", "env": env_info(argv)}
  for name, fn in (("check", check), ("layers", layers), ("model", model)):
    if args.only and name not in args.only:
      continue
    t0 = time.time()
    try:
      result[name] = fn(args)
    except Exception as e:  # noqa: BLE001 -- keep the other sections
      result[name] = _err(e)
    result[name]["elapsed_s"] = round(time.time() - t0, 1)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
  sp = result.get("model", {}).get("pallas_tpu_over_gather_xla", {})
  result["auto_tpu"] = ("pallas_tpu" if sp and len(sp) == len(args.model_sizes) and min(sp.values()) > 1.0
                        else "gather_xla")
  text = json.dumps(result, indent=1)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  print(text)
  return result


if __name__ == "__main__":
  main()
