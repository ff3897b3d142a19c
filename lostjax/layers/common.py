"""Shared pieces of the linear-layer kinds: dtype handling, initialisers, activations and validation."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lostjax.activations import ACTIVATIONS, resolve_activation  # noqa: F401  (re-exported)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

def resolve_dtype(dtype) -> jnp.dtype:
  """Accepts a dtype or one of the names in `DTYPES`; raises ValueError naming anything else."""
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]
  return jnp.dtype(dtype)




def check_dims(d_in: int, d_out: int) -> None:
  for name, v in (("d_in", d_in), ("d_out", d_out)):
    if not isinstance(v, int) or v <= 0:
      raise ValueError(f"{name} must be a positive int, got {v!r}")


def check_rank(rank: int, d_in: int, d_out: int) -> None:
  if not isinstance(rank, int) or rank <= 0 or rank >= min(d_in, d_out):
    raise ValueError(
        f"rank must be an int with 0 < rank < min(d_in, d_out) = {min(d_in, d_out)} "
        f"(layer {d_in}x{d_out}), got rank={rank!r}")


def param(value: jax.Array, axes) -> "nnx.Param":
  """An nnx.Param carrying logical axis names; mesh placement is left to lostjax.sharding (no eager sharding)."""
  from flax import nnx
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def dense_init(key: jax.Array, d_in: int, d_out: int, std: float) -> jax.Array:
  """The LLaMA/GaLore initialiser for a linear weight: N(0, std^2), float32, layout [d_in, d_out]."""
  return std * jax.random.normal(key, (d_in, d_out), jnp.float32)


@jax.custom_vjp
def _matmul_tokens_2d(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.dot(x, w)


def _matmul_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _matmul_bwd(res, dy):
  x, w = res
  dw = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())))
  return jnp.dot(dy, w.T).astype(x.dtype), dw.astype(w.dtype)


_matmul_tokens_2d.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """y = x @ w for x [..., d_in], w [d_in, d_out]; same values and gradients as `jnp.dot`.

  On CPU the weight gradient is computed as one 2-D GEMM over the flattened tokens, x[T, d_in]ᵀ·dy[T, d_out]
  (a free reshape), instead of autodiff's contraction over every leading axis: XLA:CPU lowers the latter to a
  transposed copy plus an Eigen contraction (the measured effect is in docs/benchmarks/train_step_cpu.md; values are the
  same).
  Other backends use plain autodiff (not measured there).
  """
  if x.ndim > 2 and jax.default_backend() == "cpu":
    return _matmul_tokens_2d(x, w)
  return jnp.dot(x, w)
