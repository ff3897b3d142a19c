"""Parameter accounting: total / trainable / linear / dense-equivalent counts and LOST index bytes."""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

from lostjax.layers import Dense, Lost, LowRank, SLTrain, SparseIndex
from lostjax.layers.lost import num_sparse_channels
from lostjax.models.moe import MoeMlp


def lost_closed_form(d_in: int, d_out: int, rank: int, sparsity: float, *, experts: int = 1) -> int:
  """Trainable parameters of one LOST matrix: r·(d_in + d_out) + ⌊s·d_in⌋·d_out (times `experts` for a stack of
  mixture-of-experts copies, each with its own factors and channel set)."""
  if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
    raise ValueError(f"experts must be a positive int, got {experts!r}")
  return experts * (rank * (d_in + d_out) + num_sparse_channels(d_in, sparsity) * d_out)


def _size(x) -> int:
  return int(math.prod(x.shape))


def count_params(model: nnx.Module) -> dict[str, int]:
  """Exact integer counts for a model (a real one or an `nnx.eval_shape` abstract one).

  Keys:
    total / trainable: all `nnx.Param` elements (every Param is trainable; LOST indices are not Params).
    linear: parameters of the attention/MLP projections (every Dense/LowRank/Lost/SLTrain except the LM head).
    lm_head, embedding: the dense LM head and the token embedding.
    non_embedding: total − embedding (the N of Kaplan/Chinchilla-style scaling fits).
    dense_equivalent: total with every projection counted as a dense d_in×d_out matrix.
    index_count / index_bytes: the non-trainable LOST channel indices and SLTrain support positions (int32).
    expert: parameters of the stacked mixture-of-experts MLPs (all experts; 0 for a dense MLP; routers excluded).
    active / active_non_embedding: parameters used per token: total (resp. non_embedding) with each MoE layer's
      experts counted top_k times instead of E times (equal to total for dense models; routers count fully).
  Stacked experts count E copies everywhere else (total, linear, dense_equivalent, index_count).
  """
  params = nnx.state(model, nnx.Param)
  total = sum(_size(x) for x in _leaves(params))
  linear = dense_eq_linear = 0
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (Dense, LowRank, Lost, SLTrain)) and "lm_head" not in path:
      leaves = _leaves(nnx.state(node, nnx.Param))
      linear += sum(_size(x) for x in leaves)
      dense_eq_linear += node.d_in * node.d_out * int(math.prod(leaves[0].shape[:-2]))   # × stacked experts
  expert = active_expert = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, MoeMlp):
      n = sum(_size(x) for x in _leaves(nnx.state(node.experts, nnx.Param)))
      expert += n
      active_expert += n // node.num_experts * node.top_k
  index_count = sum(_size(x) for x in _leaves(nnx.state(model, SparseIndex)))
  embedding = _size(model.embed.embedding) if hasattr(model, "embed") else 0
  lm_head = _size(model.lm_head.kernel) if hasattr(model, "lm_head") else 0
  return {
      "total": int(total),
      "trainable": int(total),
      "linear": int(linear),
      "lm_head": int(lm_head),
      "embedding": int(embedding),
      "non_embedding": int(total - embedding),
      "dense_equivalent": int(total - linear + dense_eq_linear),
      "index_count": int(index_count),
      "index_bytes": int(4 * index_count),
      "expert": int(expert),
      "active": int(total - expert + active_expert),
      "active_non_embedding": int(total - embedding - expert + active_expert),
  }


def _leaves(state):
  import jax
  return [x for x in jax.tree_util.tree_leaves(state) if hasattr(x, "shape") and np.ndim(x) >= 0]
