"""Tests for the raw Pallas TPU kernels in lostjax.kernels.pallas_tpu_gather_matmul (TPU interpret mode, CPU).

LOST sparse branch (arXiv 2508.02668): forward y = x[:, idx] @ w, weight gradient dw = x[:, idx]^T dy and the
input-gradient scatter dx[:, idx] = g, each against a NumPy float64 oracle. The index sets are clustered so
that the scalar-prefetched block ranges skip input-channel blocks (and, for dx, write blocks without a
selected channel as zeros), with two 128-channel chunks whose ranges differ.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax.kernels import pallas_tpu_gather_matmul as tk

M, D, N = 24, 640, 136  # bd = 128: five input-channel blocks; n = 136 is one full-width block
BLOCKS = (16, 128, 128, 136)  # bm = 16: the second token block is partial (24 rows)


def _data(idx, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((M, D)).astype(np.float32)
  w = rng.standard_normal((len(idx), N)).astype(np.float32)
  dy = rng.standard_normal((M, N)).astype(np.float32)
  return x, np.asarray(idx, np.int32), w, dy


# chunk 0 (128 channels) inside blocks 0-1, chunk 1 (72 channels) inside block 4; blocks 2-3 hold none
IDX_TWO_CHUNKS = list(range(3, 131)) + list(range(520, 592))
IDX_ONE_BLOCK = [260, 261, 300, 383]  # one chunk, all in block 2


@pytest.mark.parametrize("idx", [IDX_TWO_CHUNKS, IDX_ONE_BLOCK], ids=["two_chunks", "one_block"])
def test_kernels_match_numpy(idx):
  x, idx, w, dy = _data(idx)
  x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
  first, count = tk._chunk_ranges(jnp.pad(jnp.asarray(idx), (0, -len(idx) % 128), constant_values=-1),
                                  len(idx), 128, 128)
  if len(idx) > 128:
    assert first.tolist() == [0, 4] and count.tolist() == [2, 1]
  else:
    assert first.tolist() == [2] and count.tolist() == [1]
  y = tk.gather_matmul_fwd(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), blocks=BLOCKS, interpret=True)
  np.testing.assert_allclose(np.asarray(y), x64[:, idx] @ w64, rtol=1e-5, atol=1e-4)
  dw = tk.gather_matmul_dw(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(dy), blocks=BLOCKS, interpret=True)
  assert dw.dtype == jnp.float32 and dw.shape == (len(idx), N)
  np.testing.assert_allclose(np.asarray(dw), x64[:, idx].T @ dy64, rtol=1e-5, atol=1e-4)
  g = (dy64 @ w64.T).astype(np.float32)
  dx = tk.scatter_dx(jnp.asarray(g), jnp.asarray(idx), D, blocks=BLOCKS, interpret=True)
  ref = np.zeros((M, D), np.float32)
  ref[:, idx] = g
  np.testing.assert_array_equal(np.asarray(dx), ref)  # a copy: exact


def test_bf16_selection_is_exact():
  x, idx, w, dy = _data(IDX_ONE_BLOCK, seed=1)
  xb = jnp.asarray(x, jnp.bfloat16)
  eye = jnp.eye(len(idx), dtype=jnp.bfloat16)  # w = I: the forward returns the selected columns themselves
  y = tk.gather_matmul_fwd(xb, jnp.asarray(idx), eye, blocks=BLOCKS[:3] + (len(idx),), interpret=True)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(xb, np.float32)[:, idx])


def test_default_blocks_respect_tpu_tiling():
  for m, d, k, n in [(16384, 1024, 51, 1024), (16384, 2736, 136, 1024), (7, 100, 3, 5), (300, 5461, 273, 2048)]:
    bm, bd, bk, bn = tk.default_blocks(m, d, k, n)
    assert bm == m or bm % 8 == 0
    assert bd == d or bd % 128 == 0
    assert bn == n or bn % 128 == 0
    assert bk % 128 == 0
    tk._check_blocks((bm, bd, bk, bn), m, d, n)  # accepted by the validator


@pytest.mark.parametrize("blocks,match", [((12, 128, 128, 136), "bm"), ((16, 100, 128, 136), "bd"),
                                          ((16, 128, 64, 136), "bk"), ((16, 128, 128, 100), "bn")])
def test_bad_blocks_raise(blocks, match):
  x, idx, w, _ = _data(IDX_ONE_BLOCK)
  with pytest.raises(ValueError, match=match):
    tk.gather_matmul_fwd(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), blocks=blocks, interpret=True)


def test_interpret_default_follows_backend():
  assert jax.default_backend() == "cpu"
  assert isinstance(tk._interpret(None), type(tk.interpret_params()))  # TPU interpret mode off a TPU
  assert tk._interpret(False) is False


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_lower_to_mosaic_for_tpu(dtype):
  # Cross-platform lowering on CPU runs the Pallas -> Mosaic TPU lowering (block-shape tiling rules, supported
  # primitives); compiling the Mosaic module itself needs a TPU. 350M ff->d shapes: d_in = 2736 is not a multiple
  # of bd = 512, k = 136 needs two 128-channel chunks, 300 tokens leave a partial 256-row block.
  m, d, k, n = 300, 2736, 136, 1024
  sds = jax.ShapeDtypeStruct
  x, idx, w, dy, g = sds((m, d), dtype), sds((k,), jnp.int32), sds((k, n), dtype), sds((m, n), dtype), sds((m, k), dtype)
  calls = [(lambda a, i, b: tk.gather_matmul_fwd(a, i, b, interpret=False), (x, idx, w)),
           (lambda a, i, b: tk.gather_matmul_dw(a, i, b, interpret=False), (x, idx, dy)),
           (lambda a, i: tk.scatter_dx(a, i, d, interpret=False), (g, idx))]
  for fn, args in calls:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
