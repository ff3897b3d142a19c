"""Small input-validation helpers shared by the metrics (no method lives here)."""
from __future__ import annotations

import jax
import numpy as np


def concrete_or_none(x):
  """`x` as a numpy array, or None if it is a JAX tracer (inside jit/vmap/grad) whose values are unknown."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_finite(x, name: str) -> None:
  """ValueError naming `name` if a concrete `x` holds NaN or inf (tracers are not checked)."""
  arr = concrete_or_none(x)
  if arr is not None and arr.size and not np.all(np.isfinite(arr.astype(np.float64))):
    bad = np.argwhere(~np.isfinite(arr.astype(np.float64)))[0].tolist()
    raise ValueError(f"{name} has non-finite values (NaN or inf), first at index {bad}")
