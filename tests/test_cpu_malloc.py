"""train.cpu_malloc: the step's temporary buffer is reused from the heap (few page faults per call).

The fault count is measured in a fresh interpreter that calls `tune()` first, as `train.main` does: inside a
pytest-xdist worker, execnet's threads already own malloc arenas, which XLA's threads may then share.
"""

import json
import os
import subprocess
import sys

import pytest

from train import cpu_malloc

SCRIPT = r"""
import json, resource
from train import cpu_malloc
tuned = cpu_malloc.tune()
import jax, jax.numpy as jnp
x = jnp.ones((32768, 256), jnp.float32)
w = jnp.full((256, 512), 0.01, jnp.float32)
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ w.T, axis=0))
f(x, w).block_until_ready()
faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _faults(setting):
  env = dict(os.environ, LOSTJAX_MALLOC_TUNING=setting, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                       check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_big_temporaries_do_not_fault_every_call():
  # The [32768, 512] f32 product alone is 64 MiB = 16,384 pages. Untuned, every call maps its temporaries
  # afresh and faults on every page (measured: ~31,000 faults per call; 71,000 per quickstart step); tuned,
  # the blocks come back from the heap (measured: 0).
  off, on = _faults("off"), _faults("on")
  assert not off["tuned"] and on["tuned"]
  assert min(off["faults"]) > 16_000, off
  assert min(on["faults"]) < 2_000, on


def test_settings(monkeypatch):
  monkeypatch.setenv("LOSTJAX_MALLOC_TUNING", "off")
  assert cpu_malloc.tune(force=True) is False
  monkeypatch.setenv("LOSTJAX_MALLOC_TUNING", "sometimes")
  with pytest.raises(ValueError, match="sometimes"):
    cpu_malloc.tune()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not cpu_malloc.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert cpu_malloc.cpu_only()
