"""The projections of the decoder and its SwiGLU MLP (shared by the dense blocks and the mixture-of-experts).

Every projection is a linear layer of the kind chosen per group in `LlamaConfig` (dense, low-rank or LOST);
projections that read the same input (q/k/v, gate/up) are computed together when `fuse_projections` is set.
"""

from __future__ import annotations

import jax
from flax import nnx

from lostjax import sharding
from lostjax.layers import make_linear
from lostjax.layers.group import grouped_call
from lostjax.layers.lost import move_sparse_channels_first, permute_outputs
from lostjax.models.config import LlamaConfig


def linear(cfg: LlamaConfig, group: str, d_in: int, d_out: int, axes, rngs):
  """A projection of `group` ('attn' or 'mlp'): the linear kind, rank and LOST options that the config gives it."""
  kind = cfg.attn_kind if group == "attn" else cfg.mlp_kind
  rank = cfg.attn_rank if group == "attn" else cfg.mlp_rank
  return make_linear(kind, d_in, d_out, rngs=rngs, axes=axes, rank=rank, sparsity=cfg.sparsity,
                     gamma=cfg.gamma, activation=cfg.lowrank_act, init_std=cfg.init_std,
                     lowrank_init=cfg.lowrank_init, score=cfg.lost_score,
                     residual_rank=cfg.lost_residual_rank or None, sparse_values=cfg.lost_sparse_values,
                     sparse_impl=cfg.sparse_impl, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def project(cfg: LlamaConfig, layers, x):
  """The projections reading x: together (one GEMM / one gather for the shared work) or one by one."""
  if cfg.fuse_projections:
    return grouped_call(layers, x)
  return tuple(layer(x) for layer in layers)


class Mlp(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.gate = linear(cfg, "mlp", cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
    self.up = linear(cfg, "mlp", cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
    self.down = linear(cfg, "mlp", cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs)
    if cfg.lost_contiguous_down and self.down.k:
      # d_ff channels reordered (down's sparse channels first); silu(gate) * up is elementwise per channel, so
      # permuting gate's and up's output columns the same way leaves the MLP's function unchanged.
      perm = move_sparse_channels_first(self.down)
      permute_outputs(self.gate, perm)
      permute_outputs(self.up, perm)

  def __call__(self, x):
    gate, up = project(self.cfg, (self.gate, self.up), x)
    # column parallel gate/up (hidden features over `tensor`), row parallel down (lostjax.sharding)
    return self.down(sharding.constrain_tokens(jax.nn.silu(gate) * up, "activation_mlp"))
