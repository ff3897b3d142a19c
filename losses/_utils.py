"""Shared helpers for the loss library: input validation, masked reductions, stable primitives.

Private module (not part of the public API). Everything here is a pure function usable under
`jax.jit`, `jax.grad` and `jax.vmap`; validation only inspects static properties (shapes, dtypes,
Python hyperparameters), never traced values.
"""
from typing import Optional

import jax
import jax.numpy as jnp


def compute_dtype(*xs):
  """float32 for bf16/f16/int inputs, float64 if any input is float64 (tests under x64)."""
  dt = jnp.float32
  for x in xs:
    if x is not None and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      dt = jnp.promote_types(dt, jnp.asarray(x).dtype)
  return dt


def as_float(name: str, x, dtype=None):
  """Converts `x` to a floating array (at least float32); rejects non-numeric input."""
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
          or x.dtype == jnp.bool_):
    raise ValueError(f"{name} must be a numeric array, got dtype {x.dtype}")
  return x.astype(dtype if dtype is not None else compute_dtype(x))


def check_float_array(name: str, x):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
  return x


def check_int_array(name: str, x):
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
    raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
  return x


def check_ndim(name: str, x, ndim):
  ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
  if jnp.ndim(x) not in ndims:
    raise ValueError(f"{name} must have ndim in {ndims}, got shape {jnp.shape(x)}")


def check_shape(name: str, x, shape):
  if tuple(jnp.shape(x)) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {jnp.shape(x)}")


def check_matrix(x_name: str, x, dim: Optional[int] = None):
  """A float [N, D] matrix (D == dim when given), or a ValueError naming it."""
  x = check_float_array(x_name, x)
  check_ndim(x_name, x, 2)
  if dim is not None and x.shape[1] != dim:
    raise ValueError(f"{x_name} must have dim {dim}, got shape {x.shape}")
  return x


def check_labeled_matrix(x_name: str, x, y_name: str, y, dim: Optional[int] = None):
  """A float [N, D] matrix (D == dim when given) and its int [N] labels, or a ValueError naming the bad one."""
  x = check_matrix(x_name, x, dim)
  if y is None:
    raise ValueError(f"{y_name} is required with {x_name}")
  y = check_int_array(y_name, y)
  check_shape(y_name, y, x.shape[:1])
  return x, y


def check_positive(name: str, v, allow_zero: bool = False):
  try:
    ok = (v >= 0) if allow_zero else (v > 0)
    ok = bool(ok)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return  # traced hyperparameter: cannot be checked statically
  if not ok:
    raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def check_choice(name: str, v, choices):
  if v not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {v!r}")


def mask_or_ones(name: str, where, shape):
  """Validates an optional boolean mask (None → all True) against `shape`."""
  if where is None:
    return jnp.ones(shape, bool)
  where = jnp.asarray(where)
  if tuple(where.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {where.shape}")
  return where.astype(bool)


def masked_logsumexp(x, mask, axis=-1, add_one: bool = False):
  """log Σ_{mask} exp(x) along `axis` (log(1 + Σ …) if `add_one`); empty rows give 0.

  Finite values and gradients (zeros) for fully masked rows: masked entries are replaced by
  -inf before the reduction and empty rows are evaluated on a dummy all-zero row.
  """
  mask = jnp.broadcast_to(mask, x.shape)
  any_ = jnp.any(mask, axis=axis, keepdims=True)
  if add_one:
    zero_shape = list(x.shape)
    zero_shape[axis] = 1
    xs = jnp.where(mask, x, -jnp.inf)
    xs = jnp.concatenate([xs, jnp.zeros(zero_shape, x.dtype)], axis=axis)
    return jax.nn.logsumexp(xs, axis=axis)
  xs = jnp.where(mask | ~any_, jnp.where(any_, x, 0.), -jnp.inf)
  lse = jax.nn.logsumexp(xs, axis=axis)
  return jnp.where(jnp.squeeze(any_, axis), lse, 0.)


def safe_mean(x, mask=None, axis=None):
  """Mean of `x` over `mask` (sum / max(count, 1)); 0 where the mask is empty."""
  if mask is None:
    return jnp.mean(x, axis=axis)
  mask = jnp.broadcast_to(mask, x.shape)
  total = jnp.sum(jnp.where(mask, x, 0.), axis=axis)
  count = jnp.sum(mask, axis=axis)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.)


def l2_normalize(x, eps: float = 1e-12, axis: int = -1):
  """torch `F.normalize` semantics: x / max(||x||, eps), with a safe norm gradient at 0."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  safe = jnp.where(sq > 0, sq, 1.)
  norm = jnp.where(sq > 0, jnp.sqrt(safe), 0.)
  return x / jnp.maximum(norm, eps)


def safe_sqrt(x):
  """sqrt with a zero (not infinite/NaN) gradient at 0."""
  safe = jnp.where(x > 0, x, 1.)
  return jnp.where(x > 0, jnp.sqrt(safe), 0.)


def masked_min(x, mask, axis=-1, empty=jnp.inf):
  m = jnp.min(jnp.where(mask, x, jnp.inf), axis=axis)
  return jnp.where(jnp.any(mask, axis=axis), m, empty)


def masked_max(x, mask, axis=-1, empty=-jnp.inf):
  m = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis)
  return jnp.where(jnp.any(mask, axis=axis), m, empty)


def resolve_where(where: Optional[jax.Array], shape, name: str = "where"):
  return mask_or_ones(name, where, shape)
