"""Column-gather matmul ``y = x[..., idx] @ w`` with a custom VJP: the LOST sparse branch.

LOST: Low-rank and Sparse Pre-training for LLMs (Li et al., arXiv 2508.02668), sparse term of
``y = gamma * sigma(x A) B + (1 - gamma) * x[..., I] W_s`` (spec lost_trp_lift.md §1.2, §1.8).

Forward:   y  = x[..., idx] @ w                      (accumulated in float32, returned as x.dtype)
Backward:  dw = x[..., idx]^T dy                     (contracted over all leading dims)
           dx = scatter(dy w^T into the idx columns)  (idx sorted & unique => no write conflicts)
           idx gets no gradient.

Implementations (``impl``):
* ``'xla'``: ``jnp.take`` + dot; the backward reuses the gathered ``x[..., idx]`` saved by the forward
  (tokens x k, i.e. s = k/d_in of x) for ``dw`` and builds ``dx`` either by ``.at[..., idx].add`` into
  zeros (``dx_mode='scatter'``; XLA's simplifier folds ``A + scatter(0, ...)`` into an in-place
  scatter into A when the result is summed with the other branches' input gradient) or by a one-hot
  transpose GEMM ``(dy w^T) @ P^T`` with ``P = one_hot(idx, d_in)^T`` (``dx_mode='onehot'``).
* ``'pallas'``: fused Triton kernel for the forward and for ``dw`` (pallas_gather_matmul.py; or XLA
  take + dot for ``dw`` with ``pallas_dw=False``); ``dx`` as in the XLA path. On CPU it runs in
  interpret mode. Under an active mesh with more than one device, the kernels are wrapped in
  ``jax.shard_map`` over the batch axes (``batch_axes`` present in the mesh), with ``idx``/``w``
  replicated and ``dw`` summed with ``psum`` (``check_vma=False``, because Pallas kernels fail the
  varying-manual-axes check, spec jax_stack.md §7.2 pitfall 2). If the leading dim does not divide
  over those axes, the call silently uses the XLA path.
* ``'auto'``: ``'pallas'`` on a GPU backend where the kernels compile (probed once, ahead of time;
  otherwise a warning and ``'xla'``), else ``'xla'``; the environment variable
  ``LOSTJAX_GATHER_IMPL=xla|pallas`` overrides the choice made by ``'auto'``.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lostjax.kernels import pallas_gather_matmul as _pk

__all__ = ["gather_matmul", "resolve_impl", "batch_shard_axes", "pallas_compiles"]

_IMPLS = ("auto", "xla", "pallas")
_DX_MODES = ("scatter", "onehot")
DEFAULT_BATCH_AXES = ("data", "fsdp")


class _Cfg(NamedTuple):
  impl: str
  interpret: bool
  dx_mode: str
  blocks: tuple | None
  axes: tuple | None  # mesh axes sharding the leading dim for shard_map, or None
  d_in: int
  pallas_dw: bool  # pallas path: weight gradient by the Pallas kernel (True) or XLA take + dot


def dot_f32(a, b, dims):
  """dot_general without batch dims, float32 accumulation and float32 result.

  XLA:CPU has no bf16 x bf16 -> f32 dot thunk for every layout, so on CPU the operands are
  upcast first (exact: bf16 -> f32 is lossless); on GPU/TPU the bf16 GEMM accumulates in f32.
  """
  if jax.default_backend() == "cpu":
    a, b = a.astype(jnp.promote_types(a.dtype, jnp.float32)), b.astype(
        jnp.promote_types(b.dtype, jnp.float32))
  return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


_dot32 = dot_f32


def _take(x, idx):
  return jnp.take(x, idx, axis=-1, indices_are_sorted=True, unique_indices=True, mode="clip")


def _scatter_dx(dxg, idx, d_in, dx_mode):
  """Dense [..., d_in] input gradient with ``dxg`` [..., k] placed in the idx columns."""
  if dx_mode == "onehot":
    onehot = jax.nn.one_hot(idx, d_in, dtype=dxg.dtype)  # [k, d_in], exact 0/1
    return _dot32(dxg, onehot, ((dxg.ndim - 1,), (0,))).astype(dxg.dtype)
  zeros = jnp.zeros(dxg.shape[:-1] + (d_in,), dxg.dtype)
  return zeros.at[..., idx].add(dxg, indices_are_sorted=True, unique_indices=True)


# ----------------------------------------------------------------------------- pallas + shard_map

def _pallas_fwd_local(x, idx, w, cfg):
  x2 = x.reshape(-1, x.shape[-1])
  y2 = _pk.gather_matmul_fwd(x2, idx, w, blocks=cfg.blocks, interpret=cfg.interpret)
  return y2.reshape(x.shape[:-1] + (w.shape[1],))


def _pallas_dw_local(x, idx, dy, cfg):
  x2 = x.reshape(-1, x.shape[-1])
  dy2 = dy.reshape(-1, dy.shape[-1])
  return _pk.gather_matmul_dw(x2, idx, dy2, blocks=cfg.blocks, interpret=cfg.interpret)


def _batch_spec(ndim, axes):
  return P(axes, *([None] * (ndim - 1)))


def _pallas_fwd(x, idx, w, cfg):
  if cfg.axes is None:
    return _pallas_fwd_local(x, idx, w, cfg)
  spec = _batch_spec(x.ndim, cfg.axes)
  f = jax.shard_map(lambda xs, i, ws: _pallas_fwd_local(xs, i, ws, cfg),
                    in_specs=(spec, P(), P()), out_specs=spec, check_vma=False)
  return f(x, idx, w)


def _pallas_dw(x, idx, dy, cfg):
  if cfg.axes is None:
    return _pallas_dw_local(x, idx, dy, cfg)
  spec = _batch_spec(x.ndim, cfg.axes)
  f = jax.shard_map(
      lambda xs, i, dys: jax.lax.psum(_pallas_dw_local(xs, i, dys, cfg), cfg.axes),
      in_specs=(spec, P(), spec), out_specs=P(), check_vma=False)
  return f(x, idx, dy)


# ----------------------------------------------------------------------------- custom VJP

def _fwd_value(x, idx, w, cfg):
  if cfg.impl == "pallas":
    return _pallas_fwd(x, idx, w, cfg), None
  xg = _take(x, idx)
  y = _dot32(xg, w.astype(x.dtype), ((x.ndim - 1,), (0,))).astype(x.dtype)
  return y, xg


def _gm_primal(x, idx, w, cfg):
  return _fwd_value(x, idx, w, cfg)[0]


def _gm_fwd(x, idx, w, cfg):
  y, xg = _fwd_value(x, idx, w, cfg)
  # Pallas keeps x (it never materialises the gather); XLA keeps only the gathered columns.
  res_x = x if cfg.impl == "pallas" else xg
  return y, (res_x, idx, w)


def _gm_bwd(cfg, res, dy):
  res_x, idx, w = res
  dy = dy.astype(res_x.dtype)
  lead = tuple(range(dy.ndim - 1))
  if cfg.impl == "pallas" and cfg.pallas_dw:
    dw = _pallas_dw(res_x, idx, dy, cfg)
  elif cfg.impl == "pallas":
    dw = _dot32(_take(res_x, idx), dy, (lead, lead))
  else:
    dw = _dot32(res_x, dy, (lead, lead))
  dxg = _dot32(dy, w.astype(dy.dtype), ((dy.ndim - 1,), (1,))).astype(dy.dtype)
  dx = _scatter_dx(dxg, idx, cfg.d_in, cfg.dx_mode)
  return dx, None, dw.astype(w.dtype)


_gather_matmul = jax.custom_vjp(_gm_primal, nondiff_argnums=(3,))
_gather_matmul.defvjp(_gm_fwd, _gm_bwd)


# ----------------------------------------------------------------------------- public API

def batch_shard_axes(batch_size: int, batch_axes=DEFAULT_BATCH_AXES):
  """Mesh axes of the active (abstract) mesh to shard_map the leading dim over, or None.

  None means: no mesh, a single device, the axes are already manual (inside a shard_map), or the
  leading dim does not divide evenly (the caller then falls back to the XLA path).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size <= 1:
    return None
  manual = set(mesh.manual_axes)
  axes = tuple(a for a in batch_axes if a in mesh.axis_names and a not in manual)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  n = int(np.prod([sizes[a] for a in axes])) if axes else 1
  if n <= 1:
    # All non-manual batch axes are trivial; only shard_map when some other auto axis is > 1.
    others = [a for a in mesh.axis_names if a not in manual and sizes[a] > 1]
    return () if others else None
  if batch_size % n:
    return "indivisible"
  return axes


