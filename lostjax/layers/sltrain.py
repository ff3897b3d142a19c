"""SLTrain linear layer: low-rank plus a sparse matrix with a fixed random support, W = A·B + S.

Han, Jawanpuria, Mishra: "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining" (NeurIPS 2024, arXiv 2406.02214). In this project's [d_in, d_out] layout:

    W = A B + S,       A ∈ R^{d_in×r},  B ∈ R^{r×d_out},
    S = scatter(Ω, v): S_{ij} = v_k if (i, j) = Ω_k, else 0,     |Ω| = ⌊δ · d_in · d_out⌋,
    y = x W.

Ω is drawn once at initialisation, uniformly at random without replacement among the d_in·d_out positions, and never
changes (it is stored as a non-trainable `SparseIndex` of flat positions i·d_out + j, sorted ascending). Only A, B and
the values v are trained. The paper's density is δ = 0.03 (its LLaMA pre-training runs), here `sparsity` (the same
model field as LOST's column ratio; for this kind it is the element density δ). Gradients, g = ∂L/∂y:
∂L/∂A = xᵀ g Bᵀ, ∂L/∂B = (x A)ᵀ g and ∂L/∂v_k = (xᵀ g)_{Ω_k}, the dense weight gradient read at the support
(what JAX's transpose of the scatter gives).

Trainable parameters per matrix: r·(d_in + d_out) + ⌊δ·d_in·d_out⌋, plus |Ω| int32 positions.

Deliberate deviations from the reference code:
* Initialisation: the paper initialises A and B with Kaiming-uniform and the sparse values uniformly; here A and B
  are independent N(0, s²) with s² = init_std / √r (entries of A·B have the dense init's variance init_std², as
  the `normal` init of `LowRank`) and v is N(0, init_std²), the dense init restricted to Ω, so that every layer
  kind of this project starts from the same scale. The low-rank branch has no extra α/r scale factor.
* The reference keeps the dense W out of the saved activations with a custom backward; here the forward builds the
  dense W (one scatter-add per step, a transient d_in·d_out buffer) and XLA's autodiff stores what it needs. The
  FLOPs per token are those of a dense matmul.
"""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
from flax import nnx

from lostjax.layers import common
from lostjax.layers.lost import SparseIndex

DEFAULT_DENSITY = 0.03   # δ of the paper's pre-training runs


def num_sparse_entries(d_in: int, d_out: int, density: float) -> int:
  """|Ω| = ⌊δ·d_in·d_out⌋, at least 1 (computed exactly for decimal δ such as 0.03)."""
  if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
    raise ValueError(f"SLTrain density (model.sparsity) must lie in (0, 1], got {density!r}")
  return max(1, int(fractions.Fraction(str(float(density))) * d_in * d_out))


def sltrain_closed_form(d_in: int, d_out: int, rank: int, density: float) -> int:
  """Trainable parameters of one SLTrain matrix: r·(d_in + d_out) + ⌊δ·d_in·d_out⌋."""
  return rank * (d_in + d_out) + num_sparse_entries(d_in, d_out, density)


class SLTrain(nnx.Module):
  """y = x (A B + S), S with a fixed random support Ω (flat positions `idx`) and trainable values `v`."""

  def __init__(self, d_in: int, d_out: int, *, rank: int, density: float = DEFAULT_DENSITY, rngs: nnx.Rngs,
               axes=(None, None), init_std: float = 0.02, dtype="float32", param_dtype="float32"):
    common.check_dims(d_in, d_out)
    common.check_rank(rank, d_in, d_out)
    nnz = num_sparse_entries(d_in, d_out, density)
    self.d_in, self.d_out, self.rank, self.density, self.nnz = d_in, d_out, rank, float(density), nnz
    self.dtype = common.resolve_dtype(dtype)
    pdt = common.resolve_dtype(param_dtype)
    ka, kb, ks, kv = jax.random.split(rngs.params(), 4)
    s = (init_std / rank ** 0.5) ** 0.5
    self.a = common.param((s * jax.random.normal(ka, (d_in, rank), jnp.float32)).astype(pdt), (axes[0], "rank"))
    self.b = common.param((s * jax.random.normal(kb, (rank, d_out), jnp.float32)).astype(pdt), ("rank", axes[1]))
    flat = jnp.sort(jax.random.choice(ks, d_in * d_out, (nnz,), replace=False)).astype(jnp.int32)
    self.idx = SparseIndex(flat)
    self.v = common.param((init_std * jax.random.normal(kv, (nnz,), jnp.float32)).astype(pdt), (None,))

  def sparse_matrix(self) -> jax.Array:
    """S as a dense [d_in, d_out] array (zeros off the support)."""
    s = jnp.zeros((self.d_in * self.d_out,), self.dtype).at[self.idx[...]].add(self.v[...].astype(self.dtype))
    return s.reshape(self.d_in, self.d_out)

  def weight(self) -> jax.Array:
    """W = A B + S in the compute dtype."""
    ab = common.matmul(self.a[...].astype(self.dtype), self.b[...].astype(self.dtype))
    return ab + self.sparse_matrix()

  def __call__(self, x: jax.Array) -> jax.Array:
    return common.matmul(x.astype(self.dtype), self.weight())
