"""Helpers shared by the oracle tests (numpy, float64)."""
import numpy as np


def np_fd_grad(fun, x, h=1e-6):
  """Central finite differences of a scalar float64 numpy function, one coordinate at a time."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (fun(xp) - fun(xm)) / (2 * h)
  return g


def fd_check(f, args, eps=1e-6, tol=1e-6):
  """Directional finite difference of jitted f (float64 inputs) vs its jitted gradient, along a random direction."""
  import jax
  g = jax.jit(jax.grad(f, argnums=tuple(range(len(args)))))(*args)
  rng = np.random.default_rng(1)
  dirs = [rng.normal(size=np.shape(a)) for a in args]
  fj = jax.jit(f)
  plus = float(fj(*[np.asarray(a) + eps * d for a, d in zip(args, dirs)]))
  minus = float(fj(*[np.asarray(a) - eps * d for a, d in zip(args, dirs)]))
  ana = sum(float(np.sum(np.asarray(gi) * d)) for gi, d in zip(g, dirs))
  np.testing.assert_allclose(ana, (plus - minus) / (2 * eps), rtol=tol, atol=tol)


def raises_while_tracing(match, thunk):
  """The ValueError is raised while tracing (static checks): no compilation, no eager op-by-op dispatch."""
  import jax
  import pytest
  with pytest.raises(ValueError, match=match):
    jax.jit(thunk)()