@functools.lru_cache(maxsize=None)
def pallas_compiles(interpret: bool = False) -> bool:
  """Whether the Pallas forward and weight-gradient kernels lower and compile on this backend.

  Probed once per process on tiny shapes (ahead-of-time lower + compile, no execution), so that
  ``impl='auto'`` falls back to XLA with a warning instead of failing inside the model if the
  Triton backend is unavailable or rejects the kernel.
  """
  x = jax.ShapeDtypeStruct((40, 50), jnp.bfloat16)
  idx = jax.ShapeDtypeStruct((5,), jnp.int32)
  w = jax.ShapeDtypeStruct((5, 24), jnp.bfloat16)
  dy = jax.ShapeDtypeStruct((40, 24), jnp.bfloat16)
  try:
    jax.jit(lambda a, i, b: _pk.gather_matmul_fwd(a, i, b, interpret=interpret)).lower(
        x, idx, w).compile()
    jax.jit(lambda a, i, g: _pk.gather_matmul_dw(a, i, g, interpret=interpret)).lower(
        x, idx, dy).compile()
  except Exception as e:  # noqa: BLE001 -- any failure means: do not pick Pallas automatically
    warnings.warn(f"lostjax.kernels: Pallas gather-matmul kernel unavailable on backend "
                  f"{jax.default_backend()!r} ({type(e).__name__}: {str(e)[:200]}); "
                  "impl='auto' uses the XLA path")
    return False
  return True


