"""TRP: Trained Rank Pruning, as an optax transform wrapping a base optimizer, plus deploy-time factorisation.

Paper: Xu et al., "Trained Rank Pruning for Efficient Deep Neural Networks", arXiv 1812.02402 (IJCAI 2020 version
arXiv 2004.14566). Reference code: `yuhuixu1993/Trained-Rank-Pruning@8cc7470` (cifar-TRP.py, decompose.py).

Method (every m = `period` steps, for every target kernel W):
  * low-rank projection  W ← T = U_k Σ_k V_kᵀ, k = smallest k with Σ_{i≤k} σ_i² / Σ_i σ_i² ≥ e (energy, default 0.9);
  * nuclear-norm regulariser λ·Σ‖W‖_*: its sub-gradient λ·U_k V_kᵀ (energy-truncated singular vectors) is added to
    the gradient before the base optimizer step;
  * the forward/backward pass of the projection step is computed at T, then the base update is applied to T.
Kernels are matricised before the SVD: 2-D [d_in, d_out] as is (whatever the scheme); conv kernels [kh, kw, C, N]
(flax HWIO) with the 'channel' scheme as [kh·kw·C, N] (torch NC: [N, C·kh·kw] up to a row permutation), the
'spatial' scheme as [C·kh, N·kw] (torch VH), or the 'decouple' scheme (torch ND, network decoupling) as N separate
matrices W_i[C, kh·kw], one per output filter i (torch `weight[i].view(C, kh·kw)`), all SVD'd in one batched call
(the SVD, rank and masks are batched over the filter axis). Shapes stay static: singular values are masked, never
sliced.

ND, as read from the reference ("rank = max over filters, capped at min(C, kh·kw), energy 0.85" is the deploy
rule only; docs/trp.md):
  * training (`low_rank_approx`, type ND): every filter is truncated at its OWN energy-e rank k_i (e = 0.9 as for
    NC/VH) and the nuclear sub-gradient is U_{k_i} V_{k_i}ᵀ per filter, i.e. the regulariser is Σ_i ‖W_i‖_*. The
    state keeps one int32 rank per filter ([N] per conv kernel instead of a scalar);
  * deploy (`network_decouple` + `show_low_rank`; here `trp_factorize(scheme='decouple')`): ONE rank for all
    filters, k = min(max_i k_i, min(C, kh·kw)) with k_i from EnergyThreshold(0.85) (the `--evaluate` default for
    ND; the cap never binds since k_i ≤ min(C, kh·kw)), giving k parallel paths of a 1×1 conv C→N followed by a
    depthwise kh×kw conv; cost (N·C + N·kh·kw)·k MACs per output pixel.

Timing, as an optax transform (which only sees the gradient at the current weights): the projection is folded into
the update of the step BEFORE each multiple of m, i.e. the update of step c with (c+1) % m == 0 returns
T(W_c + u_c) − W_c, so that the weights entering the forward pass of steps m, 2m, ... are exactly the reference's T.
For the projection at step 0 call `trp_project_params` once on the initial weights AFTER `tx.init` (init records the
ranks of the initial weights); without it the first period is plain training.

Nuclear sub-gradient: choice made here — by default ONLY on projection steps (c % m == 0), with the ranks k of that
projection, as the reference code does (`nuclear_every_step=False`); the paper's formulation applies it every
step (`nuclear_every_step=True`: the other steps use the energy-e truncation of the current W). On projection steps
the current W equals T, whose top-k singular vectors are the reference's U_k, V_k (one extra SVD per period).

`trp_factorize` turns a (TRP-trained) kernel into factored low-rank layers (value threshold 0.05 as the reference's
deploy path, or an energy threshold; energy 0.85 for ND) and reports the multiply-accumulate reduction (stride-1
convs).

Deviation: singular directions with σ = 0 are left out of the nuclear sub-gradient (a zero matrix or filter gets 0,
the minimum-norm sub-gradient); the reference adds an arbitrary U Vᵀ there.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim import projection as pj

SCHEMES = ("channel", "spatial", "decouple")
TARGET = pj.MATRIX


def _is_trp_target(path: str, leaf) -> bool:
  return pj.default_is_matrix(path, leaf) or (len(leaf.shape) == 4 and "kernel" in path.lower())


trp_label_fn = pj.make_label_fn(_is_trp_target)


def to_matrix(w, scheme: str = "channel"):
  """The matrix the SVD sees: 2-D as is; conv [kh, kw, C, N] per scheme ('decouple': a stack [N, C, kh·kw])."""
  if w.ndim == 2:
    return w
  if w.ndim != 4:
    raise ValueError(f"TRP kernels must be 2-D or 4-D [kh, kw, C, N], got shape {tuple(w.shape)}")
  kh, kw, c, n = w.shape
  if scheme == "channel":
    return w.reshape(kh * kw * c, n)
  if scheme == "decouple":
    return w.transpose(3, 2, 0, 1).reshape(n, c, kh * kw)
  return w.transpose(2, 0, 3, 1).reshape(c * kh, n * kw)


def from_matrix(m, shape, scheme: str = "channel"):
  if len(shape) == 2:
    return m
  kh, kw, c, n = shape
  if scheme == "channel":
    return m.reshape(shape)
  if scheme == "decouple":
    return m.reshape(n, c, kh, kw).transpose(2, 3, 1, 0)
  return m.reshape(c, kh, n, kw).transpose(1, 3, 0, 2)


def energy_rank(s, energy: float):
  """Smallest k with cumsum(s²)[k-1] / sum(s²) >= energy (s sorted descending, last axis); 1 for a zero matrix."""
  s2 = jnp.square(s)
  total = jnp.sum(s2, axis=-1, keepdims=True)
  frac = jnp.cumsum(s2, axis=-1) / jnp.where(total > 0, total, 1.0)
  k = jnp.sum(frac < energy, axis=-1) + 1
  return jnp.clip(k, 1, s.shape[-1]).astype(jnp.int32)


def _svd(w, scheme):
  return pj.svd(to_matrix(w.astype(jnp.float32), scheme))   # 'decouple' convs: one SVD per filter (pj.svd)


def _top(s, k):
  """Mask of the top-k singular values (k: one rank per matrix of the batch)."""
  return jnp.arange(s.shape[-1]) < jnp.expand_dims(k, -1)


def truncate(w, energy: float, scheme: str = "channel"):
  """(T, k): the energy-e truncated SVD of w (same shape, fp32) and its rank ([N] ranks for 'decouple' convs)."""
  u, s, vh = _svd(w, scheme)
  k = energy_rank(s, energy)
  s = jnp.where(_top(s, k), s, 0.0)
  return from_matrix((u * s[..., None, :]) @ vh, w.shape, scheme), k


def current_rank(w, energy: float, scheme: str = "channel"):
  return energy_rank(_svd(w, scheme)[1], energy)


def nuclear_subgradient(w, k, scheme: str = "channel"):
  """U_k V_kᵀ of the matricised w (top-k singular vectors with σ > 0, k traced), in w's shape."""
  u, s, vh = _svd(w, scheme)
  mask = (_top(s, k) & (s > 0)).astype(jnp.float32)
  return from_matrix((u * mask[..., None, :]) @ vh, w.shape, scheme)


