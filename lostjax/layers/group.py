"""Projections that read the same input (q/k/v; gate/up), computed together.

`grouped_call(layers, x)` returns `tuple(layer(x) for layer in layers)`, with the work the layers share done
once when they are all of one kind:

  * Dense:   y_g = x W_g for all g as one GEMM against the stacked kernels [d_in, G, d_out] (stacked on a new
             axis, not concatenated, so a kernel sharded over its output axis stays sharded the same way);
  * LowRank: the G down-projections x A_g as one GEMM (x [A_1 .. A_G]), then σ(h_g) B_g per layer;
  * LOST on a fused path of the sparse-path registry (`sparse_impl='fused_concat'`, the CPU 'auto', or
             'fused_onehot'):
             `kernels.lost_group_matmul` — one down-projection GEMM, one gather of all the layers' channel
             sets, and in the backward one GEMM for all factor gradients and one for the input gradient
             (LOST: Low-rank and Sparse Pre-training for Large Language Models, arXiv 2508.02668; sharing the
             gather across q/k/v and gate/up is our addition).

Parameters are untouched (each projection keeps its own Params, names, sharding and optimizer state), so
checkpoints and optimizers see the same tree with or without grouping; only the order of float additions in
the backward differs. The dense and low-rank GEMMs go through `common.matmul` (2-D weight gradients on
CPU). Mixed kinds, LOST layers on another sparse path, or a mesh that splits features over `tensor` (the
concatenated output features would interleave the devices' slices: measured 30 % more activation memory on a
tensor-2 mesh, docs/scaling.md) fall back to separate calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lostjax import sharding
from lostjax.layers import common
from lostjax.layers.dense import Dense
from lostjax.kernels.registry import IMPLS
from lostjax.layers.lost import Lost
from lostjax.layers.lowrank import LowRank


def _same(layers, *attrs):
  return all(getattr(l, a) == getattr(layers[0], a) for l in layers for a in attrs)


def grouped_call(layers, x: jax.Array) -> tuple[jax.Array, ...]:
  """`tuple(layer(x) for layer in layers)`, sharing the work of same-kind layers (module docstring). The
  weights are read through `lostjax.sharding.gathered_call` and each output is pinned to its layer's activation
  sharding."""
  layers = tuple(layers)
  kinds = {type(l) for l in layers}
  if len(layers) < 2 or len(kinds) != 1 or sharding.splits_features():
    return tuple(l(x) for l in layers)
  kind = kinds.pop()
  dt = layers[0].dtype
  if kind is Dense and _same(layers, "dtype", "d_out"):
    def dense(*args):
      *kernels, x = args
      w = jnp.stack([k.astype(dt) for k in kernels], axis=1)  # [d_in, G, d_out]
      y = common.matmul(x.astype(dt), w.reshape(w.shape[0], -1)).reshape(*x.shape[:-1], *w.shape[1:])
      return tuple(y[..., g, :] for g in range(len(kernels)))
    ys = sharding.gathered_call(dense, [l.kernel for l in layers], x)
  elif kind is LowRank and _same(layers, "dtype", "act"):
    def lowrank(*args):
      *ws, x = args
      g = len(ws) // 2
      a = jnp.concatenate([w.astype(dt) for w in ws[:g]], axis=1)
      h = sharding.constrain_tokens(common.matmul(x.astype(dt), a), "activation_rank")
      out, start = [], 0
      for l, b in zip(layers, ws[g:]):
        hg = h[..., start:start + l.rank]
        start += l.rank
        out.append(common.matmul(hg if l.act is None else l.act(hg), b.astype(dt)))
      return tuple(out)
    ys = sharding.gathered_call(lowrank, [l.a for l in layers] + [l.b for l in layers], x)
  elif (kind is Lost and _same(layers, "dtype", "act", "gamma", "sparse_impl")
        and IMPLS[layers[0].sparse_impl].fused and all(l.k for l in layers)):
    from lostjax import kernels  # lazily: the kernels' tests import this package
    g = len(layers)

    def lost(*args):
      ws, x, idx = args[:3 * g], args[3 * g], args[3 * g + 1:]
      return tuple(kernels.lost_group_matmul(
          x.astype(dt), [w.astype(dt) for w in ws[:g]], [w.astype(dt) for w in ws[g:2 * g]], list(idx),
          [w.astype(dt) for w in ws[2 * g:]], layers[0].gamma, act=layers[0].act, impl=layers[0].sparse_impl))
    ys = sharding.gathered_call(lost, [l.a for l in layers] + [l.b for l in layers] + [l.w_sparse for l in layers],
                                x, *[l.idx[...] for l in layers])
  else:
    return tuple(l(x) for l in layers)
  return tuple(sharding.constrain_tokens(y, l.out_axis) for l, y in zip(layers, ys))
