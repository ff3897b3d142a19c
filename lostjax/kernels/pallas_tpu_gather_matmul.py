"""Pallas TPU (Mosaic) kernels for the LOST sparse branch ``y = x[:, idx] @ w`` and its gradients.

LOST: Low-rank and Sparse Pre-training for Large Language Models (Li et al., arXiv 2508.02668). The LOST
layer is ``y = gamma * sigma(x A) B + (1 - gamma) * x[..., I] W_s``; this file computes its channel-sparse
term and the two gradients of it:

  forward:  y[m, n]   = sum_k x[m, idx[k]] * w[k, n]
  dW_s:     dw[k, n]  = sum_m x[m, idx[k]] * dy[m, n]
  dx:       dx[m, d]  = sum_k [d == idx[k]] * g[m, k],   g = dy @ w^T   (g is one XLA GEMM)

TPU design. A vector gather along the lane (last) dimension has no efficient Mosaic lowering, so the column
selection runs on the MXU inside VMEM: for a block of ``bd`` input channels starting at ``d0`` and a chunk of
``bk`` selected channels, the one-hot block ``P[d, c] = (d0 + d == idx[c])`` is built from an iota and the
index chunk (never stored in HBM) and ``x_blk @ P`` copies the selected columns exactly (one non-zero per
column; float32 operands use ``Precision.HIGHEST``). The selected columns are accumulated in a float32 VMEM
scratch over the input-channel blocks and then multiplied with the weight block, so ``x[:, idx]`` is never
written to HBM and ``x`` is read once per output-column block. dx is the transposed selection
``g_blk @ P^T`` written block by block (input-channel blocks without a selected channel are written as zeros
without a matmul).

Scalar prefetch (``pltpu.PrefetchScalarGridSpec``): ``idx`` is sorted, so the selected channels of chunk
``c`` lie in the input-channel blocks ``first[c] .. first[c] + count[c] - 1``. Those two int32 vectors are
prefetched into SMEM; the ``x`` BlockSpec's index map visits only those blocks (the remaining grid steps
repeat the last block index, which the pipeline does not re-fetch, and ``pl.when`` skips their compute).

Block shapes follow the TPU (8, 128) tiling: ``bm`` is a multiple of 8, ``bd``/``bk``/``bn`` multiples of
128 or the full dimension. Shapes that are not multiples of the blocks are handled without copying ``x``:
input-channel columns past ``d_in`` and token rows past ``m`` in edge blocks are masked to zero before they
enter a product, out-of-range output rows/columns are dropped by the pipeline; ``idx`` is padded with -1
(selects nothing) and ``w`` with zero rows to a multiple of ``bk`` (small arrays).

Deviation from the XLA path: the float32 data GEMMs use the backend's default matmul precision, as
``jnp.dot`` does; the selection GEMMs are exact in every dtype. On CPU the kernels run in TPU interpret mode
(``pltpu.InterpretParams``), for tests only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["gather_matmul_fwd", "gather_matmul_dw", "scatter_dx", "default_blocks", "interpret_params"]


def interpret_params():
  """TPU interpret-mode parameters for CPU runs (uninitialised VMEM reads as NaN, so masks are tested)."""
  return pltpu.InterpretParams(uninitialized_memory="nan")


def _block(dim: int, cap: int) -> int:
  """The full dim when it is at most ``cap`` (always legal), else ``cap`` (a multiple of 8 or 128)."""
  return dim if dim <= cap else cap


def default_blocks(m: int, d_in: int, k: int, n: int) -> tuple[int, int, int, int]:
  """Default (bm, bd, bk, bn): bm ≤ 256 rows, bd ≤ 512 and bn ≤ 2048 lanes, bk = 128 selected channels."""
  return _block(m, 256), _block(d_in, 512), 128, _block(n, 2048)


def _check_blocks(blocks, m, d_in, n):
  bm, bd, bk, bn = blocks
  if bm <= 0 or (bm % 8 and bm != m):
    raise ValueError(f"bm must be a positive multiple of 8 or m={m}, got {bm}")
  for name, b, dim in (("bd", bd, d_in), ("bn", bn, n)):
    if b <= 0 or (b % 128 and b != dim):
      raise ValueError(f"{name} must be a positive multiple of 128 or the full dimension {dim}, got {b}")
  if bk <= 0 or bk % 128:
    raise ValueError(f"bk must be a positive multiple of 128, got {bk}")


def _chunk_ranges(idx_p, k, bk, bd):
  """Per chunk of bk selected channels: first input-channel block and number of blocks spanned (int32)."""
  nc = idx_p.shape[0] // bk
  starts = jnp.arange(nc) * bk
  ends = jnp.minimum(starts + bk, k) - 1
  first = idx_p[starts] // bd
  last = idx_p[ends] // bd
  return first.astype(jnp.int32), (last - first + 1).astype(jnp.int32)


def _prepare(idx, k, bk, bd):
  kp = pl.cdiv(k, bk) * bk
  idx_p = jnp.pad(idx.astype(jnp.int32), (0, kp - k), constant_values=-1)
  first, count = _chunk_ranges(idx_p, k, bk, bd)
  return idx_p.reshape(1, kp), first, count, kp


def _onehot(d0, bd, idx_row, dtype):
  """P[d, c] = (d0 + d == idx_row[0, c]) as a [bd, bk] matrix of dtype (exact 0/1; built in float32)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (bd, idx_row.shape[1]), 0) + d0
  return jnp.where(rows == idx_row, 1.0, 0.0).astype(dtype)


