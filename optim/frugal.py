"""FRUGAL: Full-Rank Updates with GrAdient spLitting, as optax transforms.

Paper: Zmushko, Beznosikov, Takáč, Horváth, "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
Scalable Training", arXiv 2411.07837 (ICML 2025). Reference code: `fzmushko/FRUGAL@c7ebe4c`
(frugal/proj_optimizer_templates.py, galore_projector.py, coordinate_projector.py, adamw.py).

Update rule for a projectable matrix W with gradient G at step k (see docs/frugal_galore.md for the torch layout):
  * every T = update_gap steps (k % T == 0, the first at k = 0) build the projector P_k from the current G; with
    reset_statistics (default, all FRUGAL runs) zero the state-full Adam moments AND its step counter;
  * state-full part:  U_full = s_proj · P⁻¹(Adam(P(G)))  with Adam = (m/bc1)/(√v/√bc2 + ε)  (frugal/adamw.py);
  * state-free part:  U_free = s_proj · s_inact · sign(G − P⁻¹P(G))   ('sign_sgd', default)
                             = s_proj · s_inact · (G − P⁻¹P(G))       ('sgd'),  0 for 'no' (→ GaLore/BAdam);
  * W ← W − lr·(U_full + U_free) − lr·wd·W   (decay with the unscaled lr, on every parameter).
Non-matrix leaves (embeddings, LM head, norms, biases; see `projection.default_label_fn`) get plain AdamW.

Projection kinds (`proj_type`):
  'svd' (GaLore-style top singular vectors of G), 'random' (Haar semi-orthogonal), 'randperm' (random coordinate
  basis) — rank r = round(ρ·dim) of the reduced side chosen by `proj_side` ('std': the smaller side, see
  `projection.reduced_axis` for the JAX [d_in, d_out] layout); 'randk' (int(ρ·m·n) random entries), 'columns'
  (int(ρ·d_in) random torch columns = JAX rows of the [d_in, d_out] kernel), 'rows' (int(ρ·d_out) torch rows =
  JAX columns); 'blockwise' (BAdam-like: a ρ-fraction of the matrices is state-full, re-chosen every T steps).

Blockwise orders (`block_order`; reference `BlockOptimizer._update_states`), over L matrices with k active:
  'descending'  k consecutive matrices L−1, L−2, ... from a cursor that starts at L−1 and moves down by k (cyclic);
  'ascending'   k consecutive matrices 0, 1, ... from a cursor that starts at 0 and moves up by k (cyclic);
  'random'      a fresh random k-subset at every refresh;
  'mirror'      k/2 pairs (j, L−1−j) with j = (s + i) mod ⌊L/2⌋, i < k/2; the cursor s starts at 0 and moves up by
                k/2 modulo ⌊L/2⌋, so both ends of the stack walk towards its middle together. k must be even (the
                reference asserts it; here a ValueError at init); for odd L the middle matrix (index ⌊L/2⌋) is
                never state-full, as in the reference.

Deliberate deviations from the reference:
  * 'blockwise' counts blocks per group of same-shaped matrices (k_g = round(ρ·L_g) active out of L_g, the order
    applied within the group) instead of over one global list of tensors, so that the Adam state has static
    shapes ([k_g, *shape] per group). For LLaMA (7 matrices per layer, three shapes) with descending or ascending
    order this selects the same tensors as the reference; with 'mirror' too when the number of layers is even and
    the reference's k/2 is a whole number of layers (60M/350M/1B at ρ = 0.25). 130M at ρ = 0.25 is refused with
    'mirror' (its 12 down projections give k_g = 3), as the reference refuses its global k = 21.
  * Adam moments are kept in fp32 whatever the parameter dtype; SVD basis vectors are sign-canonicalised.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optim import projection as pj

PROJ_TYPES = pj.BASIS_TYPES + pj.COORD_TYPES + ("blockwise",)
BLOCK_ORDERS = ("descending", "ascending", "random", "mirror")


def _validate(rho, update_gap, proj_type, proj_side, inactive_update_rule, proj_lr_scale, inactive_lr_scale,
              block_order, b1, b2, eps):
  if not pj.is_static_number(rho):
    raise ValueError(f"rho sets state shapes and must be a static Python float (with optax.inject_hyperparams "
                     f"pass static_args=('rho', 'update_gap', 'seed')), got {rho!r}")
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f"rho must be in [0, 1], got {rho}")
  pj.validate_gap(update_gap)
  if proj_type not in PROJ_TYPES:
    raise ValueError(f"unknown FRUGAL proj_type {proj_type!r}; expected one of {PROJ_TYPES}")
  if proj_side not in pj.PROJ_SIDES:
    raise ValueError(f"unknown proj_side {proj_side!r}; expected one of {pj.PROJ_SIDES}")
  if inactive_update_rule not in pj.INACTIVE_RULES:
    raise ValueError(f"unknown inactive_update_rule {inactive_update_rule!r}; expected one of {pj.INACTIVE_RULES}")
  if (pj.is_static_number(proj_lr_scale) and pj.is_static_number(inactive_lr_scale)
      and (proj_lr_scale < 0 or inactive_lr_scale < 0)):
    raise ValueError(f"lr scales must be >= 0, got proj_lr_scale={proj_lr_scale}, "
                     f"inactive_lr_scale={inactive_lr_scale}")
  if block_order not in BLOCK_ORDERS:
    raise ValueError(f"unknown block_order {block_order!r}; expected one of {BLOCK_ORDERS}")
  pj.validate_adam(b1, b2, eps)


def frugal_leaf_spec(rho: float, proj_type: str, proj_side: str = "std"):
  """Returns spec_fn(shape, name) -> LeafSpec for the projection modes (not 'blockwise')."""
  def spec_fn(shape, name=""):
    d_in, d_out = shape
    if proj_type in pj.BASIS_TYPES:
      axis = pj.reduced_axis(shape, proj_side)
      return pj.LeafSpec("basis", axis, pj.round_half_even(shape[axis] * rho), shape)
    if proj_type == "randk":
      return pj.LeafSpec("randk", -1, int(d_in * d_out * rho), shape)
    if proj_type == "columns":
      return pj.LeafSpec("columns", 0, int(d_in * rho), shape)
    return pj.LeafSpec("rows", 1, int(d_out * rho), shape)
  return spec_fn


# ----------------------------------------------------------------------------------------------------------
# Blockwise mode
# ----------------------------------------------------------------------------------------------------------

class FrugalBlockState(NamedTuple):
  count: jax.Array        # int32 steps done
  inner_count: jax.Array  # int32 Adam steps since the last refresh
  key: jax.Array
  active: tuple           # per shape group: int32[k_g] indices (within the group) of the state-full matrices
  next_start: tuple       # per shape group: int32 cyclic cursor (reference `next_block_start`)
  mu: tuple               # per shape group: fp32 [k_g, *shape]
  nu: tuple


def _groups(leaves):
  """Groups leaf positions by shape, in order of first appearance."""
  groups = {}
  for i, leaf in enumerate(leaves):
    groups.setdefault(tuple(leaf.shape), []).append(i)
  return list(groups.items())


def scale_by_frugal_blockwise(rho: float = 0.25, update_gap: int = 200, block_order: str = "descending",
                              b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                              inactive_update_rule: str = "sign_sgd", proj_lr_scale: float = 1.0,
                              inactive_lr_scale: float = 1.0, seed: int = 0) -> optax.GradientTransformation:
  """BAdam-like FRUGAL: per shape group, k_g = round(ρ·L_g) matrices use Adam, the others signSGD/SGD.

  At every refresh (count % update_gap == 0) all Adam state is cleared and a new active set is chosen.
  """
  _validate(rho, update_gap, "blockwise", "std", inactive_update_rule, proj_lr_scale, inactive_lr_scale,
            block_order, b1, b2, eps)

  def init_fn(params):
    paths_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in paths_leaves:
      pj.check_matrix(leaf, pj.path_to_str(path))
    leaves = [leaf for _, leaf in paths_leaves]
    active, start, mu, nu = [], [], [], []
    for shape, idxs in _groups(leaves):
      k = pj.round_half_even(len(idxs) * rho)
      if block_order == "mirror" and k % 2:
        raise ValueError(f"block_order='mirror' needs an even number of active matrices per shape group; the "
                         f"{len(idxs)} matrices of shape {shape} get round({rho}*{len(idxs)}) = {k}")
      active.append(jnp.zeros([k], jnp.int32))
      start.append(jnp.asarray(len(idxs) - 1 if block_order == "descending" else 0, jnp.int32))
      mu.append(jnp.zeros((k,) + shape, jnp.float32))
      nu.append(jnp.zeros((k,) + shape, jnp.float32))
    return FrugalBlockState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), jax.random.PRNGKey(seed),
                            tuple(active), tuple(start), tuple(mu), tuple(nu))

  def choose(order_start, n, k, key):
    ar = jnp.arange(k, dtype=jnp.int32)
    if block_order == "descending":
      act = (order_start - ar) % n
      nxt = order_start - k
      return act, jnp.where(nxt < 0, nxt + n, nxt)
    if block_order == "ascending":
      act = (order_start + ar) % n
      nxt = order_start + k
      return act, jnp.where(nxt >= n, nxt - n, nxt)
    if block_order == "mirror":
      half, h = k // 2, n // 2
      if half == 0:
        return jnp.zeros([0], jnp.int32), order_start
      low = (order_start + jnp.arange(half, dtype=jnp.int32)) % h
      nxt = order_start + half
      return jnp.concatenate([low, n - 1 - low]), jnp.where(nxt >= h, nxt - h, nxt)
    return jax.random.permutation(key, n)[:k].astype(jnp.int32), order_start

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    groups = _groups(leaves)

    def refresh(_):
      keys = jax.random.split(jax.random.fold_in(state.key, state.count), max(len(groups), 1))
      act, nxt = [], []
      for gi, (_, idxs) in enumerate(groups):
        a, s = choose(state.next_start[gi], len(idxs), state.active[gi].shape[0], keys[gi])
        act.append(a)
        nxt.append(s)
      return (tuple(act), tuple(nxt), tuple(jnp.zeros_like(m) for m in state.mu),
              tuple(jnp.zeros_like(v) for v in state.nu), jnp.zeros([], jnp.int32))

    def keep(_):
      return state.active, state.next_start, state.mu, state.nu, state.inner_count

    active, nxt, mu, nu, inner = jax.lax.cond(state.count % update_gap == 0, refresh, keep, None)
    inner = inner + 1
    out = [None] * len(leaves)
    new_mu, new_nu = [], []
    for gi, (_, idxs) in enumerate(groups):
      g = jnp.stack([leaves[i].astype(jnp.float32) for i in idxs])
      if inactive_update_rule == "sign_sgd":
        d = (proj_lr_scale * inactive_lr_scale) * jnp.sign(g)
      elif inactive_update_rule == "sgd":
        d = (proj_lr_scale * inactive_lr_scale) * g
      else:
        d = jnp.zeros_like(g)
      ga = g[active[gi]]
      m = b1 * mu[gi] + (1.0 - b1) * ga
      v = b2 * nu[gi] + (1.0 - b2) * ga * ga
      d = d.at[active[gi]].set(proj_lr_scale * pj.adam_direction(m, v, inner, b1, b2, eps, "frugal"))
      for j, i in enumerate(idxs):
        out[i] = d[j].astype(leaves[i].dtype)
      new_mu.append(m)
      new_nu.append(v)
    new_state = FrugalBlockState(state.count + 1, inner, state.key, tuple(active), tuple(nxt), tuple(new_mu),
                                 tuple(new_nu))
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------------------
# Public factories
# ----------------------------------------------------------------------------------------------------------

def scale_by_frugal(rho: float = 0.25, update_gap: int = 200, proj_type: str = "svd", proj_side: str = "std",
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, reset_statistics: bool = True,
                    inactive_update_rule: str = "sign_sgd", proj_lr_scale: float = 1.0,
                    inactive_lr_scale: float = 1.0, block_order: str = "descending",
                    seed: int = 0) -> optax.GradientTransformation:
  """FRUGAL direction for a tree of 2-D matrices (update = −lr·direction; lr applied by the caller)."""
  _validate(rho, update_gap, proj_type, proj_side, inactive_update_rule, proj_lr_scale, inactive_lr_scale,
            block_order, b1, b2, eps)
  if proj_type == "blockwise":
    return scale_by_frugal_blockwise(rho, update_gap, block_order, b1, b2, eps, inactive_update_rule,
                                     proj_lr_scale, inactive_lr_scale, seed)
  return pj.scale_by_projected_adam(
      spec_fn=frugal_leaf_spec(rho, proj_type, proj_side), proj_type=proj_type, update_gap=update_gap, b1=b1,
      b2=b2, eps=eps, adam_form="frugal", reset_statistics=reset_statistics, active_scale=proj_lr_scale,
      inactive_rule=inactive_update_rule, inactive_scale=proj_lr_scale * inactive_lr_scale, seed=seed)


def frugal(learning_rate: Union[float, optax.Schedule], rho: float = 0.25, update_gap: int = 200,
           proj_type: str = "svd", proj_side: str = "std", b1: float = 0.9, b2: float = 0.999,
           eps: float = 1e-8, weight_decay: float = 0.0, reset_statistics: bool = True,
           inactive_update_rule: str = "sign_sgd", proj_lr_scale: float = 1.0, inactive_lr_scale: float = 1.0,
           block_order: str = "descending", seed: int = 0,
           label_fn: Optional[Callable[[Any], Any]] = None) -> optax.GradientTransformation:
  """FRUGAL on 'matrix'-labelled leaves, AdamW (same lr, betas, eps, wd) on the others.

  label_fn(params) -> tree of 'matrix' / 'other' (default: `projection.default_label_fn`).
  """
  matrix_tx = optax.chain(
      scale_by_frugal(rho, update_gap, proj_type, proj_side, b1, b2, eps, reset_statistics,
                      inactive_update_rule, proj_lr_scale, inactive_lr_scale, block_order, seed),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
  other_tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.partition({pj.MATRIX: matrix_tx, pj.OTHER: other_tx}, label_fn or pj.default_label_fn)
