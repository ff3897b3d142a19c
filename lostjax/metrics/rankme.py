"""RankMe: the smooth effective rank of an embedding matrix.

Paper: Q. Garrido, R. Balestriero, L. Najman, Y. LeCun, "RankMe: Assessing the Downstream Performance of
Pretrained Self-Supervised Representations by Their Rank", ICML 2023, arXiv:2210.02885, Eq. (1):

  p_k(Z)    = sigma_k(Z) / ||sigma(Z)||_1 + eps
  RankMe(Z) = exp(-sum_{k=1}^{min(N, K)} p_k log p_k)

where sigma(Z) are the singular values of the raw (not centred, not whitened) N x K embedding matrix Z and
the log is natural. As in the paper and every reimplementation, eps is added *after* normalisation, so the
p_k sum to slightly more than 1. The paper uses N = 25,600 source-dataset samples and eps suited to float32.

Deliberate choices (not fixed by the paper):
- The all-zero matrix (sum of singular values 0) gives p_k = eps, i.e. RankMe ~= 1.0 (as tensorflow_gnn's
  `rankme`, which divides with divide_no_nan); a naive division would give NaN. Gradients there are 0, not NaN.
- The SVD runs in float32 at least (bf16/f16 inputs are upcast); float64 input stays float64.
- eps defaults to 1e-7 (the "float32" value); use eps=1e-12 to reproduce tensorflow_gnn exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lostjax.metrics._checks import check_finite


def _check_matrix(z) -> None:
  shape = np.shape(z)
  if len(shape) != 2:
    raise ValueError(f"rankme expects a 2-D (N, K) embedding matrix, got shape {shape}")
  if shape[0] == 0 or shape[1] == 0:
    raise ValueError(f"rankme expects a non-empty matrix, got shape {shape}")
  dtype = jnp.result_type(z)
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(f"rankme expects a real (float or int) matrix, got dtype {dtype}")
  check_finite(z, "rankme embedding matrix z")


def rankme_from_singular_values(s: jax.Array, eps: float = 1e-7) -> jax.Array:
  """RankMe from a vector of (non-negative) singular values, Eq. (1) of arXiv:2210.02885."""
  s = jnp.asarray(s)
  total = jnp.sum(s)
  positive = total > 0
  safe_total = jnp.where(positive, total, 1.0)  # double-where: no NaN value or gradient at s == 0
  p = jnp.where(positive, s / safe_total, 0.0) + eps
  # 0 log 0 = 0 (only reachable with eps == 0); double-where keeps the gradient finite.
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  return jnp.exp(-jnp.sum(plogp))


def rankme(z: jax.Array, eps: float = 1e-7) -> jax.Array:
  """RankMe effective rank of the embedding matrix `z` of shape (N, K); returns a scalar in [1, min(N, K)].

  Args:
    z: embeddings, one row per sample (the paper uses N = 25,600 rows). Not centred.
    eps: added to the normalised singular values (1e-7 for float32, 1e-12 as tensorflow_gnn).

  Raises:
    ValueError: if `z` is not a non-empty 2-D real matrix, has NaN/inf values (checked outside jit), or eps < 0.
  """
  _check_matrix(z)
  if not eps >= 0:
    raise ValueError(f"rankme eps must be >= 0, got {eps}")
  z = jnp.asarray(z)
  if z.dtype not in (jnp.float32, jnp.float64):
    z = z.astype(jnp.float32)
  s = jnp.linalg.svd(z, compute_uv=False)
  return rankme_from_singular_values(s, eps)
