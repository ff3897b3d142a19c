"""Low-rank linear layer W = A·B (rank r) with an optional nonlinearity between the factors.

y = σ(x A) B, A: [d_in, r], B: [r, d_out]. With σ = identity this is the plain low-rank baseline of the
GaLore paper's Table 2 ("Low-rank (W=UV)"); with σ = SiLU it is the CoLA-style layer
("CoLA: Compute-Efficient Pre-Training of LLMs via Low-Rank Activation", arXiv 2502.10940, eq. 3:
h = B σ(A x)).

Initialisation options:
  * "svd" (default): the rank-r truncated SVD of a dense N(0, init_std²) draw, split evenly,
    A = U_r √Σ_r, B = √Σ_r V_rᵀ — the same factors LOST starts from.
  * "normal": independent N(0, s²) factors with s² = init_std / √r, so that entries of A·B have the
    variance init_std² of the dense init they replace.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lostjax import sharding
from lostjax.layers import common

INITS = ("svd", "normal")


def svd_factors(w0: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Returns (A, B, U, S, Vt) with A = U_r √S_r, B = √S_r V_rᵀ, SVD taken in float32."""
  u, s, vt = jnp.linalg.svd(w0.astype(jnp.float32), full_matrices=False)
  root = jnp.sqrt(s[:rank])
  a = u[:, :rank] * root[None, :]
  b = root[:, None] * vt[:rank]
  return a, b, u, s, vt


class LowRank(nnx.Module):
  """y = σ(x A) B."""

  def __init__(self, d_in: int, d_out: int, *, rank: int, rngs: nnx.Rngs, axes=(None, None),
               init_std: float = 0.02, init: str = "svd", activation: str | None = None,
               dtype="float32", param_dtype="float32"):
    common.check_dims(d_in, d_out)
    common.check_rank(rank, d_in, d_out)
    if init not in INITS:
      raise ValueError(f"unknown low-rank init {init!r}; expected one of {INITS}")
    self.d_in, self.d_out, self.rank = d_in, d_out, rank
    self.out_axis = sharding.activation_axis(axes[1])
    self.dtype = common.resolve_dtype(dtype)
    self.act = common.resolve_activation(activation)
    pdt = common.resolve_dtype(param_dtype)
    key = rngs.params()
    if init == "svd":
      a, b, *_ = svd_factors(common.dense_init(key, d_in, d_out, init_std), rank)
    else:
      s = (init_std / rank ** 0.5) ** 0.5
      ka, kb = jax.random.split(key)
      a = s * jax.random.normal(ka, (d_in, rank), jnp.float32)
      b = s * jax.random.normal(kb, (rank, d_out), jnp.float32)
    self.a = common.param(a.astype(pdt), (axes[0], "rank"))
    self.b = common.param(b.astype(pdt), ("rank", axes[1]))

  def __call__(self, x: jax.Array) -> jax.Array:
    return sharding.constrain_tokens(sharding.gathered_call(self._apply, (self.a, self.b), x), self.out_axis)

  def _apply(self, a, b, x):
    dt = self.dtype
    h = sharding.constrain_tokens(common.matmul(x.astype(dt), a.astype(dt)), "activation_rank")
    if self.act is not None:
      h = self.act(h)
    return common.matmul(h, b.astype(dt))