def _targets(params, label_fn):
  labels = jax.tree_util.tree_leaves(label_fn(params))
  return [lab == TARGET for lab in labels]


def trp_project_params(params, energy: float = 0.9, scheme: str = "channel",
                       label_fn: Optional[Callable[[Any], Any]] = None):
  """Replaces every target kernel by its energy-truncated SVD (the reference's step-0 projection)."""
  label_fn = label_fn or trp_label_fn
  leaves, treedef = jax.tree_util.tree_flatten(params)
  pos = [i for i, t in enumerate(_targets(params, label_fn)) if t]
  got = pj.map_by_shape(lambda w: truncate(w, energy, scheme)[0], [leaves[i] for i in pos])
  out = list(leaves)
  for i, t_w in zip(pos, got):
    out[i] = t_w.astype(leaves[i].dtype)
  return treedef.unflatten(out)


class TrpState(NamedTuple):
  count: jax.Array
  base_state: Any
  ranks: tuple  # int32 rank of the last projection, one per target kernel (flatten order)


def trp(base_optimizer: optax.GradientTransformation, energy: float = 0.9, period: int = 5,
        nuclear_weight: float = 3e-4, scheme: str = "channel", nuclear_every_step: bool = False,
        label_fn: Optional[Callable[[Any], Any]] = None) -> optax.GradientTransformation:
  """TRP around `base_optimizer` (e.g. optax.sgd(0.1, momentum=0.9)); needs params in update().

  Defaults: e = 0.9 and λ = 3e-4 (reference README); m = 5 (`train_TPR.sh`, the code default is 1).
  scheme: how conv kernels are matricised, 'channel' (NC), 'spatial' (VH) or 'decouple' (ND, per-filter ranks).
  label_fn(params) -> 'matrix' for target kernels (default: dense matrices by the projection rule + 4-D 'kernel').
  """
  if not 0.0 < energy <= 1.0:
    raise ValueError(f"TRP energy must be in (0, 1], got {energy}")
  pj.validate_gap(period)
  if nuclear_weight < 0:
    raise ValueError(f"TRP nuclear_weight must be >= 0, got {nuclear_weight}")
  if scheme not in SCHEMES:
    raise ValueError(f"unknown TRP scheme {scheme!r}; expected one of {SCHEMES}")
  label_fn = label_fn or trp_label_fn

  def init_fn(params):
    leaves = jax.tree_util.tree_leaves(params)
    targets = _targets(params, label_fn)
    tw = [w for w, t in zip(leaves, targets) if t]
    for w in tw:
      if w.ndim not in (2, 4):
        raise ValueError(f"TRP target kernels must be 2-D or 4-D, got shape {tuple(w.shape)}")
    ranks = pj.map_by_shape(lambda w: truncate(w, energy, scheme)[1], tw) if tw else []
    return TrpState(jnp.zeros([], jnp.int32), base_optimizer.init(params), tuple(ranks))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("TRP needs params in update()")
    c = state.count
    g_l, treedef = jax.tree_util.tree_flatten(updates)
    w_l = treedef.flatten_up_to(params)
    targets = _targets(params, label_fn)
    t_pos = [i for i, t in enumerate(targets) if t]
    proj_step = c % period == 0

    if nuclear_weight > 0 and t_pos:
      def one(w, k):
        if nuclear_every_step:
          k = jnp.where(proj_step, k, current_rank(w, energy, scheme))
        return nuclear_weight * nuclear_subgradient(w, k, scheme)

      def nuclear(_):
        return pj.map_by_shape(one, [w_l[i] for i in t_pos], list(state.ranks))

      zeros = lambda _: [jnp.zeros(w_l[i].shape, jnp.float32) for i in t_pos]
      subs = nuclear(None) if nuclear_every_step else jax.lax.cond(proj_step, nuclear, zeros, None)
      g_l = list(g_l)
      for j, i in enumerate(t_pos):
        g_l[i] = (g_l[i].astype(jnp.float32) + subs[j]).astype(g_l[i].dtype)
    u, base_state = base_optimizer.update(treedef.unflatten(g_l), state.base_state, params)
    u_l = treedef.flatten_up_to(u)

    def project(_):
      def one(w, u):
        t_w, k = truncate(w.astype(jnp.float32) + u.astype(jnp.float32), energy, scheme)
        return (t_w - w.astype(jnp.float32)).astype(u.dtype), k
      got = pj.map_by_shape(one, [w_l[i] for i in t_pos], [u_l[i] for i in t_pos])
      return [d for d, _ in got], tuple(k for _, k in got)

    keep = lambda _: ([u_l[i] for i in t_pos], state.ranks)
    new_u, ranks = jax.lax.cond((c + 1) % period == 0, project, keep, None) if t_pos else ([], ())
    u_l = list(u_l)
    for j, i in enumerate(t_pos):
      u_l[i] = new_u[j]
    return treedef.unflatten(u_l), TrpState(c + 1, base_state, tuple(ranks))

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------------------
# Deployment: factored layers and FLOPs
# ----------------------------------------------------------------------------------------------------------

