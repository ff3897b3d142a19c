"""Pallas (Triton-backend, GPU) kernel for the LOST sparse branch ``y = x[:, idx] @ w``: registry ``pallas_gpu``.

LOST: Low-rank and Sparse Pre-training for Large Language Models (Li et al., arXiv 2508.02668). The LOST layer
is ``y = gamma * sigma(x A) B + (1 - gamma) * x[..., I] W_s``; this file holds the fused column-gather matmul
of its sparse term:

  forward:  y[m, n]  = sum_k x[m, idx[k]] * w[k, n]          (gather fused into the GEMM tile loads)

The gradients ``dw = x[:, idx]^T dy`` (take + GEMM) and ``dx[:, idx] = dy @ w^T`` (scatter) are left to XLA
(see gather_matmul.py): a fused Triton weight-gradient kernel was slower than XLA's take + GEMM at every
measured shape and was removed (docs/benchmarks/sparse_paths.md).

Design (GPU Triton lowering of ``pl.pallas_call``):
* ``x``, ``idx`` and the output are passed whole (``pl.no_block_spec``) and indexed explicitly,
  because Triton loads/stores of partial blocks are NOT masked by Pallas; every load/store that can
  run past an edge uses ``plt.load``/``plt.store`` with a mask. Rows past the end are clamped before
  the gather so no lane ever forms an out-of-range address.
* ``w`` (small: k x d_out) is zero-padded to block multiples so its loads need no mask; the padded
  ``idx`` entries are masked out of the gather (not multiplied by zero, so inf/nan in column 0 of x
  cannot leak into the result).
* Tile sizes are powers of two >= 16 (Triton ``tl.dot`` constraint); accumulation is float32.

Deviations from the usual column-gather prototype: masks instead of requiring divisible shapes, explicit
``plt.CompilerParams`` so the Triton backend is used.
On CPU the same kernels run with ``interpret=True`` (HLO interpreter; slow, for tests only).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

__all__ = ["gather_matmul_fwd", "default_blocks"]


def _pow2_at_least_16(n: int) -> int:
  return max(16, int(pl.next_power_of_2(int(n))))


def default_blocks(m: int, k: int, n: int) -> tuple[int, int, int]:
  """Default (bm, bn, bk) tile sizes: powers of two, >= 16, not larger than needed."""
  bm = min(64, _pow2_at_least_16(m))
  bn = min(128 if n >= 1024 else 64, _pow2_at_least_16(n))
  bk = min(32, _pow2_at_least_16(k))
  return bm, bn, bk


def _check_blocks(blocks):
  for b in blocks:
    if b < 16 or (b & (b - 1)) != 0:
      raise ValueError(f"block sizes must be powers of two >= 16, got {blocks}")


def _compiler_params(interpret, num_warps, num_stages):
  if interpret:
    return None
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _pad_idx_w(idx, w, bk, bn):
  k, n = w.shape
  kp = pl.cdiv(k, bk) * bk
  np_ = pl.cdiv(n, bn) * bn
  idx_p = jnp.pad(idx.astype(jnp.int32), (0, kp - k))
  w_p = jnp.pad(w, ((0, kp - k), (0, np_ - n)))
  return idx_p, w_p, kp, np_


@functools.partial(jax.jit, static_argnames=("blocks", "interpret", "num_warps", "num_stages"))
def gather_matmul_fwd(x, idx, w, *, blocks=None, interpret=False, num_warps=4, num_stages=2):
  """``x[:, idx] @ w`` for 2-D ``x`` [m, d_in], ``idx`` int32 [k], ``w`` [k, n]; output dtype x.dtype."""
  m, _ = x.shape
  k, n = w.shape
  bm, bn, bk = blocks or default_blocks(m, k, n)
  _check_blocks((bm, bn, bk))
  w = w.astype(x.dtype)
  idx_p, w_p, kp, np_ = _pad_idx_w(idx, w, bk, bn)
  precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None

  def kernel(x_ref, idx_ref, w_ref, o_ref):
    j, i = pl.program_id(0), pl.program_id(1)  # j fastest: tiles sharing x rows run together (L2)
    rows = i * bm + jnp.arange(bm)
    row_ok = rows < m
    rows_c = jnp.minimum(rows, m - 1)

    def body(t, acc):
      kk = t * bk + jnp.arange(bk)
      cols = idx_ref[pl.ds(t * bk, bk)]
      mask = row_ok[:, None] & (kk < k)[None, :]
      xg = plt.load(x_ref.at[rows_c[:, None], cols[None, :]], mask=mask, other=0)
      wb = w_ref[pl.ds(t * bk, bk), :]
      if interpret:  # XLA:CPU lacks some bf16 x bf16 -> f32 dots; the upcast is exact
        xg, wb = xg.astype(jnp.float32), wb.astype(jnp.float32)
      return acc + jnp.dot(xg, wb, preferred_element_type=jnp.float32, precision=precision)

    acc = jax.lax.fori_loop(0, kp // bk, body, jnp.zeros((bm, bn), jnp.float32))
    ncols = j * bn + jnp.arange(bn)
    plt.store(o_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], acc.astype(o_ref.dtype),
              mask=row_ok[:, None] & (ncols < n)[None, :])

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(np_ // bn, pl.cdiv(m, bm)),
      in_specs=[pl.no_block_spec, pl.no_block_spec, pl.BlockSpec((kp, bn), lambda j, i: (0, j))],
      out_specs=pl.no_block_spec,
      compiler_params=_compiler_params(interpret, num_warps, num_stages),
      interpret=interpret,
      name="lost_gather_matmul_fwd",
  )(x, idx_p, w_p)
