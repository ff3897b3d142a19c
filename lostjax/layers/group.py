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
CPU). Mixed kinds, or LOST layers on another sparse path, fall back to separate calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lostjax.layers import common
from lostjax.layers.dense import Dense
from lostjax.kernels.registry import IMPLS
from lostjax.layers.lost import Lost
from lostjax.layers.lowrank import LowRank


def _same(layers, *attrs):
  return all(getattr(l, a) == getattr(layers[0], a) for l in layers for a in attrs)


def grouped_call(layers, x: jax.Array) -> tuple[jax.Array, ...]:
  """`tuple(layer(x) for layer in layers)`, sharing the work of same-kind layers (module docstring)."""
  layers = tuple(layers)
  kinds = {type(l) for l in layers}
  if len(layers) < 2 or len(kinds) != 1:
    return tuple(l(x) for l in layers)
  kind = kinds.pop()
  dt = layers[0].dtype
  if kind is Dense and _same(layers, "dtype", "d_out"):
    w = jnp.stack([l.kernel[...].astype(dt) for l in layers], axis=1)  # [d_in, G, d_out]
    y = common.matmul(x.astype(dt), w.reshape(w.shape[0], -1)).reshape(*x.shape[:-1], *w.shape[1:])
    return tuple(y[..., g, :] for g in range(len(layers)))
  if kind is LowRank and _same(layers, "dtype", "act"):
    a = jnp.concatenate([l.a[...].astype(dt) for l in layers], axis=1)
    h = common.matmul(x.astype(dt), a)
    out, start = [], 0
    for l in layers:
      hg = h[..., start:start + l.rank]
      start += l.rank
      out.append(common.matmul(hg if l.act is None else l.act(hg), l.b[...].astype(dt)))
    return tuple(out)
  if (kind is Lost and _same(layers, "dtype", "act", "gamma", "sparse_impl")
      and IMPLS[layers[0].sparse_impl].fused and all(l.k for l in layers)):
    from lostjax import kernels  # lazily: the kernels' tests import this package
    return kernels.lost_group_matmul(
        x.astype(dt), [l.a[...].astype(dt) for l in layers], [l.b[...].astype(dt) for l in layers],
        [l.idx[...] for l in layers], [l.w_sparse[...].astype(dt) for l in layers], layers[0].gamma,
        act=layers[0].act, impl=layers[0].sparse_impl)
  return tuple(l(x) for l in layers)
