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
