"""Kernels for the LOST layer (arXiv 2508.02668): column-gather matmul and the fused LOST matmul.

``gather_matmul(x, idx, w)`` = ``x[..., idx] @ w`` (XLA or Pallas/Triton, custom VJP);
``lost_matmul(x, a, b, idx, w_sparse, gamma, act)`` = ``gamma*act(x a) b + (1-gamma)*x[..., idx] w_sparse``;
``lost_group_matmul`` = several LOST layers reading the same x (q/k/v, gate/up) with one down-projection GEMM
and one gather.
"""
from lostjax.kernels.gather_matmul import batch_shard_axes, gather_matmul, resolve_impl

__all__ = ["gather_matmul", "resolve_impl", "batch_shard_axes"]
from lostjax.kernels.lost_matmul import GROUP_IMPLS, LOST_IMPLS, lost_group_matmul, lost_matmul

__all__ += ["lost_matmul", "lost_group_matmul", "LOST_IMPLS", "GROUP_IMPLS"]
