"""Linear-layer kinds with one call signature, y = layer(x), kernels in the [d_in, d_out] layout."""

from __future__ import annotations

from flax import nnx

from lostjax.layers.dense import Dense
from lostjax.layers.lost import Lost, SparseIndex, decompose
from lostjax.layers.lowrank import LowRank
from lostjax.layers.sltrain import SLTrain

KINDS = ("dense", "lowrank", "lost", "sltrain")


def make_linear(kind: str, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=(None, None), rank: int = 0,
                sparsity: float = 0.05, gamma: float = 0.5, activation: str | None = None,
                init_std: float = 0.02, lowrank_init: str = "svd", score: str = "l2",
                residual_rank: int | None = None, sparse_values: str = "original", sparse_impl: str = "gather_xla",
                dtype="float32", param_dtype="float32") -> nnx.Module:
  """Builds one linear layer of the given kind; options that a kind does not use are ignored."""
  if kind == "dense":
    return Dense(d_in, d_out, rngs=rngs, axes=axes, init_std=init_std, dtype=dtype, param_dtype=param_dtype)
  if kind == "lowrank":
    return LowRank(d_in, d_out, rank=rank, rngs=rngs, axes=axes, init_std=init_std, init=lowrank_init,
                   activation=activation, dtype=dtype, param_dtype=param_dtype)
  if kind == "lost":
    return Lost(d_in, d_out, rank=rank, sparsity=sparsity, gamma=gamma, rngs=rngs, axes=axes,
                init_std=init_std, activation=activation, score=score, residual_rank=residual_rank,
                sparse_values=sparse_values, sparse_impl=sparse_impl, dtype=dtype, param_dtype=param_dtype)
  if kind == "sltrain":
    return SLTrain(d_in, d_out, rank=rank, density=sparsity, rngs=rngs, axes=axes, init_std=init_std, dtype=dtype,
                   param_dtype=param_dtype)
  raise ValueError(f"unknown linear kind {kind!r}; expected one of {KINDS}")


__all__ = ["Dense", "LowRank", "Lost", "SLTrain", "SparseIndex", "decompose", "make_linear", "KINDS"]
