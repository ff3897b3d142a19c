"""Column-gather matmul ``y = x[..., idx] @ w`` with a custom VJP: the LOST sparse branch.

LOST: Low-rank and Sparse Pre-training for Large Language Models (Li et al., arXiv 2508.02668), sparse term
of ``y = gamma * sigma(x A) B + (1 - gamma) * x[..., I] W_s``.

Forward:   y  = x[..., idx] @ w                      (accumulated in float32, returned as x.dtype)
Backward:  dw = x[..., idx]^T dy                     (contracted over all leading dims)
           dx = scatter(dy w^T into the idx columns)  (idx sorted & unique => no write conflicts)
           idx gets no gradient.

``impl`` is any name of the sparse-path registry (``lostjax.kernels.registry``; 'auto' and legacy names are
resolved there). This function computes only the sparse term, so it uses the entry's ``gather`` and ``dx``:
* ``gather='xla'`` (gather_xla, gather_onehot_grad, fused_*): ``jnp.take`` + dot; the backward reuses the
  gathered ``x[..., idx]`` saved by the forward for ``dw`` and builds ``dx`` either by ``.at[..., idx].add``
  into zeros (``dx='scatter'``; XLA folds ``A + scatter(0, ...)`` into an in-place scatter into A when the
  result is summed with the other branch's input gradient) or by a one-hot GEMM ``(dy w^T) @ P^T`` with
  ``P = one_hot(idx, d_in)^T`` (``dx='onehot'``).
* ``gather='pallas_gpu'``: the Triton gather+GEMM forward (pallas_gather_matmul.py); ``dw`` (XLA take + dot)
  and ``dx`` (scatter) as in the XLA path.
* ``gather='pallas_tpu'``: the Mosaic TPU kernels (pallas_tpu_gather_matmul.py) for the forward, ``dw`` and
  the ``dx`` scatter; ``dy w^T`` is one XLA GEMM.
The Pallas kernels run in interpret mode on CPU (tests). Under an active mesh with more than one device they
are wrapped in ``jax.shard_map`` over the batch axes (``batch_axes`` present in the mesh), with ``idx``/``w``
replicated and ``dw`` summed with ``psum`` (``check_vma=False``: Pallas kernels fail the varying-manual-axes
check). If the leading dim does not divide over those axes, the call uses the XLA path.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lostjax.kernels import pallas_gather_matmul as _pk_gpu
from lostjax.kernels import pallas_tpu_gather_matmul as _pk_tpu
from lostjax.kernels.registry import resolve_sparse_impl
from lostjax import sharding as _sharding

__all__ = ["gather_matmul", "batch_shard_axes", "dot_f32"]

# The mesh axes a batch may be split over: the "batch" rule of lostjax.sharding (the one place it is decided).
_BATCH_RULE = dict(_sharding.DEFAULT_RULES)["batch"]
DEFAULT_BATCH_AXES = (_BATCH_RULE,) if isinstance(_BATCH_RULE, str) else tuple(_BATCH_RULE)


class _Cfg(NamedTuple):
  gather: str  # 'xla' | 'pallas_gpu' | 'pallas_tpu'
  dx_mode: str  # 'scatter' | 'onehot' (XLA input gradient)
  interpret: bool | None
  blocks: tuple | None
  axes: tuple | None  # mesh axes sharding the leading dim for shard_map, or None
  d_in: int


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

def _flat(v):
  return v.reshape(-1, v.shape[-1])


def _kernel_fwd(x, idx, w, cfg):
  mod = _pk_gpu if cfg.gather == "pallas_gpu" else _pk_tpu
  y2 = mod.gather_matmul_fwd(_flat(x), idx, w, blocks=cfg.blocks, interpret=cfg.interpret)
  return y2.reshape(x.shape[:-1] + (w.shape[1],))


def _kernel_dw(x, idx, dy, cfg):  # pallas_tpu only
  return _pk_tpu.gather_matmul_dw(_flat(x), idx, _flat(dy), blocks=cfg.blocks, interpret=cfg.interpret)


def _kernel_dx(g, idx, cfg):  # pallas_tpu only
  dx = _pk_tpu.scatter_dx(_flat(g), idx, cfg.d_in, blocks=cfg.blocks, interpret=cfg.interpret)
  return dx.reshape(g.shape[:-1] + (cfg.d_in,))


def _batch_spec(ndim, axes):
  return P(axes, *([None] * (ndim - 1)))


def _sharded(fn, cfg, sharded_args, reduce=False):
  """fn(*args) with the args marked True in ``sharded_args`` split over the batch axes (others replicated)."""
  if cfg.axes is None:
    return fn
  def call(*args):
    specs = tuple(_batch_spec(a.ndim, cfg.axes) if sh else P() for a, sh in zip(args, sharded_args))
    body = (lambda *a: jax.lax.psum(fn(*a), cfg.axes)) if reduce else fn
    out_ndim = None if reduce else args[0].ndim
    out_specs = P() if reduce else _batch_spec(out_ndim, cfg.axes)
    return jax.shard_map(body, in_specs=specs, out_specs=out_specs, check_vma=False)(*args)
  return call


# ----------------------------------------------------------------------------- custom VJP

def _fwd_value(x, idx, w, cfg):
  if cfg.gather != "xla":
    return _sharded(lambda a, i, b: _kernel_fwd(a, i, b, cfg), cfg, (True, False, False))(x, idx, w), None
  xg = _take(x, idx)
  y = _dot32(xg, w.astype(x.dtype), ((x.ndim - 1,), (0,))).astype(x.dtype)
  return y, xg


def _gm_primal(x, idx, w, cfg):
  return _fwd_value(x, idx, w, cfg)[0]


def _gm_fwd(x, idx, w, cfg):
  y, xg = _fwd_value(x, idx, w, cfg)
  # The kernels keep x (they never materialise the gather); XLA keeps only the gathered columns.
  return y, (x if cfg.gather != "xla" else xg, idx, w)


def _gm_bwd(cfg, res, dy):
  res_x, idx, w = res
  dy = dy.astype(res_x.dtype)
  lead = tuple(range(dy.ndim - 1))
  g = _dot32(dy, w.astype(dy.dtype), ((dy.ndim - 1,), (1,))).astype(dy.dtype)  # dy w^T, [..., k]
  if cfg.gather == "pallas_tpu":
    dw = _sharded(lambda a, i, d: _kernel_dw(a, i, d, cfg), cfg, (True, False, True), reduce=True)(res_x, idx, dy)
    dx = _sharded(lambda a, i: _kernel_dx(a, i, cfg), cfg, (True, False))(g, idx)
    return dx, None, dw.astype(w.dtype)
  xg = res_x if cfg.gather == "xla" else _take(res_x, idx)
  dw = _dot32(xg, dy, (lead, lead))
  return _scatter_dx(g, idx, cfg.d_in, cfg.dx_mode), None, dw.astype(w.dtype)


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


def _validate(x, idx, w):
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
                  blocks: tuple | None = None, batch_axes=DEFAULT_BATCH_AXES):
  """y = x[..., idx] @ w.

  Args:
    x: [..., d_in] float32/bfloat16 activations.
    idx: int32 [k], sorted, unique, in [0, d_in) (checked when concrete).
    w: [k, d_out] weights (cast to x.dtype for the product).
    impl: a sparse-path name of ``lostjax.kernels.registry`` ('auto', 'gather_xla', 'gather_onehot_grad',
      'pallas_gpu', 'pallas_tpu'; the fused names run their sparse part, legacy names are accepted).
    interpret: Pallas interpret mode; None = interpret on CPU, compiled on the kernel's accelerator.
    blocks: optional Pallas tile sizes: (bm, bn, bk) for pallas_gpu, (bm, bd, bk, bn) for pallas_tpu.
    batch_axes: mesh axes the leading dim of x is sharded over (used to shard_map the Pallas calls).

  Returns:
    [..., d_out] in x.dtype (float32 accumulation). Differentiable w.r.t. x and w.
  """
  x = jnp.asarray(x)
  w = jnp.asarray(w)
  idx = jnp.asarray(idx)
  _validate(x, idx, w)
  entry = resolve_sparse_impl(impl)
  gather, axes = entry.gather, None
  if gather != "xla":
    axes = batch_shard_axes(x.shape[0] if x.ndim >= 2 else 1, batch_axes)
    if axes == "indivisible" or (x.ndim < 2 and axes is not None):
      gather, axes = "xla", None  # cannot shard_map the kernel over this leading dim: XLA (still correct)
  if gather != "xla" and interpret is None:
    interpret = jax.default_backend() == "cpu"
  cfg = _Cfg(gather, entry.dx, interpret if gather != "xla" else None,
             tuple(blocks) if blocks and gather != "xla" else None, axes, x.shape[-1])
  return _gather_matmul(x, idx.astype(jnp.int32), w, cfg)
