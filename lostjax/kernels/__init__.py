"""Kernels for the LOST layer (arXiv 2508.02668): the sparse-path registry, column-gather matmul, fused LOST matmul.

``resolve_sparse_impl(name, backend=None)`` = the one place where a sparse-path name (``'auto'``, a registry
name, or a legacy alias) is turned into an implementation (``registry.py``; every function here takes
``impl=<name>``). ``gather_matmul(x, idx, w)`` = ``x[..., idx] @ w`` (XLA, Pallas GPU or Pallas TPU, custom
VJP); ``lost_matmul(x, a, b, idx, w_sparse, gamma, act)`` = ``gamma*act(x a) b + (1-gamma)*x[..., idx] w_sparse``;
``lost_group_matmul`` = several LOST layers reading the same x (q/k/v, gate/up) with one down-projection GEMM
and one gather.
"""
from lostjax.kernels.registry import ALIASES, AUTO, IMPLS, NAMES, SparseImpl, canonical_name, resolve_sparse_impl
from lostjax.kernels.gather_matmul import batch_shard_axes, gather_matmul
from lostjax.kernels.lost_matmul import lost_group_matmul, lost_matmul

__all__ = ["resolve_sparse_impl", "canonical_name", "SparseImpl", "IMPLS", "NAMES", "ALIASES", "AUTO",
           "gather_matmul", "batch_shard_axes", "lost_matmul", "lost_group_matmul"]
