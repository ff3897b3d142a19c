"""lostjax.layers.common.matmul: same values and gradients as jnp.dot, and a 2-D weight-gradient GEMM on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax.layers import common


@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_grads_equal_jnp_dot(lead, dtype):
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, lead + (12,)).astype(dtype)
  w = jax.random.normal(kw, (12, 9)).astype(dtype)
  c = jax.random.normal(kc, lead + (9,))
  loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w).astype(jnp.float32)) * c))
  y = jax.jit(common.matmul)(x, w)
  assert y.dtype == dtype and y.shape == lead + (9,)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(jnp.dot(x, w), np.float32))
  got = jax.jit(jax.grad(loss(common.matmul), (0, 1)))(x, w)
  ref = jax.grad(loss(jnp.dot), (0, 1))(x, w)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  for g, r in zip(got, ref):
    assert g.dtype == r.dtype
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(r, np.float64), rtol=tol, atol=tol)
  # float64 numpy oracle for dW: sum over every token of x ⊗ dy
  x64, dy64 = np.asarray(x, np.float64), np.asarray(jnp.cos(jnp.dot(x, w).astype(jnp.float32)) * c, np.float64)
  ref_dw = np.zeros((12, 9))
  for xt, dyt in zip(x64.reshape(-1, 12), dy64.reshape(-1, 9)):
    ref_dw += np.outer(xt, dyt)
  np.testing.assert_allclose(np.asarray(got[1], np.float64), ref_dw, rtol=5 * tol, atol=5 * tol)


def test_cpu_weight_gradient_is_one_2d_gemm():
  x = jnp.ones((2, 3, 8))
  w = jnp.ones((8, 4))
  hlo = jax.jit(jax.grad(lambda w: jnp.sum(common.matmul(x, w)))).lower(w).as_text()
  # the dW dot contracts the flattened token axis of a 2-D [6, 8] operand
  assert "(tensor<6x8xf32>, tensor<6x4xf32>) -> tensor<8x4xf32>" in hlo, hlo
