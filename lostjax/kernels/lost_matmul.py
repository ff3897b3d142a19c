"""Fused LOST layer matmul ``y = gamma * act(x A) B + (1 - gamma) * x[..., I] W_s``.

LOST: Low-rank and Sparse Pre-training for LLMs (Li et al., arXiv 2508.02668); forward of spec
lost_trp_lift.md §1.2 with the fusions suggested in §1.8:

  h  = x A                                   [.., r]      (low-rank down-projection)
  xg = x[..., I]                             [.., k]      (sparse channel selection)
  z  = concat(act(h), xg)                    [.., r + k]
  y  = z @ concat(gamma B, (1 - gamma) W_s)  [.., d_out]  (ONE GEMM for both branches)

Backward (custom VJP, all GEMMs accumulate in float32):
  dz = dy Wcat^T;  dWcat = z^T dy;  dB = gamma dWcat[:r];  dW_s = (1 - gamma) dWcat[r:];
  dgamma = <dWcat[:r], B> - <dWcat[r:], W_s>;  dh = act'(h) * dz[:, :r];  dA = x^T dh;
  dx = dh A^T + scatter(dz[:, r:] into the I columns).

Implementations (``impl``):
* ``'concat'``  : gather with ``jnp.take``; dx = dh A^T then ``.at[..., I].add`` (in place, no zero buffer).
* ``'onehot'``  : selection as a one-hot GEMM: ``[h, xg] = x @ [A, P]`` with ``P = one_hot(I, d_in)^T``
                  (exact in bf16), and ``dx = [dh, dxg] @ [A, P]^T`` (one GEMM, no scatter).
* ``'separate'``: reference composition ``gamma*act(x A) B + (1-gamma)*gather_matmul(x, I, W_s, 'xla')``
                  with plain autodiff for the low-rank branch (three forward GEMMs).
* ``'pallas'``  : as 'separate' but with the Pallas gather-matmul kernel (GPU; interpret on CPU).
* ``'auto'``    : 'concat' (fastest measured on CPU, BENCHMARKS.md; GPU choice pending the
                  bench/layers_gpu.py numbers).
``gamma`` may be a Python float or a scalar array (it then gets a gradient). No bias (LLaMA linears
have none; the dev code's extra bias is a documented deviation we do not copy, spec §1.4 item 4).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lostjax.kernels.gather_matmul import dot_f32 as _dot32
from lostjax.kernels.gather_matmul import gather_matmul

__all__ = ["lost_matmul", "LOST_IMPLS"]

LOST_IMPLS = ("auto", "concat", "onehot", "separate", "pallas")

_ACTS = {
    None: None,
    "identity": None,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
}


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


def _front(x, a, idx, cfg):
  """h = x A (pre-activation) and xg = x[..., idx]."""
  a = a.astype(x.dtype)
  r = a.shape[1]
  if cfg.mode == "onehot":
    hz = _mm(x, jnp.concatenate([a, _onehot_t(idx, cfg.d_in, x.dtype)], axis=1))
    return hz[..., :r], hz[..., r:]
  xg = jnp.take(x, idx, axis=-1, indices_are_sorted=True, unique_indices=True, mode="clip")
  return _mm(x, a), xg


def _wcat(b, w, gamma, dtype):
  return jnp.concatenate([gamma * b.astype(jnp.float32), (1.0 - gamma) * w.astype(jnp.float32)],
                         axis=0).astype(dtype)


def _primal(x, a, b, idx, w, gamma, cfg):
  h, xg = _front(x, a, idx, cfg)
  z = jnp.concatenate([_act(cfg, h), xg], axis=-1)
  return _mm(z, _wcat(b, w, gamma, x.dtype))


def _fwd(x, a, b, idx, w, gamma, cfg):
  h, xg = _front(x, a, idx, cfg)
  z = jnp.concatenate([_act(cfg, h), xg], axis=-1)
  y = _mm(z, _wcat(b, w, gamma, x.dtype))
  return y, (x, a, b, idx, w, gamma, h, xg)


def _bwd(cfg, res, dy):
  x, a, b, idx, w, gamma, h, xg = res
  dt = x.dtype
  dy = dy.astype(dt)
  r = a.shape[1]
  lead = tuple(range(dy.ndim - 1))
  wcat = _wcat(b, w, gamma, dt)
  dz = _dot32(dy, wcat, ((dy.ndim - 1,), (1,))).astype(dt)  # [.., r + k]
  if cfg.act is None:
    az, dh = h, dz[..., :r]
  else:
    az, act_vjp = jax.vjp(cfg.act, h)
    dh = act_vjp(dz[..., :r])[0]
  z = jnp.concatenate([az, xg], axis=-1)
  dwcat = _dot32(z, dy, (lead, lead))  # [r + k, d_out] float32
  db32, dw32 = dwcat[:r], dwcat[r:]
  dgamma = jnp.sum(db32 * b.astype(jnp.float32)) - jnp.sum(dw32 * w.astype(jnp.float32))
  da = _dot32(x, dh, (lead, lead))  # [d_in, r]
  a_c = a.astype(dt)
  if cfg.mode == "onehot":
    acat = jnp.concatenate([a_c, _onehot_t(idx, cfg.d_in, dt)], axis=1)
    dx = _dot32(dz.at[..., :r].set(dh), acat, ((dy.ndim - 1,), (1,))).astype(dt)
  else:
    dx = _dot32(dh, a_c, ((dy.ndim - 1,), (1,))).astype(dt)
    dx = dx.at[..., idx].add(dz[..., r:], indices_are_sorted=True, unique_indices=True)
  dgamma = jnp.asarray(dgamma, jnp.result_type(gamma)).reshape(jnp.shape(gamma))
  return (dx, da.astype(a.dtype), (gamma * db32).astype(b.dtype), None,
          ((1.0 - gamma) * dw32).astype(w.dtype), dgamma)


_lost_fused = jax.custom_vjp(_primal, nondiff_argnums=(6,))
_lost_fused.defvjp(_fwd, _bwd)


def _resolve_act(act):
  if callable(act):
    return act
  if act not in _ACTS:
    raise ValueError(f"act must be None, a callable or one of {sorted(k for k in _ACTS if k)}, "
                     f"got {act!r}")
  return _ACTS[act]


def lost_matmul(x, a, b, idx, w_sparse, gamma, act=None, impl: str = "auto", interpret=None):
  """LOST layer ``gamma * act(x a) b + (1 - gamma) * x[..., idx] w_sparse``.

  Args:
    x: [..., d_in] activations (float32/bfloat16); output has x.dtype.
    a: [d_in, r], b: [r, d_out] low-rank factors.
    idx: int32 [k] sorted unique input-channel indices; w_sparse: [k, d_out].
    gamma: branch weight, Python float or scalar array (differentiable).
    act: None/'identity', 'silu', 'relu', 'gelu', 'tanh' or a callable (elementwise).
    impl: one of LOST_IMPLS (see module docstring).
    interpret: Pallas interpret flag for impl='pallas'.
  """
  if impl not in LOST_IMPLS:
    raise ValueError(f"impl must be one of {LOST_IMPLS}, got {impl!r}")
  x, a, b, w_sparse, idx = map(jnp.asarray, (x, a, b, w_sparse, idx))
  if x.ndim < 1:
    raise ValueError(f"x must be [..., d_in], got shape {x.shape}")
  d_in = x.shape[-1]
  if a.ndim != 2 or a.shape[0] != d_in:
    raise ValueError(f"a must have shape [d_in={d_in}, r], got {a.shape}")
  if b.ndim != 2 or b.shape[0] != a.shape[1]:
    raise ValueError(f"b must have shape [r={a.shape[1]}, d_out], got {b.shape}")
  if w_sparse.ndim != 2 or w_sparse.shape[1] != b.shape[1]:
    raise ValueError(f"w_sparse must have shape [k, d_out={b.shape[1]}], got {w_sparse.shape}")
  if idx.ndim != 1 or idx.shape[0] != w_sparse.shape[0]:
    raise ValueError(f"idx must have shape [k={w_sparse.shape[0]}], got {idx.shape}")
  if np.ndim(gamma) != 0:
    raise ValueError(f"gamma must be a scalar, got shape {np.shape(gamma)}")
  act_fn = _resolve_act(act)
  if impl == "auto":
    impl = "concat"
  if impl in ("separate", "pallas"):
    lr = _mm(_act(_Cfg("concat", act_fn, d_in), _mm(x, a.astype(x.dtype))), b.astype(x.dtype))
    gm_impl = "pallas" if impl == "pallas" else "xla"
    sp = gather_matmul(x, idx, w_sparse, impl=gm_impl, interpret=interpret)
    return (gamma * lr.astype(jnp.float32) + (1.0 - gamma) * sp.astype(jnp.float32)).astype(x.dtype)
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"idx must be integer, got dtype {idx.dtype}")
  gamma = jnp.asarray(gamma, jnp.float32)
  return _lost_fused(x, a, b, idx.astype(jnp.int32), w_sparse, gamma, _Cfg(impl, act_fn, d_in))