def _precision(dtype):
  """HIGHEST for float32 operands, so that the one-hot products copy values exactly on the MXU."""
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _mask(v, valid):
  return jnp.where(valid, v, jnp.zeros((), v.dtype))


def _select(x_blk, d_blk, bd, d_in, idx_row):
  """Columns of x_blk (input-channel block d_blk) picked by idx_row, as float32 [bm, bk] (zeros elsewhere)."""
  if d_in % bd:  # edge block: columns past d_in are not data (NaN in interpret mode), 0 * NaN would leak
    cols = jax.lax.broadcasted_iota(jnp.int32, x_blk.shape, 1) + d_blk * bd
    x_blk = _mask(x_blk, cols < d_in)
  p = _onehot(d_blk * bd, bd, idx_row, x_blk.dtype)
  return jnp.dot(x_blk, p, preferred_element_type=jnp.float32, precision=_precision(x_blk.dtype))


def _gather_channels(first_pass, c, t, first_ref, count_ref, x_ref, idx_ref, xg_ref, acc_ref, bd, d_in):
  """The shared first phase of both kernels: zero the accumulator on the first pass over its output block, then
  collect the selected channels of chunk c into xg over the channel blocks t that hold any of them."""
  @pl.when(first_pass & (t == 0))
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(t == 0)
  def _():
    xg_ref[...] = jnp.zeros_like(xg_ref)

  @pl.when(t < count_ref[c])
  def _():
    xg_ref[...] += _select(x_ref[...], first_ref[c] + t, bd, d_in, idx_ref[...])


def _x_block(c, t, first, count):
  # blocks past the chunk's span repeat its last block: the pipeline skips re-fetching an unchanged block
  return first[c] + jnp.minimum(t, count[c] - 1)


