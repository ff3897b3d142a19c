"""Tests for the raw Pallas GPU (Triton) kernel in lostjax.kernels.pallas_gather_matmul (interpret mode, CPU).

LOST sparse branch (arXiv 2508.02668): forward y = x[:, idx] @ w, checked against NumPy float64 products,
including partial tiles on every edge, and the tile-size rules.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax.kernels.pallas_gather_matmul import default_blocks, gather_matmul_fwd


def _data(m, d_in, k, n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, d_in)).astype(np.float32)
  idx = np.sort(rng.choice(d_in, k, replace=False)).astype(np.int32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  dy = rng.standard_normal((m, n)).astype(np.float32)
  return x, idx, w, dy


@pytest.mark.parametrize("m,d_in,k,n,blocks", [
    (17, 23, 5, 19, (16, 16, 16)),   # every dim has a partial tile
    (48, 64, 32, 32, (16, 16, 16)),  # exact multiples, several k steps
    (5, 100, 37, 70, None),          # default blocks, tiny m
])
def test_forward_kernel(m, d_in, k, n, blocks):
  x, idx, w, _ = _data(m, d_in, k, n)
  y = gather_matmul_fwd(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), blocks=blocks,
                        interpret=True)
  ref = x.astype(np.float64)[:, idx] @ w.astype(np.float64)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)


def test_bf16_kernels():
  x, idx, w, dy = _data(33, 40, 9, 24, seed=2)
  xb, wb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w))
  y = gather_matmul_fwd(xb, jnp.asarray(idx), wb, interpret=True)
  assert y.dtype == jnp.bfloat16
  xf, wf = (np.asarray(a.astype(jnp.float32), np.float64) for a in (xb, wb))
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), xf[:, idx] @ wf, rtol=2e-2,
                             atol=5e-2)


def test_default_blocks_are_triton_legal():
  for shape in [(1, 1, 1), (16384, 51, 1024), (16384, 136, 1024), (7, 273, 5461), (100, 16, 17)]:
    blocks = default_blocks(*shape)
    assert all(b >= 16 and b & (b - 1) == 0 for b in blocks), (shape, blocks)


def test_bad_blocks_raise():
  x, idx, w, _ = _data(8, 10, 3, 16)
  with pytest.raises(ValueError, match="powers of two"):
    gather_matmul_fwd(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), blocks=(8, 16, 16),
                      interpret=True)
