"""Input pipeline throughput (tokens/s delivered per process) and its cost inside a train step.

Part 1, throughput: `train.data.make_data` on the standard-library corpus (source='stdlib') with the streaming
pipeline (read -> tokenize -> pack, nothing cached) and the cached pipeline (memmap reads after the one-off
tokenization), for the byte, SentencePiece and Hugging Face `tokenizers` tokenizers. Tokens/s = batches × batch ×
seq_len / time from the first batch on (including every read and tokenizer call made so far; the default 250
batches of 64 × 256 = 4.1M tokens cover most of the corpus), with prefetch off (the pipeline's own rate; with
prefetch the consumer sees the same rate in steady state). The SentencePiece model (BPE) and the HF
tokenizer.json (byte-level BPE) are trained here on the first `--tok-train-bytes` of the corpus with `--vocab`
pieces, unless `--sp-model` / `--hf-tokenizer` give files (e.g. T5's spiece.model / tokenizer.json).

Part 2, overlap: a small LLaMA train step (`--model small,lost`, byte vocabulary) built as the trainer builds
it, timed step by step in alternating order (ABBA...) (a) on one preloaded device batch and (b) with
`next(bundle.train)` from the streaming pipeline (prefetch 2, grain's background thread) + `jnp.asarray`.
Ratio = median step time (b) / median (a); the target is <= 1.02.

  python bench/data.py                      # both parts, ~2-3 min on 2 cores
  python bench/data.py --only throughput --batches 20
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train import cpu_malloc  # noqa: E402

MALLOC_TUNED = cpu_malloc.tune()

import numpy as np  # noqa: E402

from train.data import default_data_config, make_data, sources  # noqa: E402


def corpus_lines(max_bytes):
  docs = sources.capped(sources.file_documents(sources.stdlib_files()), max_bytes)
  for d in docs:
    for line in d.split(b"\n"):
      if line.strip():
        yield line.decode("utf-8", errors="ignore")


def train_tokenizers(out_dir, vocab, max_bytes):
  from train.data.train_tokenizer import train_sentencepiece
  sp = train_sentencepiece(corpus_lines(max_bytes), os.path.join(out_dir, "sp.model"), vocab, num_threads=2)
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus_lines(max_bytes), trainer=trainer)
  hf = os.path.join(out_dir, "tokenizer.json")
  tok.save(hf)
  return sp, hf


def throughput(tok, path, pipeline, batch, seq, n_batches, cache_dir):
  c = default_data_config()
  c.update(source="stdlib", tokenizer=tok, tokenizer_path=path, pipeline=pipeline, prefetch=0,
           eval_max_tokens=4096, cache_dir=cache_dir)
  t0 = time.perf_counter()
  b = make_data(c, seq_len=seq, global_batch=batch, seed=0)
  setup = time.perf_counter() - t0
  # Timed from the first batch on: every document read and tokenized so far is in the time, and the tokens not
  # yet handed out (at most one chunk of documents per shard) are not credited, so the rate is a lower bound.
  t0 = time.perf_counter()
  for _ in range(n_batches):
    next(b.train)
  dt = time.perf_counter() - t0
  return {"tokenizer": tok, "pipeline": pipeline, "setup_s": round(setup, 2),
          "tokens_per_s": round(n_batches * batch * seq / dt), "s_per_batch": round(dt / n_batches, 4)}


def overlap(model, batch, seq, rounds, steps_per_round):
  import jax
  import jax.numpy as jnp
  from train import state as state_lib
  from train.configs.llama import get_config
  from train.step import make_train_step

  size, method = model.split(",")
  cfg = get_config(f"{size},{method}")
  cfg.train.global_batch, cfg.train.seq_len, cfg.train.steps, cfg.mesh.num_devices = batch, seq, 1000, 1
  c = default_data_config()
  c.update(source="stdlib", pipeline="stream", prefetch=2, eval_max_tokens=4096, cache_dir="")
  bundle = make_data(c, seq_len=seq, global_batch=batch, seed=0)
  run = state_lib.create_train_state(cfg, mesh=state_lib.make_mesh(cfg), vocab_size=bundle.vocab_size)
  state, rest = run.state, run.rest
  step_fn = jax.jit(make_train_step(run.graphdef, run.tx, run.schedule, cfg), donate_argnums=(0,))

  def put(b):
    return {k: jnp.asarray(v) for k, v in b.items() if k in ("tokens", "ids", "mask")}

  pre = put(next(bundle.train))
  state, m = step_fn(state, rest, pre)
  jax.block_until_ready(m)
  times = {"preloaded": [], "pipeline": []}
  for r in range(rounds):  # Alternate every `steps_per_round` steps (ABBA order), so drift in load cancels.
    for mode in (("preloaded", "pipeline") if r % 2 == 0 else ("pipeline", "preloaded")):
      for _ in range(steps_per_round):
        t0 = time.perf_counter()
        b = pre if mode == "preloaded" else put(next(bundle.train))
        state, m = step_fn(state, rest, b)
        jax.block_until_ready(m)
        times[mode].append(time.perf_counter() - t0)
  # CPU time of the whole process (the prefetch thread included) per batch of the pipeline alone.
  c0 = time.process_time()
  for _ in range(200):
    next(bundle.train)
  cpu_ms = (time.process_time() - c0) / 200 * 1e3
  a, p = statistics.median(times["preloaded"]), statistics.median(times["pipeline"])
  return {"model": model, "batch": batch, "seq_len": seq, "rounds": rounds, "steps_per_round": steps_per_round,
          "step_s_preloaded": round(a, 4), "step_s_pipeline": round(p, 4), "ratio": round(p / a, 4),
          "train_tokens_per_s": round(batch * seq / a), "pipeline_cpu_ms_per_batch": round(cpu_ms, 3),
          "pipeline_cpu_share_of_step": round(cpu_ms / 1e3 / a, 5), "all_s": {k: [round(x, 4) for x in v] for k, v in
                                                                    times.items()}}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", default="throughput,overlap")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--batches", type=int, default=250)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--tok-train-bytes", type=int, default=4_000_000)
  ap.add_argument("--sp-model", default="")
  ap.add_argument("--hf-tokenizer", default="")
  ap.add_argument("--model", default="small,lost")
  ap.add_argument("--step-batch", type=int, default=16)
  ap.add_argument("--step-seq", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=40)
  ap.add_argument("--steps-per-round", type=int, default=1)
  a = ap.parse_args(argv)
  only = set(a.only.split(","))
  out = {"bench": "data", "malloc_tuned": MALLOC_TUNED, "cpu_count": os.cpu_count()}
  with tempfile.TemporaryDirectory() as tmp:
    if "throughput" in only:
      t0 = time.perf_counter()
      sp, hf = a.sp_model, a.hf_tokenizer
      if not (sp and hf):
        sp2, hf2 = train_tokenizers(tmp, a.vocab, a.tok_train_bytes)
        sp, hf = sp or sp2, hf or hf2
      out["tokenizer_training_s"] = round(time.perf_counter() - t0, 1)
      rows = []
      for tok, path in (("byte", ""), ("sentencepiece", sp), ("hf", hf)):
        for pipe in ("stream", "cached"):
          rows.append(throughput(tok, path, pipe, a.batch, a.seq, a.batches, os.path.join(tmp, "cache")))
          print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
      out["throughput"] = {"batch": a.batch, "seq_len": a.seq, "batches": a.batches, "vocab": a.vocab,
                           "rows": rows}
    if "overlap" in only:
      out["overlap"] = overlap(a.model, a.step_batch, a.step_seq, a.rounds, a.steps_per_round)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