def _compiler_params(sem):
  return pltpu.CompilerParams(dimension_semantics=sem)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def gather_matmul_fwd(x, idx, w, *, blocks=None, interpret=None):
  """``x[:, idx] @ w`` for x [m, d_in], idx int32 [k] (sorted, unique), w [k, n]; result in x.dtype."""
  m, d_in = x.shape
  k, n = w.shape
  bm, bd, bk, bn = blocks or default_blocks(m, d_in, k, n)
  _check_blocks((bm, bd, bk, bn), m, d_in, n)
  idx_row, first, count, kp = _prepare(idx, k, bk, bd)
  w = jnp.pad(w.astype(x.dtype), ((0, kp - k), (0, 0)))
  nd, nc = pl.cdiv(d_in, bd), kp // bk

  def kernel(first_ref, count_ref, x_ref, idx_ref, w_ref, o_ref, xg_ref, acc_ref):
    c, t = pl.program_id(2), pl.program_id(3)

    _gather_channels(c == 0, c, t, first_ref, count_ref, x_ref, idx_ref, xg_ref, acc_ref, bd, d_in)

    @pl.when(t == nd - 1)
    def _():
      acc_ref[...] += jnp.dot(xg_ref[...].astype(x_ref.dtype), w_ref[...],
                              preferred_element_type=jnp.float32)

    @pl.when((c == nc - 1) & (t == nd - 1))
    def _():
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), nc, nd),
      in_specs=[
          pl.BlockSpec((bm, bd), lambda i, j, c, t, f, cnt: (i, _x_block(c, t, f, cnt))),
          pl.BlockSpec((1, bk), lambda i, j, c, t, f, cnt: (0, c)),
          pl.BlockSpec((bk, bn), lambda i, j, c, t, f, cnt: (c, j)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, c, t, f, cnt: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32), pltpu.VMEM((bm, bn), jnp.float32)],
  )
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      compiler_params=_compiler_params(("parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=_interpret(interpret), name="lost_gather_matmul_fwd_tpu",
  )(first, count, x, idx_row, w)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def gather_matmul_dw(x, idx, dy, *, blocks=None, interpret=None):
  """``x[:, idx]^T @ dy`` in float32 for x [m, d_in], idx int32 [k], dy [m, n]."""
  m, d_in = x.shape
  k = idx.shape[0]
  n = dy.shape[1]
  bm, bd, bk, bn = blocks or default_blocks(m, d_in, k, n)
  _check_blocks((bm, bd, bk, bn), m, d_in, n)
  idx_row, first, count, kp = _prepare(idx, k, bk, bd)
  dy = dy.astype(x.dtype)
  nd, nc, nm = pl.cdiv(d_in, bd), kp // bk, pl.cdiv(m, bm)

  def kernel(first_ref, count_ref, x_ref, idx_ref, dy_ref, o_ref, xg_ref, acc_ref):
    c, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    _gather_channels(i == 0, c, t, first_ref, count_ref, x_ref, idx_ref, xg_ref, acc_ref, bd, d_in)

    @pl.when(t == nd - 1)
    def _():
      xg, dyb = xg_ref[...], dy_ref[...]
      if m % bm:  # edge block: rows past m are not data
        rows = jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0) + i * bm
        xg, dyb = _mask(xg, rows < m), _mask(dyb, rows < m)
      acc_ref[...] += jnp.dot(xg.T.astype(x_ref.dtype), dyb, preferred_element_type=jnp.float32)

    @pl.when((i == nm - 1) & (t == nd - 1))
    def _():
      o_ref[...] = acc_ref[...]

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(nc, pl.cdiv(n, bn), nm, nd),
      in_specs=[
          pl.BlockSpec((bm, bd), lambda c, j, i, t, f, cnt: (i, _x_block(c, t, f, cnt))),
          pl.BlockSpec((1, bk), lambda c, j, i, t, f, cnt: (0, c)),
          pl.BlockSpec((bm, bn), lambda c, j, i, t, f, cnt: (i, j)),
      ],
      out_specs=pl.BlockSpec((bk, bn), lambda c, j, i, t, f, cnt: (c, j)),
      scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32), pltpu.VMEM((bk, bn), jnp.float32)],
  )
  dw = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((kp, n), jnp.float32),
      compiler_params=_compiler_params(("parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=_interpret(interpret), name="lost_gather_matmul_dw_tpu",
  )(first, count, x, idx_row, dy)
  return dw[:k]


@functools.partial(jax.jit, static_argnames=("d_in", "blocks", "interpret"))
def scatter_dx(g, idx, d_in, *, blocks=None, interpret=None):
  """Dense [m, d_in] input gradient with g [m, k] in the idx columns and zeros elsewhere (g.dtype)."""
  m, k = g.shape
  bm, bd, bk, _ = blocks or default_blocks(m, d_in, k, 128)
  _check_blocks((bm, bd, bk, 128), m, d_in, 128)
  idx_row, first, count, kp = _prepare(idx, k, bk, bd)
  g = jnp.pad(g, ((0, 0), (0, kp - k)))
  nd, nc = pl.cdiv(d_in, bd), kp // bk

  def kernel(first_ref, count_ref, g_ref, idx_ref, o_ref, acc_ref):
    e, c = pl.program_id(1), pl.program_id(2)

    @pl.when(c == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((e >= first_ref[c]) & (e < first_ref[c] + count_ref[c]))  # chunk c has channels in block e
    def _():
      p = _onehot(e * bd, bd, idx_ref[...], g_ref.dtype)
      acc_ref[...] += jax.lax.dot_general(g_ref[...], p, (((1,), (1,)), ((), ())),
                                          preferred_element_type=jnp.float32, precision=_precision(g_ref.dtype))

    @pl.when(c == nc - 1)
    def _():
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(pl.cdiv(m, bm), nd, nc),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda i, e, c, f, cnt: (i, c)),
          pl.BlockSpec((1, bk), lambda i, e, c, f, cnt: (0, c)),
      ],
      out_specs=pl.BlockSpec((bm, bd), lambda i, e, c, f, cnt: (i, e)),
      scratch_shapes=[pltpu.VMEM((bm, bd), jnp.float32)],
  )
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((m, d_in), g.dtype),
      compiler_params=_compiler_params(("parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret), name="lost_scatter_dx_tpu",
  )(first, count, g, idx_row)


def _interpret(interpret):
  """None: compile for TPU on a TPU backend, TPU interpret mode elsewhere; True: interpret; False: compile."""
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  if interpret is True:
    return interpret_params()
  return interpret or False
