"""Benchmarks for lostjax.metrics: Swiss-round Monte Carlo, scaling-law fits, gradient spectra (chunked vmap).

Prints one JSON object per measurement. Example:
  python bench/metrics.py --only swiss,scaling,spectra --preset tiny --samples 16 --seq-len 64
"""
import argparse
import importlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, repeat=1):
  t = time.perf_counter()
  for _ in range(repeat):
    out = fn()
  return out, (time.perf_counter() - t) / repeat


def bench_swiss(num_sims):
  from lostjax.metrics import swiss_round
  scores = np.random.default_rng(0).normal(size=(29, 38))   # the paper's 29 models x 38 benchmarks
  for elim in (0, 1):
    _, first = timed(lambda: swiss_round(scores, num_simulations=num_sims, elimination=elim))
    res, second = timed(lambda: swiss_round(scores, num_simulations=num_sims, elimination=elim, seed=1))
    print(json.dumps(dict(bench="swiss_round", models=29, benchmarks=38, simulations=num_sims, elimination=elim,
                          first_call_s=round(first, 3), warm_s=round(second, 3),
                          max_std_error=float(res.std_error.max()), backend=jax.default_backend())))


def bench_scaling():
  from lostjax.metrics import fit_scaling_law
  true = np.array([6.0073404, 6.0179186, 0.5267228, 0.33917084, 0.2849083])
  n, d = np.meshgrid(np.geomspace(2e7, 2e9, 5), np.geomspace(1e9, 1e11, 40), indexing="ij")
  n, d = n.ravel(), d.ravel()
  loss = (np.exp(true[2]) + np.exp(true[0]) / n ** true[3] + np.exp(true[1]) / d ** true[4]) * np.exp(
      np.random.default_rng(0).normal(0, 2e-3, n.shape))
  for method in ("huber", "least_squares"):
    _, first = timed(lambda: fit_scaling_law(n, d, loss, method=method))
    fit, second = timed(lambda: fit_scaling_law(n, d, loss, method=method))
    print(json.dumps(dict(bench="fit_scaling_law", method=method, points=int(n.size), first_call_s=round(first, 3),
                          warm_s=round(second, 3), max_param_error=float(np.abs(fit.params - true).max()),
                          backend=jax.default_backend())))


def bench_spectra(preset, kind, samples, seq_len, chunks):
  from flax import nnx
  from lostjax.models import Llama, preset as make_preset
  gs = importlib.import_module("lostjax.metrics.gradient_spectra")
  cfg = make_preset(preset, attn_kind=kind, mlp_kind=kind, vocab_size=32000, max_seq_len=seq_len)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(samples, seq_len)).astype(np.int32)

  def loss_fn(p, tok):
    logits = nnx.merge(graphdef, p, rest)(tok[None, :-1])[0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tok[1:, None], axis=-1))

  gammas = gs.lost_gammas(model) or 0.5
  dev = jax.devices()[0]
  for chunk in chunks:
    _, first = timed(lambda: gs.gradient_spectra(loss_fn, params, tokens, static=rest, gamma=gammas,
                                                 chunk_size=chunk, include_mlp=True))
    spec, second = timed(lambda: gs.gradient_spectra(loss_fn, params, tokens, static=rest, gamma=gammas,
                                                     chunk_size=chunk, include_mlp=True))
    stats = dev.memory_stats() or {}
    print(json.dumps(dict(bench="gradient_spectra", preset=preset, kind=kind, samples=samples, seq_len=seq_len,
                          chunk_size=chunk, first_call_s=round(first, 3), warm_s=round(second, 3),
                          per_sample_ms=round(1e3 * second / samples, 2),
                          peak_bytes=stats.get("peak_bytes_in_use"), matrices=len(spec.names),
                          backend=jax.default_backend())))
  # baseline: one jitted jax.grad per sample (python loop) + numpy-free spectra of the kernels in jit
  grad_fn = jax.jit(jax.grad(loss_fn))
  grad_fn(params, tokens[0])
  t = time.perf_counter()
  for i in range(samples):
    jax.block_until_ready(grad_fn(params, tokens[i]))
  loop = time.perf_counter() - t
  print(json.dumps(dict(bench="per_sample_grad_loop_baseline", preset=preset, kind=kind, samples=samples,
                        seq_len=seq_len, grads_only_s=round(loop, 3), per_sample_ms=round(1e3 * loop / samples, 2),
                        backend=jax.default_backend())))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="swiss,scaling,spectra")
  p.add_argument("--sims", type=int, default=100_000)
  p.add_argument("--preset", default="tiny")
  p.add_argument("--kinds", default="dense,lost")
  p.add_argument("--samples", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--chunks", default="1,8")
  a = p.parse_args()
  only = a.only.split(",")
  if "swiss" in only:
    bench_swiss(a.sims)
  if "scaling" in only:
    bench_scaling()
  if "spectra" in only:
    for kind in a.kinds.split(","):
      bench_spectra(a.preset, kind, a.samples, a.seq_len, [int(c) for c in a.chunks.split(",")])


if __name__ == "__main__":
  main()