def resolve_impl(impl: str = "auto", interpret: bool | None = None) -> tuple[str, bool]:
  """Maps ``impl``/``interpret`` to the concrete ``('xla'|'pallas', interpret)`` for this backend."""
  if impl not in _IMPLS:
    raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
  backend = jax.default_backend()
  if impl == "auto":
    env = os.environ.get("LOSTJAX_GATHER_IMPL", "").strip().lower()
    if env:
      if env not in ("xla", "pallas"):
        raise ValueError(f"LOSTJAX_GATHER_IMPL must be 'xla' or 'pallas', got {env!r}")
      impl = env
    else:
      impl = "pallas" if (backend == "gpu" and not interpret and pallas_compiles(False)) else "xla"
  if impl == "xla":
    return "xla", False
  if interpret is None:
    if backend == "gpu":
      interpret = False
    elif backend == "cpu":
      interpret = True
    else:
      raise ValueError(f"impl='pallas' has a GPU (Triton) kernel only; backend {backend!r} needs "
                       "impl='xla' or interpret=True")
  return "pallas", bool(interpret)


def _validate(x, idx, w, dx_mode):
  if x.ndim < 1:
    raise ValueError(f"x must have at least 1 dim [..., d_in], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be floating point, got dtype {x.dtype}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"w must be floating point, got dtype {w.dtype}")
  if idx.ndim != 1 or not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"idx must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
  if w.ndim != 2 or w.shape[0] != idx.shape[0]:
    raise ValueError(f"w must have shape [k={idx.shape[0]}, d_out], got {w.shape}")
  if idx.shape[0] < 1:
    raise ValueError("idx must select at least one column (k >= 1)")
  if dx_mode not in _DX_MODES:
    raise ValueError(f"dx_mode must be one of {_DX_MODES}, got {dx_mode!r}")
  try:  # value checks only when idx is concrete (not traced under jit)
    v = np.asarray(idx)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    v = None
  if v is not None:
    if v.min() < 0 or v.max() >= x.shape[-1]:
      raise ValueError(f"idx values must lie in [0, {x.shape[-1]}), got range [{v.min()}, {v.max()}]")
    if v.size > 1 and not np.all(np.diff(v) > 0):
      raise ValueError("idx must be sorted and unique")


def gather_matmul(x, idx, w, *, impl: str = "auto", interpret: bool | None = None,
                  dx_mode: str = "scatter", blocks: tuple | None = None,
                  batch_axes=DEFAULT_BATCH_AXES, pallas_dw: bool = True):
  """y = x[..., idx] @ w.

  Args:
    x: [..., d_in] float32/bfloat16 activations.
    idx: int32 [k], sorted, unique, in [0, d_in) (checked when concrete).
    w: [k, d_out] weights (cast to x.dtype for the product).
    impl: 'xla' | 'pallas' | 'auto' (pallas on GPU, else xla; env LOSTJAX_GATHER_IMPL overrides auto).
    interpret: Pallas interpret mode; None = True on CPU, False on GPU.
    dx_mode: 'scatter' (.at[].add into zeros) or 'onehot' (one-hot transpose GEMM) for dL/dx.
    blocks: optional Pallas tile sizes (bm, bn, bk), powers of two >= 16.
    batch_axes: mesh axes the leading dim of x is sharded over (used to shard_map the Pallas call).
    pallas_dw: with impl='pallas', compute dL/dw with the Pallas kernel (True) or XLA take+dot.

  Returns:
    [..., d_out] in x.dtype (float32 accumulation). Differentiable w.r.t. x and w.
  """
  x = jnp.asarray(x)
  w = jnp.asarray(w)
  idx = jnp.asarray(idx)
  _validate(x, idx, w, dx_mode)
  impl, interpret = resolve_impl(impl, interpret)
  axes = None
  if impl == "pallas" and x.ndim >= 2:
    axes = batch_shard_axes(x.shape[0], batch_axes)
    if axes == "indivisible":  # cannot shard_map the kernel: fall back to XLA (still correct)
      impl, interpret, axes = "xla", False, None
  elif impl == "pallas" and batch_shard_axes(1, batch_axes) is not None:
    impl, interpret, axes = "xla", False, None  # 1-D x under a mesh: nothing to shard
  if impl == "pallas":
    cfg = _Cfg("pallas", interpret, dx_mode, tuple(blocks) if blocks else None, axes, x.shape[-1],
               bool(pallas_dw))
  else:
    cfg = _Cfg("xla", False, dx_mode, None, None, x.shape[-1], False)
  return _gather_matmul(x, idx.astype(jnp.int32), w, cfg)
