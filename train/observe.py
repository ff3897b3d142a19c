"""Observability helpers for the training loop: MFU, a profiler window, the persistent compilation cache.

* `mfu(tokens_per_s, flops_per_token, n_devices, peak)`: model FLOPs utilisation, the fraction of the devices'
  peak FLOP/s that the model's FLOPs (train/flops.py: 6·N_matmul + 12·L·d·T per token, PaLM's convention,
  arXiv 2204.02311 appendix B) use at the measured throughput.
* `ProfileWindow(spec, workdir)`: `train.profile_steps="start:stop"` traces the steps start+1 … stop (the
  updates numbered start … stop−1, 0-based) with `jax.profiler` into `<workdir>/profile` (TensorBoard's profile
  plugin or Perfetto read it). "" traces nothing.
* `enable_compile_cache(directory)`: `system.compile_cache_dir` turns on JAX's persistent compilation cache, so a
  restarted or resumed run loads the compiled step instead of recompiling it. "" leaves JAX's settings alone.
"""

from __future__ import annotations

import jax


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
  """tokens_per_s · flops_per_token / (n_devices · peak); None when the peak is unknown (e.g. CPU)."""
  if peak is None:
    return None
  if peak <= 0 or n_devices < 1:
    raise ValueError(f"peak FLOP/s per device must be > 0 and n_devices >= 1, got peak={peak!r}, "
                     f"n_devices={n_devices!r}")
  return tokens_per_s * flops_per_token / (n_devices * peak)


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """"start:stop" -> (start, stop) with 0 <= start < stop; "" -> None."""
  if spec is None or spec == "":
    return None
  parts = str(spec).split(":")
  try:
    start, stop = (int(p) for p in parts) if len(parts) == 2 else (None, None)
  except ValueError:
    start = stop = None
  if start is None or start < 0 or stop <= start:
    raise ValueError(f"train.profile_steps must be '' or 'start:stop' with 0 <= start < stop, got {spec!r}")
  return start, stop


class ProfileWindow:
  """Starts a jax.profiler trace before update `start` and stops it after update `stop - 1` (0-based updates).

  Call `before(step)` with the number of updates done before running the next one, and `after(step)` with the
  number done after it; `close()` stops a trace still running (run ended or stopped inside the window).
  """

  def __init__(self, spec: str, workdir: str):
    self.window = parse_profile_steps(spec)
    self.directory = f"{workdir}/profile"
    self.active = False

  def before(self, step: int) -> None:
    if self.window and not self.active and self.window[0] <= step < self.window[1]:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, block_on=None) -> None:
    if self.active and step >= self.window[1]:
      if block_on is not None:
        jax.block_until_ready(block_on)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def enable_compile_cache(directory: str) -> bool:
  """Turns on JAX's persistent compilation cache in `directory` (every compiled program is cached); "" = off."""
  if not directory:
    return False
  if not isinstance(directory, str):
    raise ValueError(f"system.compile_cache_dir must be a path string, got {directory!r}")
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return True
