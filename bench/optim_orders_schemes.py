"""FRUGAL blockwise orders (descending vs mirror, 60M matrices) and TRP conv schemes (NC/VH/ND, ResNet-20 convs):
time of one jitted optimizer update, round-robin in one process. Prints one JSON line.

  python bench/optim_orders_schemes.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import json, time
import jax, jax.numpy as jnp, numpy as np, optax
from optim import frugal, trp

def compiled(tx, params):
  g = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  st, upd = tx.init(params), jax.jit(tx.update)
  jax.block_until_ready(upd(g, st, params))  # compile
  return lambda: jax.block_until_ready(upd(g, st, params))

def round_robin(fns, reps=7):  # interleaved so that load changes hit every variant alike
  t = {k: [] for k in fns}
  for _ in range(reps):
    for k, f in fns.items():
      t0 = time.perf_counter(); f(); t[k].append((time.perf_counter() - t0) * 1e3)
  return {k: {"min_ms": round(min(v), 1), "median_ms": round(float(np.median(v)), 1)} for k, v in t.items()}

rng = np.random.default_rng(0)
mat = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.02)
d, ff = 512, 1376  # 60M: 8 layers, 56 matrices
llama = {i: {"q": mat(d, d), "k": mat(d, d), "v": mat(d, d), "o": mat(d, d), "gate": mat(d, ff), "up": mat(d, ff),
             "down": mat(ff, d)} for i in range(8)}
llama = jax.tree.map(lambda w: {"kernel": w}, llama)
out = {"frugal_60M": round_robin({o: compiled(frugal(1e-3, rho=0.25, update_gap=2, proj_type="blockwise",
                                                     block_order=o), llama) for o in ("descending", "mirror")})}
shapes = [(16, 16)] * 6 + [(16, 32)] + [(32, 32)] * 5 + [(32, 64)] + [(64, 64)] * 5  # ResNet-20 3x3 convs but the first
convs = {f"conv{i}": {"kernel": jnp.asarray(rng.normal(size=(3, 3, c, n)).astype(np.float32) * 0.1)}
         for i, (c, n) in enumerate(shapes)}
out["trp_resnet20_period1"] = round_robin({s: compiled(trp(optax.sgd(0.1, momentum=0.9), period=1, scheme=s), convs)
                                           for s in ("channel", "spatial", "decouple")})
out["jax"], out["backend"] = jax.__version__, jax.default_backend()
print(json.dumps(out))
