"""The SVD-based optimizers (GaLore, TRP, LIFT) finish training steps on CPU: no deadlock of batched LAPACK calls.

A batched SVD on XLA:CPU splits its batch over the intra-op thread pool and blocks its own pool thread until the
pieces are done; with as many such calls at once as the pool has threads, the step never finishes (zero CPU, the
host waiting in BlockUntilReady). `optim.projection.map_matrices` issues one matrix per LAPACK call on CPU. The
runs here are the configurations that hung (TRP on a LOST model; GaLore and LIFT on a 2-device fsdp mesh), each
in a subprocess with a time limit so that a hang fails the test instead of blocking the suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optim import projection as pj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One subprocess trains every configuration of argv (2 steps each) and prints one JSON line per run.
SCRIPT = r"""
import json, os, sys, tempfile
import jax
if os.environ.get("LOSTJAX_TEST_JAX_CACHE"):
  jax.config.update("jax_compilation_cache_dir", os.environ["LOSTJAX_TEST_JAX_CACHE"])
from train import trainer
from train.configs.base import base_config, model_config

def config(optim, method, fsdp):
  c = base_config()
  c.model = model_config("tiny", method)   # d 64, 2 layers: big enough for a batched SVD to use the thread pool
  c.model.max_seq_len = 16
  c.data.update(dict(source="synthetic", eval_max_tokens=0, cache_dir="none"))
  c.mesh.update(dict(num_devices=fsdp, fsdp=fsdp))
  c.optim.name = optim
  c.optim.galore.update(dict(rank=2, update_gap=1))
  c.optim.trp.period = 2                   # nuclear sub-gradient at step 1, projection at step 2
  c.optim.lift.update(dict(lora_rank=2, filter_rank=2, update_gap=2))   # masks refreshed at step 2
  c.train.update(dict(steps=2, global_batch=4, seq_len=16, log_every=1, eval_every=0, ckpt_every=0,
                      progress=False, plot=False))
  return c

for spec in sys.argv[1:]:
  optim, method, fsdp = spec.split(":")
  out = trainer.train(config(optim, method, int(fsdp)), tempfile.mkdtemp())
  print(json.dumps({"run": spec, "final_step": out["final_step"], "loss": out["train_loss"]}), flush=True)
"""

LIMIT_S = 600   # a run takes well under a minute on 2 idle cores (minutes on a loaded machine); a hang never ends


def _run(specs, timeout=LIMIT_S):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env["LOSTJAX_TEST_JAX_CACHE"] = jax.config.jax_compilation_cache_dir or ""
  try:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *specs], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    done = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    pytest.fail(f"training did not finish within {timeout} s (a hang); finished runs: {done.strip() or 'none'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]


def _check(specs):
  rows = _run(specs)
  assert [r["run"] for r in rows] == specs
  for r in rows:
    assert r["final_step"] == 2 and np.isfinite(r["loss"]), r


@pytest.mark.slow   # a full train-step compile in a subprocess; test_map_matrices_is_the_vmapped_function keeps the
# structural check (no batched LAPACK call on CPU) in the default run
def test_trp_trains_a_lost_model_without_hanging():
  """The quickstart's hang: TRP's SVDs of the LOST factors, several batched groups in one step."""
  _check(["trp:lost:1"])


@pytest.mark.slow   # two more full train-step compilations; the default run keeps the TRP case above
def test_galore_and_lift_train_on_a_2_device_fsdp_mesh_without_hanging():
  _check(["galore:lost:2", "lift:dense:2"])


def test_map_matrices_is_the_vmapped_function():
  """The CPU path (one matrix per call in a sequential map) computes what the vmapped path computes."""
  x = jax.random.normal(jax.random.key(0), (3, 6, 4))
  fn = lambda m, s: (pj.svd_basis(m, 0, 2) * s, jnp.linalg.svd(m, compute_uv=False))
  scale = jnp.arange(1.0, 4.0)
  got = pj.map_matrices(fn, x, scale)
  want = jax.vmap(fn)(x, scale)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
  assert pj.one_matrix_per_lapack_call() == (jax.default_backend() == "cpu")
  u, s, vh = pj.svd(x.reshape(3, 1, 6, 4))
  assert u.shape == (3, 1, 6, 4) and s.shape == (3, 1, 4) and vh.shape == (3, 1, 4, 4)
  np.testing.assert_allclose(np.asarray((u * s[..., None, :]) @ vh), np.asarray(x.reshape(3, 1, 6, 4)), atol=1e-5)
  if pj.one_matrix_per_lapack_call():   # no batched LAPACK call in the compiled program
    hlo = jax.jit(lambda v: pj.map_matrices(lambda m: jnp.linalg.svd(m)[1], v)).lower(x).as_text()
    assert "while" in hlo
