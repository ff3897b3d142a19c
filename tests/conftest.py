"""Test setup: 8 fake CPU devices so that sharding tests run on one host.

The flag must be set before JAX initialises its backends, hence at import time here.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import tempfile  # noqa: E402

from train import cpu_malloc  # noqa: E402

cpu_malloc.tune()  # as train.main does (partly effective under xdist: see train/cpu_malloc.py)


import jax  # noqa: E402

# Many tests build the same tiny models and train steps through fresh jit objects (every trainer.train call);
# a persistent compilation cache keyed on the HLO lets repeated compilations be served from disk.
jax.config.update("jax_compilation_cache_dir", os.environ.get("LOSTJAX_TEST_JAX_CACHE") or tempfile.mkdtemp(prefix="lostjax-jax-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
