"""LOST: low-rank factors from the SVD of the initial weight plus a channel-sparse complement.

Paper: "LOST: Low-rank and Sparse Pre-training for Large Language Models", Li et al., arXiv 2508.02668.

For a linear weight in the JAX layout W0 ∈ R^{d_in × d_out} (y = x W0), drawn with the layer's dense
initialiser N(0, init_std²), LOST (paper §3):

  1. SVD in float32:            W0 = U Σ Vᵀ,  U: [d_in, m], m = min(d_in, d_out)
  2. low-rank part (trainable): A = U_r Σ_r^{1/2} ∈ R^{d_in×r},  B = Σ_r^{1/2} V_rᵀ ∈ R^{r×d_out}
                                so A·B is the rank-r truncated SVD W_r of W0
  3. residual:                  W_comp = Σ_{i=r+1}^{r+k'} σ_i u_i v_iᵀ   (k' = `residual_rank`, default: all)
  4. channel score:             c_j = ‖W_comp[j, :]‖₂   (the paper's SVD_l2^rem; options: L1, random)
  5. channel set:               I = sorted top-k of c, k = ⌊s·d_in⌋
  6. sparse part (trainable):   W_s = W0[I, :] ∈ R^{k×d_out}   (option: W_comp[I, :])
  7. forward:                   y = γ·σ(x A) B + (1−γ)·x[..., I] W_s

γ is a static float (default 0.5) and σ defaults to the identity. How the sparse term is computed is
`sparse_impl`, a name of the one sparse-path registry (`lostjax.kernels.registry`: 'auto', 'gather_xla',
'gather_onehot_grad', 'fused_concat', 'fused_onehot', 'pallas_gpu', 'pallas_tpu', or a legacy alias), resolved
at construction by `resolve_sparse_impl`; the fused entries compute both branches with one output GEMM.
I is stored as a non-trainable `SparseIndex` variable: it is checkpointed with the model, never seen by the
optimizer (which only receives `nnx.Param` leaves) and never changes during training.

Deliberate deviations from the authors' development code (github.com/JiaxiLi1/Lora-init @ec6ce9b,
``HybridSparseLinear``), each pinned by a test in tests/test_lost.py:
  * the SVD is taken of a fresh dense draw W0, not of an already rank-r product (which would make every
    singular value beyond r ≈ 0 and the channel scores numerical noise);
  * A and B are the SVD factors and are not re-randomised afterwards, so at init
    γ·A·B + (1−γ)·S(W0[I]) is exactly the decomposition the sparse part was chosen against;
  * no bias (LLaMA linears have none; the dev code adds a trainable zero bias).
With k = 0 (s·d_in < 1) the layer has no sparse branch and is γ-scaled low rank.

Contiguous sparse channels (our addition, a re-parameterisation of the same function): when whatever produces the
layer's input can permute its output features for free (the SwiGLU MLP: gate/up columns, elementwise product, then
down), `move_sparse_channels_first` reorders the inputs so that I = 0..k-1; x[..., I] is then a slice, whose
gradient is a pad instead of a scatter-add (`LlamaConfig.lost_contiguous_down`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lostjax import sharding
from lostjax.kernels.registry import IMPLS, resolve_sparse_impl
from lostjax.layers import common
from lostjax.layers.lowrank import svd_factors

SCORES = ("l2", "l1", "random")
SPARSE_VALUES = ("original", "residual")


class SparseIndex(nnx.Variable):
  """Static int32 channel indices of a LOST layer: checkpointed state, not a trainable parameter."""


class Decomposition(NamedTuple):
  a: jax.Array          # [d_in, r]
  b: jax.Array          # [r, d_out]
  w_sparse: jax.Array   # [k, d_out]
  idx: jax.Array        # [k] int32, sorted ascending


def num_sparse_channels(d_in: int, sparsity: float) -> int:
  """k = ⌊s·d_in⌋ (computed exactly for decimal s such as 0.05)."""
  return int(d_in * sparsity + 1e-9)


def check_sparsity(sparsity: float) -> None:
  if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
    raise ValueError(f"sparsity must be a float in [0, 1), got {sparsity!r}")


def decompose(w0: jax.Array, rank: int, sparsity: float, *, score: str = "l2",
              residual_rank: int | None = None, sparse_values: str = "original",
              key: jax.Array | None = None) -> Decomposition:
  """Splits a dense weight w0 [d_in, d_out] into LOST factors, sparse rows and channel indices.

  Args:
    w0: the dense initial weight, layout [d_in, d_out].
    rank: r, with 0 < r < min(d_in, d_out).
    sparsity: s in [0, 1); k = ⌊s·d_in⌋ input channels are kept.
    score: how input channels are ranked: "l2"/"l1" norm of the channel's row of the residual, or "random".
    residual_rank: k', use only singular components r+1..r+k' for the residual (None: all remaining).
    sparse_values: "original" (rows of w0) or "residual" (rows of the residual matrix).
    key: PRNG key, required for score="random".
  """
  if w0.ndim != 2:
    raise ValueError(f"w0 must be 2-D [d_in, d_out], got shape {w0.shape}")
  d_in, d_out = w0.shape
  common.check_rank(rank, d_in, d_out)
  check_sparsity(sparsity)
  if score not in SCORES:
    raise ValueError(f"unknown channel score {score!r}; expected one of {SCORES}")
  if sparse_values not in SPARSE_VALUES:
    raise ValueError(f"unknown sparse_values {sparse_values!r}; expected one of {SPARSE_VALUES}")
  m = min(d_in, d_out)
  if residual_rank is None:
    residual_rank = m - rank
  if not isinstance(residual_rank, int) or residual_rank <= 0:
    raise ValueError(f"residual_rank must be a positive int or None, got {residual_rank!r}")
  stop = min(m, rank + residual_rank)

  w0 = w0.astype(jnp.float32)
  a, b, u, s, vt = svd_factors(w0, rank)
  residual = (u[:, rank:stop] * s[None, rank:stop]) @ vt[rank:stop]
  if score == "l2":
    scores = jnp.linalg.norm(residual, axis=1)
  elif score == "l1":
    scores = jnp.sum(jnp.abs(residual), axis=1)
  else:
    if key is None:
      raise ValueError("score='random' needs a PRNG key")
    scores = jax.random.uniform(key, (d_in,))
  k = num_sparse_channels(d_in, sparsity)
  _, top = jax.lax.top_k(scores, k)
  idx = jnp.sort(top).astype(jnp.int32)
  source = w0 if sparse_values == "original" else residual
  return Decomposition(a=a, b=b, w_sparse=source[idx], idx=idx)


class Lost(nnx.Module):
  """y = γ·σ(x A) B + (1−γ)·x[..., I] W_s."""

  def __init__(self, d_in: int, d_out: int, *, rank: int, sparsity: float, rngs: nnx.Rngs,
               gamma: float = 0.5, axes=(None, None), init_std: float = 0.02, activation: str | None = None,
               score: str = "l2", residual_rank: int | None = None, sparse_values: str = "original",
               sparse_impl: str = "gather_xla", dtype="float32", param_dtype="float32"):
    common.check_dims(d_in, d_out)
    if not isinstance(gamma, (int, float)) or not 0.0 <= float(gamma) <= 1.0:
      raise ValueError(f"gamma must be a float in [0, 1], got {gamma!r}")
    self.d_in, self.d_out, self.rank = d_in, d_out, rank
    self.out_axis = sharding.activation_axis(axes[1])
    self.gamma = float(gamma)
    self.sparse_impl = resolve_sparse_impl(sparse_impl).name  # registry name ('auto' and aliases resolved)
    self.dtype = common.resolve_dtype(dtype)
    self.act = common.resolve_activation(activation)
    pdt = common.resolve_dtype(param_dtype)
    w0 = common.dense_init(rngs.params(), d_in, d_out, init_std)
    dec = decompose(w0, rank, sparsity, score=score, residual_rank=residual_rank,
                    sparse_values=sparse_values, key=rngs.params() if score == "random" else None)
    self.k = int(dec.idx.shape[0])
    self.a = common.param(dec.a.astype(pdt), (axes[0], "rank"))
    self.b = common.param(dec.b.astype(pdt), ("rank", axes[1]))
    self.w_sparse = common.param(dec.w_sparse.astype(pdt), ("sparse", axes[1]))
    self.idx = SparseIndex(dec.idx, out_sharding=("sparse",), eager_sharding=False)
    self.prefix = False  # True: idx is 0..k-1 (set by `move_sparse_channels_first`), the gather is a slice

  def __call__(self, x: jax.Array) -> jax.Array:
    y = sharding.gathered_call(self._apply, (self.a, self.b, self.w_sparse), x, self.idx[...])
    return sharding.constrain_tokens(y, self.out_axis)

  def _apply(self, a, b, w_sparse, x, idx):
    dt = self.dtype
    x, a, b, w_sparse = x.astype(dt), a.astype(dt), b.astype(dt), w_sparse.astype(dt)
    if self.prefix and self.k:
      return self._apply_prefix(a, b, w_sparse, x)
    if IMPLS[self.sparse_impl].fused and self.k:
      from lostjax import kernels
      return kernels.lost_matmul(x, a, b, idx, w_sparse, self.gamma, act=self.act, impl=self.sparse_impl)
    h = sharding.constrain_tokens(common.matmul(x, a), "activation_rank")
    if self.act is not None:
      h = self.act(h)
    y = self.gamma * common.matmul(h, b)
    if self.k:
      y = y + (1.0 - self.gamma) * sparse_matmul(x, idx, w_sparse, impl=self.sparse_impl)
    return y


  def _apply_prefix(self, a, b, w_sparse, x):
    """The layer when its sparse channels are the first k inputs: x[..., :k] is a slice (its gradient a pad, no
    scatter). On a fused path both branches are one GEMM over [σ(x A), x[..., :k]], as in `kernels.lost_matmul`."""
    h = sharding.constrain_tokens(common.matmul(x, a), "activation_rank")
    if self.act is not None:
      h = self.act(h)
    xs = x[..., :self.k]
    if IMPLS[self.sparse_impl].fused:
      w = jnp.concatenate([self.gamma * b, (1.0 - self.gamma) * w_sparse], axis=0)
      return common.matmul(jnp.concatenate([h, xs], axis=-1), w)
    return self.gamma * common.matmul(h, b) + (1.0 - self.gamma) * common.matmul(xs, w_sparse)


def sparse_first_permutation(idx, d_in: int) -> jax.Array:
  """The input order that puts the sparse channels first: idx (in its own order, matching the rows of W_s), then
  the other d_in − k channels ascending; new input j = old input perm[j]."""
  k = idx.shape[0]
  rank = jnp.full((d_in,), k, jnp.int32).at[jnp.asarray(idx)].set(jnp.arange(k, dtype=jnp.int32))
  return jnp.argsort(rank, stable=True).astype(jnp.int32)


def move_sparse_channels_first(layer: Lost) -> jax.Array:
  """Reorders the inputs of a LOST layer so that its k sparse channels come first, in their order: the rows of A
  are permuted, I becomes 0..k-1 and the layer gathers with a slice. Returns the permutation `perm` [d_in]
  (new input j = old input perm[j]); the layer computes the same function of the permuted input x[..., perm],
  so whatever produces x must permute its outputs the same way (`permute_outputs`)."""
  idx = layer.idx[...]
  perm = sparse_first_permutation(idx, layer.d_in)
  layer.a[...] = layer.a[...][perm]
  layer.idx[...] = jnp.arange(layer.k, dtype=idx.dtype)
  layer.prefix = True
  return perm


def permute_outputs(layer: Lost, perm: jax.Array) -> None:
  """Permutes the output features of a LOST layer (columns of B and W_s): y_new = y[..., perm]."""
  layer.b[...] = layer.b[...][:, perm]
  layer.w_sparse[...] = layer.w_sparse[...][:, perm]


def sparse_matmul(x: jax.Array, idx: jax.Array, w: jax.Array, *, impl: str = "gather_xla") -> jax.Array:
  """x[..., idx] @ w through lostjax.kernels.gather_matmul with a sparse-path registry name."""
  from lostjax import kernels
  return kernels.gather_matmul(x, idx, w, impl=impl)
