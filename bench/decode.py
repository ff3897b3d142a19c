"""Decode throughput: `lostjax.generate` (KV cache) vs recomputing the whole prefix for every new token.

    python bench/decode.py                       # quickstart-size LOST model, batch 1 and 8, 256 new tokens
    python bench/decode.py --batches 1 --kind dense --baseline_steps 256

Model: the quickstart's (preset 'small' LOST: d=256, 4 layers, rank 64, s=0.05, byte vocab), with max_seq_len =
prompt + new tokens so that both paths attend to the full prefix. Both paths are greedy, jitted, and timed after a
compile run (best of --reps):
  * cache:     `lostjax.generate` (prefill + lax.scan of one-token steps against the KV cache);
  * recompute: a lax.fori_loop that runs the full forward over the [batch, prompt + new] token buffer every step
               (static shapes, causal: the logit at the current end is exact) and writes the argmax.
Each recompute step costs the same, so it is timed over --baseline_steps steps and scaled to the new-token count
(reported as `recompute_steps_timed`). Prints one JSON line per batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import cpu_malloc  # noqa: E402

cpu_malloc.tune()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lostjax import generate as gen  # noqa: E402
from lostjax.models import Llama, preset  # noqa: E402


def recompute_fn(graphdef, prompt_len: int, steps: int):
  @jax.jit
  def run(state, buf):
    model = nnx.merge(graphdef, state)

    def body(i, buf):
      pos = prompt_len + i
      logits = model(buf)
      nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1, keepdims=False), axis=-1)
      return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype), pos, axis=1)

    return jax.lax.fori_loop(0, steps, body, buf)
  return run


def best_time(fn, reps):
  jax.block_until_ready(fn())       # compile
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--kind", default="lost", choices=["dense", "lowrank", "lost"])
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--baseline_steps", type=int, default=64)
  ap.add_argument("--reps", type=int, default=2)
  args = ap.parse_args()
  total = args.prompt + args.new_tokens
  cfg = preset("small", attn_kind=args.kind, mlp_kind=args.kind, max_seq_len=total, dtype=args.dtype)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  steps = min(args.baseline_steps, args.new_tokens)
  for b in [int(x) for x in args.batches.split(",")]:
    prompt = np.asarray(jax.random.randint(jax.random.key(b), (b, args.prompt), 0, cfg.vocab_size), np.int32)
    t_cache = best_time(lambda: gen.generate(model, prompt, args.new_tokens, temperature=0), args.reps)
    buf = jnp.zeros((b, total), jnp.int32).at[:, :args.prompt].set(prompt)
    run = recompute_fn(graphdef, args.prompt, steps)
    t_re = best_time(lambda: run(state, buf), args.reps) * args.new_tokens / steps
    # the two paths produce the same greedy tokens (checked on the timed steps)
    same = bool(np.array_equal(np.asarray(gen.generate(model, prompt, steps, temperature=0)),
                               np.asarray(run(state, buf))[:, args.prompt:args.prompt + steps]))
    print(json.dumps({
        "bench": "decode", "backend": jax.default_backend(), "kind": args.kind, "dtype": args.dtype,
        "preset": "small", "batch": b, "prompt": args.prompt, "new_tokens": args.new_tokens,
        "cache_s": round(t_cache, 4), "cache_tok_s": round(b * args.new_tokens / t_cache, 1),
        "recompute_s": round(t_re, 4), "recompute_tok_s": round(b * args.new_tokens / t_re, 1),
        "recompute_steps_timed": steps, "speedup": round(t_re / t_cache, 2), "same_tokens": same}), flush=True)


if __name__ == "__main__":
  main()
