"""lostjax.cpu_malloc: the step's temporary buffer is reused from the heap (few page faults per call)."""

import resource
import sys

import jax
import jax.numpy as jnp
import pytest

from lostjax import cpu_malloc

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")


@linux
def test_big_temporaries_do_not_fault_every_call():
  # conftest.py called cpu_malloc.tune() before JAX started (as train.main does); calling it again is harmless.
  assert cpu_malloc.tune()
  x = jnp.ones((32768, 256), jnp.float32)
  w = jnp.full((256, 512), 0.01, jnp.float32)
  f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ w.T, axis=0))
  f(x, w).block_until_ready()
  faults = []
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  # The [32768, 512] f32 product alone is 64 MiB = 16,384 pages. Untuned, every call maps its temporaries
  # afresh and faults on every page (measured: 31,350 faults per call with LOSTJAX_MALLOC_TUNING=off; 71,000
  # per quickstart step); tuned, the blocks come back from the heap (measured: 0).
  assert min(faults) < 2000, faults


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