def trp_factorize(kernel, scheme: str = "channel", value_threshold: Optional[float] = None,
                  energy: Optional[float] = None):
  """Factors a kernel into low-rank layers (outside jit; the rank is data dependent).

  Rank: number of singular values >= value_threshold, or the energy rank if `energy` is given; at least 1. With
  neither given, the reference's deploy defaults: value threshold 0.05, and energy 0.85 for 'decouple' convs, where
  the per-filter ranks k_i are reduced to one rank min(max_i k_i, min(C, kh·kw)). 2-D kernels are factored as
  matrices under every scheme. Returns a dict with
    'factors': 2-D: (A [d_in, k], B [k, d_out]) with W ≈ A @ B;
               channel conv: (K1 [kh, kw, C, k], K2 [1, 1, k, N]);  spatial conv: (K1 [kh, 1, C, k], K2 [1, kw, k, N]);
               decouple conv: (PW [k, 1, 1, C, N], DW [k, kh, kw, 1, N]): W ≈ Σ_j depthwise(conv1x1(x, PW[j]), DW[j])
               (DW[j] is a flax HWIO depthwise kernel, feature_group_count = N);
    'rank', 'macs_dense', 'macs_factored' (per token / per output pixel, stride 1) and 'flop_reduction' (ratio);
    'filter_ranks' (decouple convs only): the per-filter ranks k_i.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"unknown TRP scheme {scheme!r}; expected one of {SCHEMES}")
  w = np.asarray(kernel, np.float32)
  if w.ndim not in (2, 4):
    raise ValueError(f"kernel must be 2-D or 4-D [kh, kw, C, N], got shape {w.shape}")
  decouple = scheme == "decouple" and w.ndim == 4
  if energy is None and value_threshold is None:
    energy, value_threshold = (0.85, None) if decouple else (None, 0.05)
  u, s, vh = np.linalg.svd(np.asarray(to_matrix(jnp.asarray(w), scheme)), full_matrices=False)
  if energy is not None:
    if not 0.0 < energy <= 1.0:
      raise ValueError(f"energy must be in (0, 1], got {energy}")
    ranks = np.asarray(energy_rank(jnp.asarray(s), energy))
  else:
    if value_threshold < 0:
      raise ValueError(f"value_threshold must be >= 0, got {value_threshold}")
    ranks = np.sum(s >= value_threshold, axis=-1)
  if decouple:
    kh, kw, c, n = w.shape
    k = max(1, min(int(ranks.max()), min(c, kh * kw)))
    root = np.sqrt(s[:, :k])                                           # [N, k]
    pw = (u[:, :, :k] * root[:, None, :]).transpose(2, 1, 0)           # [k, C, N]
    dw = (root[:, :, None] * vh[:, :k, :]).reshape(n, k, kh, kw).transpose(1, 2, 3, 0)  # [k, kh, kw, N]
    return {"factors": (pw[:, None, None], dw[:, :, :, None, :]), "rank": k, "filter_ranks": ranks,
            "macs_dense": kh * kw * c * n, "macs_factored": k * (n * c + n * kh * kw),
            "flop_reduction": kh * kw * c * n / (k * (n * c + n * kh * kw))}
  k = max(1, int(ranks))
  root = np.sqrt(s[:k])
  left, right = u[:, :k] * root, root[:, None] * vh[:k]
  if w.ndim == 2:
    d_in, d_out = w.shape
    factors, dense, fact = (left, right), d_in * d_out, k * (d_in + d_out)
  else:
    kh, kw, c, n = w.shape
    dense = kh * kw * c * n
    if scheme == "channel":
      factors = (left.reshape(kh, kw, c, k), right.reshape(1, 1, k, n))
      fact = kh * kw * c * k + k * n
    else:
      k1 = left.reshape(c, kh, k).transpose(1, 0, 2)[:, None, :, :]
      k2 = right.reshape(k, n, kw).transpose(2, 0, 1)[None]
      factors, fact = (k1, k2), kh * c * k + kw * k * n
  return {"factors": factors, "rank": k, "macs_dense": dense, "macs_factored": fact,
          "flop_reduction": dense / fact}
