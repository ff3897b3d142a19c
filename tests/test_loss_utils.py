"""The shared helpers of losses/ (losses/_utils.py) against numpy: dtype choice and the masked reductions."""
import jax
import jax.numpy as jnp
import numpy as np

from losses import _utils as U


def test_compute_dtype():
  assert U.compute_dtype(jnp.ones(2, jnp.bfloat16), None, jnp.ones(2, jnp.int32)) == jnp.float32   # optional args
  assert U.compute_dtype(np.ones(2, np.float16)) == jnp.float32
  with jax.enable_x64(True):
    assert U.compute_dtype(jnp.ones(2, jnp.float32), None, jnp.ones(2, jnp.float64)) == jnp.float64


def test_masked_reductions_over_the_last_axis_of_3d_inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4))
  mask = rng.uniform(size=(2, 3, 4)) < 0.6
  mask[1, 2] = False                                   # an empty row
  with jax.enable_x64(True):
    got = U.masked_logsumexp(jnp.asarray(x), jnp.asarray(mask))
    got1 = U.masked_logsumexp(jnp.asarray(x), jnp.asarray(mask), add_one=True)
  total = np.sum(np.where(mask, np.exp(x), 0.), -1)
  want = np.where(mask.any(-1), np.log(np.where(mask.any(-1), total, 1.)), 0.)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(got1, np.log1p(np.sum(np.where(mask, np.exp(x), 0.), -1)), rtol=1e-12)


def test_safe_sqrt_value_and_zero_gradient_at_zero():
  x = jnp.array([0.0, 4.0, -1.0])
  np.testing.assert_allclose(U.safe_sqrt(x), [0.0, 2.0, 0.0])
  np.testing.assert_allclose(jax.grad(lambda v: U.safe_sqrt(v).sum())(x), [0.0, 0.25, 0.0])
