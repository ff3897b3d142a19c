"""Step-time overhead of the training objectives (MESA, SAF store, loss-based reweighting) vs plain training,
and the memory of the SAF store per example. Prints JSON.

All variants are jitted train steps of the same model (train/step.py, AdamW), timed round-robin in one process so
that the ratios share the machine's noise; reported per variant: median and min seconds per step, and their ratios
to 'plain' (min is the more robust statistic on a loaded machine).
MESA and reweighting start at step 0 (no warm-up) so that their full cost is measured; the SAF store here holds
`--saf-examples` examples (its per-step cost does not depend on N apart from the select over the store that
train/step.py's skip logic does).

  python bench/objectives.py                                  # 60M dense, batch 4 x 128 (CPU-sized)
  python bench/objectives.py --batch 32 --seq 256 --steps 20  # on an accelerator
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from train import objectives  # noqa: E402
from train import state as state_lib  # noqa: E402
from train.configs.base import base_config, model_config  # noqa: E402
from train.objectives import saf  # noqa: E402
from train.step import make_train_step  # noqa: E402

VARIANTS = ("plain", "reweight", "mesa", "saf", "mesa+reweight")


def variant_config(args, name):
  c = base_config()
  c.model = model_config(args.preset, args.method)
  c.model.vocab_size = args.vocab
  c.train.update(dict(global_batch=args.batch, seq_len=args.seq, steps=1000))
  o = c.objectives
  if "mesa" in name:
    o.mesa.enabled = True
    o.mesa.start_step = 0
  if name == "saf":
    o.saf.enabled = True
    o.saf.start_step = 0
  if "reweight" in name:
    o.reweight.update(dict(enabled=True, warmup_steps=0))
  return c


def build(args, name):
  cfg = variant_config(args, name)
  cfg.mesh.num_devices = 1
  run = state_lib.create_train_state(cfg, mesh=state_lib.make_mesh(cfg), num_train_examples=args.saf_examples)
  graphdef, state, rest, tx, schedule = run.graphdef, run.state, run.rest, run.tx, run.schedule
  step = jax.jit(make_train_step(graphdef, tx, schedule, cfg), donate_argnums=(0,))
  return step, state, rest


def batch(args, i):
  rng = np.random.default_rng(i)
  return {"tokens": jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq + 1), dtype=np.int32)),
          "ids": jnp.asarray((np.arange(args.batch) + i * args.batch) % args.saf_examples, jnp.int32)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="60m")
  p.add_argument("--method", default="dense", choices=("dense", "lowrank", "lost"))
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--saf-examples", type=int, default=256)
  args = p.parse_args()
  names = args.variants.split(",")
  if "plain" not in names:
    names = ["plain"] + names
  runs = {}
  for n in names:
    t0 = time.perf_counter()
    step, state, rest = build(args, n)
    state, m = step(state, rest, batch(args, 0))  # compile + first step
    jax.block_until_ready(m["loss"])
    runs[n] = {"step": step, "state": state, "rest": rest, "compile_s": time.perf_counter() - t0, "times": []}
  for i in range(1, args.steps + 1):  # round-robin (rotated): every variant sees the same machine state
    for n in names[i % len(names):] + names[:i % len(names)]:
      r = runs[n]
      b = batch(args, i)
      t0 = time.perf_counter()
      r["state"], m = r["step"](r["state"], r["rest"], b)
      jax.block_until_ready(m["loss"])
      r["times"].append(time.perf_counter() - t0)
  out = {"backend": jax.default_backend(), "devices": jax.device_count(), "preset": args.preset,
         "method": args.method, "batch": args.batch, "seq": args.seq, "vocab": args.vocab, "steps": args.steps,
         "step_s_median": {}, "step_s_min": {}, "ratio_to_plain_median": {}, "ratio_to_plain_min": {},
         "compile_s": {}}
  for stat, fn in (("median", statistics.median), ("min", min)):
    base = fn(runs["plain"]["times"])
    for n in names:
      t = fn(runs[n]["times"])
      out[f"step_s_{stat}"][n] = round(t, 4)
      out[f"ratio_to_plain_{stat}"][n] = round(t / base, 3)
  for n in names:
    out["compile_s"][n] = round(runs[n]["compile_s"], 1)
  # SAF store memory per example (the 60M protocol: seq 256, vocab 32000) for the default and the exact store
  d = objectives.default_objectives_config().saf
  mem = {}
  for k, dtype, e in ((d.topk, d.store_dtype, d.epochs_back), (d.topk, d.store_dtype, 2), (32, "bfloat16", 2),
                      (d.topk, "float32", d.epochs_back)):
    b = saf.store_bytes_per_example(seq_len=256, topk=k, epochs_back=e, vocab_size=32000, store_dtype=dtype)
    mem[f"k={k},E={e},{dtype}"] = {"bytes_per_example": b, "gib_per_1M_examples": round(b * 1e6 / 2**30, 2)}
  full = 3 * 256 * 32000 * 4  # the reference's layout: every logit in float32, Ẽ+1 = 3 slots (Ẽ=2)
  mem["reference_layout_all_logits_float32_3_slots"] = {"bytes_per_example": full,
                                                        "gib_per_1M_examples": round(full * 1e6 / 2**30, 1)}
  if "saf" in runs:  # cross-check with the allocated store
    st = runs["saf"]["state"]["obj"]["store"]
    nbytes = round(sum(x.nbytes for x in jax.tree.leaves(st)) / st["count"].shape[0], 1)  # per row
    mem["measured_bytes_per_example_at_bench_shape"] = nbytes
    mem["formula_bytes_per_example_at_bench_shape"] = saf.store_bytes_per_example(
        seq_len=args.seq, topk=d.topk, epochs_back=d.epochs_back, vocab_size=args.vocab, store_dtype=d.store_dtype)
  out["saf_store_memory_seq256_vocab32000"] = mem
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
