"""Keep the XLA:CPU step's temporary buffer in the process heap instead of a fresh mmap every step.

A process-wide host setting, so it lives with the application (`train/`), not in the model library.

XLA:CPU allocates the temporaries of a compiled program (one block, `compiled.memory_analysis()
.temp_size_in_bytes`) with malloc at every execution. The block is larger than glibc's mmap threshold, and it is
requested from an XLA worker thread whose malloc arena cannot hold it, so glibc maps fresh pages for it and
unmaps them after the step: every page is zero-filled by the kernel again at every step (page faults and system
time; measurements in docs/benchmarks/train_step_cpu.md).

`tune()` sets three glibc malloc options through `mallopt` (no environment variable, no re-exec):
  * M_ARENA_MAX = 1       every thread allocates from the main arena, which can grow with brk;
  * M_MMAP_MAX = 0        large blocks come from that heap, not from their own mapping;
  * M_TRIM_THRESHOLD = -1  never trim: freed memory at the top of the heap is kept for the next step (a
    finite threshold still lets a large step block go back to the OS every other step).
The price is that freed memory is not handed back to the OS (peak RSS stays higher) and that threads share one malloc lock (small blocks still go through glibc's per-thread
cache). Effective only if called before JAX starts its thread pools (i.e. before the first computation) and
before other threads have allocated: threads that already own an arena keep it and new threads may be handed
one of those (seen in pytest-xdist workers, whose execnet threads start first).

It is applied only on Linux/glibc, only when JAX will run on CPU (JAX_PLATFORMS=cpu, or no GPU/TPU plugin is
installed), and never when LOSTJAX_MALLOC_TUNING=off.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_ACCELERATOR_DISTS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def cpu_only() -> bool:
  """True when JAX will use the CPU backend: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name.startswith(_ACCELERATOR_DISTS):
      return False
  return True


def tune(force: bool = False) -> bool:
  """Applies the malloc options of the module docstring; returns whether they were set."""
  setting = os.environ.get("LOSTJAX_MALLOC_TUNING", "auto").strip().lower()
  if setting not in ("auto", "on", "off"):
    raise ValueError(f"LOSTJAX_MALLOC_TUNING must be auto, on or off, got {setting!r}")
  if setting == "off" or not sys.platform.startswith("linux"):
    return False
  if not (force or setting == "on" or cpu_only()):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(opt, val) == 1 for opt, val in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
                                                     (M_TRIM_THRESHOLD, -1)))
