"""Fused LOST layer matmul ``y = gamma * act(x A) B + (1 - gamma) * x[..., I] W_s``.

LOST: Low-rank and Sparse Pre-training for Large Language Models (Li et al., arXiv 2508.02668); the layer's
forward with two fusions (one output GEMM for both branches; one gather shared by layers reading the same x):

  h  = x A                                   [.., r]      (low-rank down-projection)
  xg = x[..., I]                             [.., k]      (sparse channel selection)
  z  = concat(act(h), xg)                    [.., r + k]
  y  = z @ concat(gamma B, (1 - gamma) W_s)  [.., d_out]  (ONE GEMM for both branches)

Backward (custom VJP, all GEMMs accumulate in float32):
  dz = dy Wcat^T;  dWcat = z^T dy;  dB = gamma dWcat[:r];  dW_s = (1 - gamma) dWcat[r:];
  dgamma = <dWcat[:r], B> - <dWcat[r:], W_s>;  dh = act'(h) * dz[:, :r];  dA = x^T dh;
  dx = dh A^T + scatter(dz[:, r:] into the I columns).

Layers that read the same x (``lost_group_matmul``: q/k/v, gate/up) run the
steps that depend only on x once for all G layers: h = x [A_1 .. A_G] (one GEMM), xg = x[..., I_1 .. I_G]
(one gather; the sets may overlap), and in the backward [dA_1 .. dA_G] = x^T [dh_1 .. dh_G] and
dx = [dh_1 .. dh_G] [A_1 .. A_G]^T + scatter-add of all [dz_g[:, r_g:]] (one GEMM each). The per-layer
output GEMMs z_g Wcat_g and their weight gradients stay separate. ``lost_matmul`` is the case G = 1.

``impl`` is a name of the sparse-path registry (``lostjax.kernels.registry``, resolved there, 'auto' included):
* ``fused_concat``: gather with ``jnp.take``; dx = dh A^T then ``.at[..., I].add`` (in place, no zero buffer).
* ``fused_onehot``: selection as a one-hot GEMM: ``[h, xg] = x @ [A, P]`` with ``P = one_hot(I, d_in)^T``
  (exact in bf16), and ``dx = [dh, dxg] @ [A, P]^T`` (one GEMM, no scatter).
* the entries without a fused mode (``gather_xla``, ``gather_onehot_grad``, ``pallas_gpu``, ``pallas_tpu``):
  ``gamma*act(x A) B + (1-gamma)*gather_matmul(x, I, W_s, impl)``, plain autodiff for the low-rank branch.
``gamma`` may be a Python float or a scalar array (it then gets a gradient). No bias (LLaMA linears
have none; the authors' development code adds one, a deviation we do not copy).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lostjax.kernels.gather_matmul import dot_f32 as _dot32
from lostjax.kernels.gather_matmul import gather_matmul
from lostjax.activations import resolve_activation
from lostjax.kernels.registry import resolve_sparse_impl

__all__ = ["lost_matmul", "lost_group_matmul"]

class _Cfg(NamedTuple):
  mode: str  # 'concat' | 'onehot'
  act: Callable | None
  d_in: int


def _mm(a, b):
  """[..., p] @ [p, q] with float32 accumulation, result in a.dtype."""
  return _dot32(a, b, ((a.ndim - 1,), (0,))).astype(a.dtype)


def _onehot_t(idx, d_in, dtype):
  return jax.nn.one_hot(idx, d_in, dtype=dtype).T  # [d_in, k]


def _act(cfg, h):
  return h if cfg.act is None else cfg.act(h)


def _splits(sizes):
  """Start offsets of consecutive column blocks of the given sizes."""
  return np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()


def _cols(v, offs, g):
  return v[..., offs[g]:offs[g + 1]]


def _front(x, a, idx, cfg):
  """Pre-activations h = x [A_1..A_G] [.., Σr] and gathered channels xg = x[.., I_1..I_G] [.., Σk].

  The G down-projections are ONE GEMM and the G gathers ONE gather (the channel sets may overlap).
  """
  dt = x.dtype
  a_cat = jnp.concatenate([ai.astype(dt) for ai in a], axis=1)
  idx_cat = jnp.concatenate(idx)
  if cfg.mode == "onehot":
    hz = _mm(x, jnp.concatenate([a_cat, _onehot_t(idx_cat, cfg.d_in, dt)], axis=1))
    r = a_cat.shape[1]
    return hz[..., :r], hz[..., r:]
  single = len(idx) == 1  # one sorted unique set; a concatenation of several may repeat channels
  xg = jnp.take(x, idx_cat, axis=-1, indices_are_sorted=single, unique_indices=single, mode="clip")
  return _mm(x, a_cat), xg


def _wcat(b, w, gamma, dtype):
  return jnp.concatenate([gamma * b.astype(jnp.float32), (1.0 - gamma) * w.astype(jnp.float32)],
                         axis=0).astype(dtype)


def _outputs(x, a, b, idx, w, gamma, cfg):
  h, xg = _front(x, a, idx, cfg)
  ro, ko = _splits([ai.shape[1] for ai in a]), _splits([i.shape[0] for i in idx])
  ah = _act(cfg, h)
  ys = tuple(_mm(jnp.concatenate([_cols(ah, ro, g), _cols(xg, ko, g)], axis=-1), _wcat(b[g], w[g], gamma, x.dtype))
             for g in range(len(a)))
  return ys, (h, xg)


def _primal(x, a, b, idx, w, gamma, cfg):
  return _outputs(x, a, b, idx, w, gamma, cfg)[0]


def _fwd(x, a, b, idx, w, gamma, cfg):
  ys, (h, xg) = _outputs(x, a, b, idx, w, gamma, cfg)
  # kept for the backward split over `tensor` (its devices hold the same rows): sharding.constrain_saved
  from lostjax import sharding
  return ys, (x, a, b, idx, w, gamma, sharding.constrain_saved(h), sharding.constrain_saved(xg))


def _bwd(cfg, res, dys):
  x, a, b, idx, w, gamma, h, xg = res
  # On a tensor mesh h and xg are stored split over `tensor` and all-gathered where they are read below. Tying them
  # to the cotangent (`lostjax.remat.after`) makes each layer's gathers wait for its own backward: XLA:CPU
  # otherwise issues the gathers of every layer before the first backward layer, each whole copy alive from there
  # on. Without a tensor split there is nothing to gather and the added copies would only cost memory.
  from lostjax import remat, sharding
  if sharding.splits_features():
    h, xg = remat.after(dys, (h, xg))
  # Everything as 2-D [tokens, features] (free reshapes): weight gradients are then single-axis contractions,
  # which XLA:CPU runs without transposed copies (docs/benchmarks/train_step_cpu.md).
  x_shape = x.shape
  x, h, xg = (v.reshape(-1, v.shape[-1]) for v in (x, h, xg))
  dys = tuple(d.reshape(-1, d.shape[-1]) for d in dys)
  dt = x.dtype
  n = len(a)
  ro, ko = _splits([ai.shape[1] for ai in a]), _splits([i.shape[0] for i in idx])
  lead, last = (0,), 1
  if cfg.act is None:
    az = h
  else:
    az, act_vjp = jax.vjp(cfg.act, h)
  dzh, dzg, db, dw = [], [], [], []
  dgamma = jnp.zeros((), jnp.float32)
  for g in range(n):
    dy = dys[g].astype(dt)
    dz = _dot32(dy, _wcat(b[g], w[g], gamma, dt), ((last,), (1,))).astype(dt)  # [.., r_g + k_g]
    r = ro[g + 1] - ro[g]
    z = jnp.concatenate([_cols(az, ro, g), _cols(xg, ko, g)], axis=-1)
    dwcat = _dot32(z, dy, (lead, lead))  # [r_g + k_g, d_out_g] float32
    db32, dw32 = dwcat[:r], dwcat[r:]
    dgamma = dgamma + jnp.sum(db32 * b[g].astype(jnp.float32)) - jnp.sum(dw32 * w[g].astype(jnp.float32))
    db.append((gamma * db32).astype(b[g].dtype))
    dw.append(((1.0 - gamma) * dw32).astype(w[g].dtype))
    dzh.append(dz[..., :r])
    dzg.append(dz[..., r:])
  dzh = jnp.concatenate(dzh, axis=-1) if n > 1 else dzh[0]
  dzg = jnp.concatenate(dzg, axis=-1) if n > 1 else dzg[0]
  dh = dzh if cfg.act is None else act_vjp(dzh)[0]
  da = _dot32(x, dh, (lead, lead))  # [d_in, Σr]: all G factor gradients in one GEMM
  a_cat = jnp.concatenate([ai.astype(dt) for ai in a], axis=1)
  idx_cat = jnp.concatenate(idx)
  if cfg.mode == "onehot":
    acat = jnp.concatenate([a_cat, _onehot_t(idx_cat, cfg.d_in, dt)], axis=1)
    dx = _dot32(jnp.concatenate([dh, dzg], axis=-1), acat, ((last,), (1,))).astype(dt)
  else:
    single = n == 1
    dx = _dot32(dh, a_cat, ((last,), (1,))).astype(dt)
    dx = dx.at[..., idx_cat].add(dzg, indices_are_sorted=single, unique_indices=single)
  dgamma = jnp.asarray(dgamma, jnp.result_type(gamma)).reshape(jnp.shape(gamma))
  da = tuple(_cols(da, ro, g).astype(a[g].dtype) for g in range(n))
  return dx.reshape(x_shape), da, tuple(db), tuple(None for _ in idx), tuple(dw), dgamma


_lost_fused = jax.custom_vjp(_primal, nondiff_argnums=(6,))
_lost_fused.defvjp(_fwd, _bwd)


def _check_one(x, a, b, idx, w_sparse, where=""):
  d_in = x.shape[-1]
  if a.ndim != 2 or a.shape[0] != d_in:
    raise ValueError(f"a{where} must have shape [d_in={d_in}, r], got {a.shape}")
  if b.ndim != 2 or b.shape[0] != a.shape[1]:
    raise ValueError(f"b{where} must have shape [r={a.shape[1]}, d_out], got {b.shape}")
  if w_sparse.ndim != 2 or w_sparse.shape[1] != b.shape[1]:
    raise ValueError(f"w_sparse{where} must have shape [k, d_out={b.shape[1]}], got {w_sparse.shape}")
  if idx.ndim != 1 or idx.shape[0] != w_sparse.shape[0]:
    raise ValueError(f"idx{where} must have shape [k={w_sparse.shape[0]}], got {idx.shape}")
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"idx{where} must be integer, got dtype {idx.dtype}")


def _check_common(x, gamma):
  if x.ndim < 1:
    raise ValueError(f"x must be [..., d_in], got shape {x.shape}")
  if np.ndim(gamma) != 0:
    raise ValueError(f"gamma must be a scalar, got shape {np.shape(gamma)}")


def lost_matmul(x, a, b, idx, w_sparse, gamma, act=None, impl: str = "auto", interpret=None):
  """LOST layer ``gamma * act(x a) b + (1 - gamma) * x[..., idx] w_sparse``.

  Args:
    x: [..., d_in] activations (float32/bfloat16); output has x.dtype.
    a: [d_in, r], b: [r, d_out] low-rank factors.
    idx: int32 [k] sorted unique input-channel indices; w_sparse: [k, d_out].
    gamma: branch weight, Python float or scalar array (differentiable).
    act: None/'identity', 'silu', 'relu', 'gelu', 'tanh' or a callable (elementwise).
    impl: a sparse-path registry name (module docstring); 'auto' per backend.
    interpret: Pallas interpret flag for the Pallas entries (None: interpret on CPU only).
  """
  x, a, b, w_sparse, idx = map(jnp.asarray, (x, a, b, w_sparse, idx))
  _check_common(x, gamma)
  _check_one(x, a, b, idx, w_sparse)
  act_fn = resolve_activation(act)
  d_in = x.shape[-1]
  entry = resolve_sparse_impl(impl)
  if entry.fused is None:
    lr = _mm(_act(_Cfg("concat", act_fn, d_in), _mm(x, a.astype(x.dtype))), b.astype(x.dtype))
    sp = gather_matmul(x, idx, w_sparse, impl=entry.name, interpret=interpret)
    return (gamma * lr.astype(jnp.float32) + (1.0 - gamma) * sp.astype(jnp.float32)).astype(x.dtype)
  gamma = jnp.asarray(gamma, jnp.float32)
  return _lost_fused(x, (a,), (b,), (idx.astype(jnp.int32),), (w_sparse,), gamma,
                     _Cfg(entry.fused, act_fn, d_in))[0]


def lost_group_matmul(x, a, b, idx, w_sparse, gamma, act=None, impl: str = "auto"):
  """G LOST layers that read the same input (q/k/v, or gate/up), with their shared work done once.

  Returns the tuple ``(y_1, .., y_G)``, ``y_g = gamma * act(x a_g) b_g + (1 - gamma) * x[..., idx_g] w_g``,
  equal to G calls of :func:`lost_matmul`. The G down-projections are one GEMM ``x [a_1 .. a_G]``, the G
  channel gathers one gather ``x[..., idx_1 .. idx_G]`` (sets may overlap), and in the backward the G
  factor gradients are one GEMM ``x^T [dh_1 .. dh_G]`` and the input gradient one GEMM
  ``[dh_1 .. dh_G] [a_1 .. a_G]^T`` plus one scatter-add of all sparse columns. The per-layer output GEMMs
  ``[act(h_g), xg_g] @ [gamma b_g; (1 - gamma) w_g]`` stay separate (their weights differ).

  Args:
    x: [..., d_in]; a, b, idx, w_sparse: sequences of G arrays shaped as in :func:`lost_matmul`
      (ranks, k and d_out may differ between layers; d_in is shared).
    gamma, act: shared by the G layers (as in the LLaMA model, where one config sets them).
    impl: a sparse-path registry name. The fused entries share the work as above ('fused_concat' gathers,
      'fused_onehot' selects inside the down-projection GEMM); the others run G separate ``lost_matmul`` calls.
  """
  x = jnp.asarray(x)
  _check_common(x, gamma)
  seqs = [tuple(map(jnp.asarray, v)) for v in (a, b, idx, w_sparse)]
  if len({len(v) for v in seqs}) != 1 or not seqs[0]:
    raise ValueError(f"a, b, idx, w_sparse must be sequences of equal non-zero length, got lengths "
                     f"{[len(v) for v in seqs]}")
  a, b, idx, w_sparse = seqs
  for g in range(len(a)):
    _check_one(x, a[g], b[g], idx[g], w_sparse[g], where=f"[{g}]")
  act_fn = resolve_activation(act)
  entry = resolve_sparse_impl(impl)
  if entry.fused is None:
    return tuple(lost_matmul(x, a[g], b[g], idx[g], w_sparse[g], gamma, act_fn, impl=entry.name)
                 for g in range(len(a)))
  idx = tuple(i.astype(jnp.int32) for i in idx)
  return _lost_fused(x, a, b, idx, w_sparse, jnp.asarray(gamma, jnp.float32),
                     _Cfg(entry.fused, act_fn, x.shape[-1]))
