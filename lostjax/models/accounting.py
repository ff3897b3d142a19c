"""Parameter accounting: total / trainable / linear / dense-equivalent counts and LOST index bytes."""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

from lostjax.layers import Dense, Lost, LowRank, SparseIndex
from lostjax.layers.lost import num_sparse_channels


def lost_closed_form(d_in: int, d_out: int, rank: int, sparsity: float) -> int:
  """Trainable parameters of one LOST matrix: r·(d_in + d_out) + ⌊s·d_in⌋·d_out."""
  return rank * (d_in + d_out) + num_sparse_channels(d_in, sparsity) * d_out


def _size(x) -> int:
  return int(math.prod(x.shape))


def count_params(model: nnx.Module) -> dict[str, int]:
  """Exact integer counts for a model (a real one or an `nnx.eval_shape` abstract one).

  Keys:
    total / trainable: all `nnx.Param` elements (every Param is trainable; LOST indices are not Params).
    linear: parameters of the attention/MLP projections (every Dense/LowRank/Lost except the LM head).
    lm_head, embedding: the dense LM head and the token embedding.
    non_embedding: total − embedding (the N of Kaplan/Chinchilla-style scaling fits).
    dense_equivalent: total with every projection counted as a dense d_in×d_out matrix.
    index_count / index_bytes: the non-trainable LOST channel indices (int32).
  """
  params = nnx.state(model, nnx.Param)
  total = sum(_size(x) for x in _leaves(params))
  linear = dense_eq_linear = 0
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (Dense, LowRank, Lost)) and "lm_head" not in path:
      linear += sum(_size(x) for x in _leaves(nnx.state(node, nnx.Param)))
      dense_eq_linear += node.d_in * node.d_out
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
  }


def _leaves(state):
  import jax
  return [x for x in jax.tree_util.tree_leaves(state) if hasattr(x, "shape") and np.ndim(x) >= 0]
