"""Mixture-of-experts train-step throughput against the dense model with the same active parameters.

    python bench/moe.py                                   # 'small' preset, E=4 top-1, batch 8 x 128, CPU
    python bench/moe.py --preset 20m --experts 8 --top_k 1 --batch 8 --seq 256 --reps 5

Variants (same attention, same d_ff per expert as the dense MLP, so top-1 routing has the dense model's active
parameters plus the router): `dense`, `moe_cf1.0` / `moe_cf1.25` (capacity factor), `moe_dropless`; `--kind`
chooses the linear kind of every projection. Each variant's step is value_and_grad(CE + moe_aux_loss) + optax
adamw, jitted with donated state. Repeats are interleaved (variant A, B, C, A, B, C, ...) so that a noisy shared
machine hits all variants alike; the ratio to dense is taken per repeat, and the median is reported. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train import cpu_malloc  # noqa: E402

MALLOC_TUNED = cpu_malloc.tune()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from lostjax.models import Llama, count_params, preset  # noqa: E402


def make_step(cfg):
  graphdef, params, rest = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  tx = optax.adamw(1e-3, weight_decay=0.0)
  opt = tx.init(params)

  def loss_fn(p, tokens):
    logits, aux = nnx.merge(graphdef, p, rest)(tokens[:, :-1], return_aux=True)
    logp = jax.nn.log_softmax(logits, -1)
    ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    return ce + aux.get("moe_aux_loss", 0.0)

  def step(p, o, tokens):
    loss, g = jax.value_and_grad(loss_fn)(p, tokens)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  counts = count_params(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  return step, params, opt, counts


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="small")
  ap.add_argument("--kind", default="dense", help="linear kind of every projection: dense | lowrank | lost")
  ap.add_argument("--experts", type=int, default=4)
  ap.add_argument("--top_k", type=int, default=1)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--variants", default="dense,moe_cf1.0,moe_cf1.25,moe_dropless")
  args = ap.parse_args(argv)

  base = dict(attn_kind=args.kind, mlp_kind=args.kind, max_seq_len=args.seq)
  variants = {}
  for name in args.variants.split(","):
    if name == "dense":
      variants[name] = preset(args.preset, **base)
    elif name == "moe_dropless":
      variants[name] = preset(args.preset, **base, moe_experts=args.experts, moe_top_k=args.top_k)
    elif name.startswith("moe_cf"):
      variants[name] = preset(args.preset, **base, moe_experts=args.experts, moe_top_k=args.top_k,
                              moe_capacity_factor=float(name[len("moe_cf"):]))
    else:
      raise ValueError(f"unknown variant {name!r}")
  vocab = next(iter(variants.values())).vocab_size
  tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, vocab)
  state, compile_s, counts = {}, {}, {}
  for name, cfg in variants.items():
    step, params, opt, counts[name] = make_step(cfg)
    t0 = time.perf_counter()
    params, opt, loss = step(params, opt, tokens)
    jax.block_until_ready(loss)
    compile_s[name] = time.perf_counter() - t0
    state[name] = (step, params, opt)
  per = {name: [] for name in variants}
  for _ in range(args.reps):
    for name in variants:
      step, params, opt = state[name]
      t0 = time.perf_counter()
      for _ in range(args.steps):
        params, opt, loss = step(params, opt, tokens)
      jax.block_until_ready(loss)
      per[name].append(args.batch * args.seq * args.steps / (time.perf_counter() - t0))
      state[name] = (step, params, opt)
  out = {
      "bench": "moe_train_step", "backend": jax.default_backend(), "device": str(jax.devices()[0]),
      "jax": jax.__version__, "preset": args.preset, "kind": args.kind, "experts": args.experts,
      "top_k": args.top_k, "batch": args.batch, "seq": args.seq, "steps_per_rep": args.steps, "reps": args.reps,
      "malloc_tuned": bool(MALLOC_TUNED), "loadavg_end": os.getloadavg(), "variants": {},
  }
  for name in variants:
    row = {"tokens_per_s_median": statistics.median(per[name]), "tokens_per_s": [round(v, 1) for v in per[name]],
           "compile_s": round(compile_s[name], 2), "params_total": counts[name]["total"],
           "params_active": counts[name]["active"]}
    if "dense" in variants and name != "dense":
      ratios = [a / b for a, b in zip(per[name], per["dense"])]
      row["ratio_to_dense_median"] = round(statistics.median(ratios), 3)
      row["ratio_to_dense_per_rep"] = [round(r, 3) for r in ratios]
    out["variants"][name] = row
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
