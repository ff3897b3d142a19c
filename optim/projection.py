"""Shared pieces of the projected optimizers (FRUGAL, GaLore): parameter labels and projected Adam.

Layout convention. JAX/Flax dense kernels are stored as W[d_in, d_out] (y = x @ W), the transpose of PyTorch's
nn.Linear.weight[out, in]. The reference implementations (GaLore arXiv 2403.03507, `jiaweizzhao/GaLore`;
FRUGAL arXiv 2411.07837, `fzmushko/FRUGAL`) choose the projection side on the torch matrix G_t[m=out, n=in]
with the 'std' rule: if m >= n project on the right (reduce n = in), else on the left (reduce m = out).
On the JAX matrix G = G_tᵀ [in, out] the same choice reads: reduce axis 0 (d_in) if d_out >= d_in, else reduce
axis 1 (d_out). The reduced side is always the smaller dimension, and for square matrices it is d_in (torch's
"right" branch). `reduced_axis` implements this; tests/test_optim_galore.py pins it against a torch-layout
numpy transcription of the reference.

Projection of a matrix G with a basis P[dim, r] of the reduced axis a:
  a = 0:  down(G) = Pᵀ G  [r, d_out],   up(L) = P L
  a = 1:  down(G) = G P   [d_in, r],    up(L) = L Pᵀ
Coordinate projections (FRUGAL RandK/columns/rows) gather the selected entries; up() scatters into zeros.

Deliberate deviation: SVD singular vectors are sign-canonicalised (the entry of largest magnitude in each basis
vector is made positive). The reference keeps whatever sign LAPACK returns, which is arbitrary; fixing it makes
runs deterministic across backends and lets GaLore (which keeps moments across basis changes) be compared with a
numpy transcription. It does not change the subspace.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lostjax.pytree import key_to_str, path_to_str  # noqa: F401  (re-exported: optim.projection.path_to_str)

MATRIX = "matrix"
OTHER = "other"

BASIS_TYPES = ("svd", "random", "randperm")
COORD_TYPES = ("randk", "columns", "rows")
PROJ_SIDES = ("std", "reverse_std", "left", "right")
INACTIVE_RULES = ("sign_sgd", "sgd", "no")


# ----------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------

def default_is_matrix(path: str, leaf) -> bool:
  """A 2-D leaf not under an embedding, the LM head or a norm is a projectable matrix."""
  p = path.lower()
  return len(leaf.shape) == 2 and not any(s in p for s in ("embed", "lm_head", "norm"))


def make_label_fn(is_matrix: Callable[[str, Any], bool] = default_is_matrix) -> Callable[[Any], Any]:
  """Label function for optax.partition: 'matrix' where is_matrix(path_str, leaf), else 'other'."""
  def label_fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: MATRIX if is_matrix(path_to_str(path), leaf) else OTHER, params)
  return label_fn


default_label_fn = make_label_fn()


# ----------------------------------------------------------------------------------------------------------
# Projection helpers
# ----------------------------------------------------------------------------------------------------------

def reduced_axis(shape, proj_side: str = "std") -> int:
  """The JAX-layout axis that the torch reference's `proj_side` reduces (see module docstring)."""
  d_in, d_out = shape
  if proj_side == "std":
    return 0 if d_out >= d_in else 1
  if proj_side == "reverse_std":
    return 1 if d_out >= d_in else 0
  if proj_side == "right":  # torch right = reduce torch columns = in = JAX axis 0
    return 0
  if proj_side == "left":
    return 1
  raise ValueError(f"unknown proj_side {proj_side!r}; expected one of {PROJ_SIDES}")


def canonical_sign(basis):
  """Flips each column so that its largest-magnitude entry is positive."""
  idx = jnp.argmax(jnp.abs(basis), axis=0)
  s = jnp.sign(jnp.take_along_axis(basis, idx[None, :], axis=0))
  return basis * jnp.where(s == 0, 1.0, s)


def svd_basis(g, axis: int, r: int):
  """Top-r singular vectors of g (fp32) spanning `axis`: left vectors for axis 0, right for axis 1."""
  u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
  basis = u[:, :r] if axis == 0 else vh[:r, :].T
  return canonical_sign(basis)


def random_orthogonal_basis(key, dim: int, r: int):
  """Haar-random semi-orthogonal [dim, r] (the analogue of torch.nn.init.orthogonal_)."""
  q, rr = jnp.linalg.qr(jax.random.normal(key, (dim, r), jnp.float32))
  d = jnp.sign(jnp.diagonal(rr))
  return q * jnp.where(d == 0, 1.0, d)[None, :]


def randperm_basis(key, dim: int, r: int):
  """r columns of a random permutation matrix (coordinate selection along the reduced axis)."""
  perm = jax.random.permutation(key, dim)[:r]
  return jax.nn.one_hot(perm, dim, dtype=jnp.float32).T


def one_matrix_per_lapack_call() -> bool:
  """True on the CPU backend, where a batched decomposition (SVD, QR) must not be issued (see `map_matrices`)."""
  return jax.default_backend() == "cpu"


def map_matrices(fn, *stacked):
  """fn over the leading axis of `stacked` (arrays of equal leading size): fn(*[x[i] for x in stacked]) for all i.

  Accelerators: one vmapped call (a batched SVD/QR is one cuSOLVER/TPU call). CPU: a sequential `lax.map`, so
  that every LAPACK custom call factors ONE matrix. A batched LAPACK call on XLA:CPU splits its batch into tasks
  on the intra-op thread pool and blocks the pool thread it runs on until those tasks finish. When as many
  batched decompositions run at once as the pool has threads (independent thunks of one step, or the devices of
  a mesh sharing the pool), every thread waits for a task that no free thread can run, and the step never
  finishes (zero CPU, the host waiting in BlockUntilReady). With one matrix per call the kernel runs the
  factorisation inline and never waits on the pool.
  """
  if one_matrix_per_lapack_call():
    return jax.lax.map(lambda args: fn(*args), tuple(stacked))
  return jax.vmap(fn)(*stacked)


def svd(x, full_matrices: bool = False):
  """jnp.linalg.svd for [..., m, n]; leading batch axes are mapped with `map_matrices` (no batched LAPACK call)."""
  if x.ndim <= 2:
    return jnp.linalg.svd(x, full_matrices=full_matrices)
  batch = x.shape[:-2]
  flat = x.reshape((-1,) + x.shape[-2:])
  out = map_matrices(lambda m: jnp.linalg.svd(m, full_matrices=full_matrices), flat)
  return tuple(o.reshape(batch + o.shape[1:]) for o in out)


def map_by_shape(fn, *leaf_lists):
  """[fn(*args_i) for i] computed with one mapped call per group of same-shaped arguments.

  Used for the SVD refreshes: one SVD per distinct matrix shape in the program (vmapped, or a sequential loop on
  CPU: see `map_matrices`) instead of one per matrix keeps XLA compile time small (a LLaMA has ~3 distinct shapes
  but 7·L matrices).
  """
  n = len(leaf_lists[0])
  groups = {}
  for i in range(n):
    groups.setdefault(tuple((tuple(x[i].shape), jnp.result_type(x[i])) for x in leaf_lists), []).append(i)
  out = [None] * n
  for idxs in groups.values():
    if len(idxs) == 1:
      out[idxs[0]] = fn(*[lst[idxs[0]] for lst in leaf_lists])
      continue
    stacked = [jnp.stack([lst[i] for i in idxs]) for lst in leaf_lists]
    res = map_matrices(fn, *stacked)
    for j, i in enumerate(idxs):
      out[i] = jax.tree.map(lambda r, j=j: r[j], res)
  return out


def basis_down(g, basis, axis: int):
  return basis.T @ g if axis == 0 else g @ basis


def basis_up(low, basis, axis: int):
  return basis @ low if axis == 0 else low @ basis.T


class LeafSpec(NamedTuple):
  """Static description of how one matrix is projected."""
  kind: str        # 'basis' or one of COORD_TYPES
  axis: int        # reduced axis for 'basis'; selection axis for columns (0) / rows (1); -1 for randk
  size: int        # r (basis rank) or k (number of coordinates / columns / rows)
  shape: tuple

  @property
  def low_shape(self):
    d_in, d_out = self.shape
    if self.kind == "basis":
      return (self.size, d_out) if self.axis == 0 else (d_in, self.size)
    if self.kind == "randk":
      return (self.size,)
    if self.kind == "columns":
      return (self.size, d_out)
    return (d_in, self.size)

  @property
  def proj_shape(self):
    if self.kind == "basis":
      return (self.shape[self.axis], self.size)
    return (self.size,)


def check_matrix(leaf, name: str = "leaf"):
  if len(leaf.shape) != 2:
    raise ValueError(f"{name}: projected optimizers need 2-D matrices, got a leaf of shape {tuple(leaf.shape)}; "
                     "label it 'other' with the label function")


def proj_init(spec: LeafSpec):
  if spec.kind == "basis":
    return jnp.zeros(spec.proj_shape, jnp.float32)
  return jnp.zeros(spec.proj_shape, jnp.int32)


def proj_new(spec: LeafSpec, proj_type: str, g, key):
  """A fresh projector for one matrix: a basis [dim, r] or sorted int32 indices [k]."""
  if spec.kind == "basis":
    dim = spec.shape[spec.axis]
    if proj_type == "svd":
      return svd_basis(g, spec.axis, spec.size)
    if proj_type == "random":
      return random_orthogonal_basis(key, dim, spec.size)
    return randperm_basis(key, dim, spec.size)
  total = spec.shape[0] * spec.shape[1] if spec.kind == "randk" else spec.shape[spec.axis]
  return jnp.sort(jax.random.permutation(key, total)[:spec.size]).astype(jnp.int32)


def proj_down(spec: LeafSpec, proj, g):
  if spec.kind == "basis":
    return basis_down(g, proj, spec.axis)
  if spec.kind == "randk":
    return g.reshape(-1)[proj]
  return jnp.take(g, proj, axis=spec.axis)


def proj_up(spec: LeafSpec, proj, low):
  if spec.kind == "basis":
    return basis_up(low, proj, spec.axis)
  z = jnp.zeros(spec.shape, low.dtype)
  if spec.kind == "randk":
    return z.reshape(-1).at[proj].set(low).reshape(spec.shape)
  if spec.kind == "columns":
    return z.at[proj, :].set(low)
  return z.at[:, proj].set(low)


# ----------------------------------------------------------------------------------------------------------
# Adam variants (operating on fp32 arrays). t is the 1-based step count since the last reset.
# ----------------------------------------------------------------------------------------------------------

def adam_direction(mu, nu, t, b1: float, b2: float, eps: float, form: str):
  """Bias-corrected Adam direction (the update is -lr * direction).

  form='frugal' (fzmushko/FRUGAL frugal/adamw.py, = optax.scale_by_adam): (m/bc1) / (sqrt(v)/sqrt(bc2) + eps).
  form='galore' (galore_torch/adamw.py, LIFT sparseAdam.py): sqrt(bc2)/bc1 * m / (sqrt(v) + eps).
  """
  t = t.astype(jnp.float32)
  bc1 = 1.0 - jnp.asarray(b1, jnp.float32) ** t
  bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** t
  if form == "frugal":
    return (mu / bc1) / (jnp.sqrt(nu) / jnp.sqrt(bc2) + eps)
  return (jnp.sqrt(bc2) / bc1) * mu / (jnp.sqrt(nu) + eps)


def is_static_number(x) -> bool:
  """True for Python/numpy scalars; traced hyperparameters (optax.inject_hyperparams) are not validated."""
  return isinstance(x, (int, float, np.integer, np.floating))


def validate_adam(b1, b2, eps):
  if not all(is_static_number(x) for x in (b1, b2, eps)):
    return
  if not 0.0 <= b1 < 1.0:
    raise ValueError(f"b1 must be in [0, 1), got {b1}")
  if not 0.0 <= b2 < 1.0:
    raise ValueError(f"b2 must be in [0, 1), got {b2}")
  if eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")


def validate_static_int(name: str, value, *, method: str = "") -> None:
  """A hyperparameter that sets state shapes or schedules: a static Python int >= 1, or a clear ValueError."""
  label = f"{method} {name}".strip()
  if not is_static_number(value):
    raise ValueError(f"{label} sets state shapes and must be a static Python int (with optax.inject_hyperparams "
                     f"pass it in static_args), got {value!r}")
  if isinstance(value, bool) or int(value) != value or value < 1:
    raise ValueError(f"{label} must be an integer >= 1, got {value}")


def validate_gap(update_gap):
  validate_static_int("update_gap", update_gap)


# ----------------------------------------------------------------------------------------------------------
# Projected Adam core (shared by FRUGAL's svd/random/randperm/randk/columns/rows modes and GaLore)
# ----------------------------------------------------------------------------------------------------------

class ProjectedAdamState(NamedTuple):
  count: jax.Array        # int32: number of updates done (global step)
  inner_count: jax.Array  # int32: Adam steps since the last moment reset (bias correction)
  key: jax.Array          # base PRNG key for random projections
  proj: Any               # per matrix: basis [dim, r] (fp32) or indices [k] (int32)
  mu: Any                 # per matrix: first moment in the projected shape (fp32)
  nu: Any                 # per matrix: second moment in the projected shape (fp32)


def scale_by_projected_adam(
    *,
    spec_fn: Callable[[tuple, str], LeafSpec],
    proj_type: str,
    update_gap: int,
    b1: float,
    b2: float,
    eps: float,
    adam_form: str,
    reset_statistics: bool,
    active_scale: float,
    inactive_rule: str,
    inactive_scale: float,
    seed: int = 0,
) -> optax.GradientTransformation:
  """Direction d = active_scale·up(Adam(down(G))) + inactive_scale·rule(G − up(down(G))); update = −lr·d.

  Every matrix's projector is refreshed when count % update_gap == 0 (count = steps done, so the first refresh
  is at the first step); with reset_statistics the moments and the Adam step counter are zeroed at the refresh.
  All leaves of the tree given to this transform must be 2-D (use optax.partition for the rest).

  Args (keyword-only):
    spec_fn: (shape, path) -> LeafSpec: which side of each matrix is projected and to what size (rank or
      number of coordinates); FRUGAL and GaLore differ only in this function and in `adam_form`.
    proj_type: how the projector is chosen at a refresh: 'svd' (top singular vectors of the gradient),
      'random' (Gaussian, orthonormalised), 'randperm'/'randk' (random coordinates), 'columns'/'rows'.
    update_gap: refresh period T in steps (the first refresh happens at the first step).
    b1, b2, eps: Adam moment decays and epsilon of the projected Adam.
    adam_form: 'frugal' ((m/bc1) / (sqrt(v/bc2) + eps), as optax.scale_by_adam) or 'galore'
      (sqrt(bc2)/bc1 · m / (sqrt(v) + eps), galore_torch's AdamW); see `adam_direction`.
    reset_statistics: zero the projected moments and the Adam step counter at every refresh.
    active_scale: scale of the projected (state-full) direction (FRUGAL proj_params_lr_scale; GaLore's scale).
    inactive_rule: state-free rule for the residual G − up(down(G)): 'sign_sgd', 'sgd' or 'no' (GaLore).
    inactive_scale: scale of the state-free direction.
    seed: PRNG seed of random projections.
  """

  def specs_of(tree):
    paths_leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    specs = []
    for path, leaf in paths_leaves:
      name = path_to_str(path)
      check_matrix(leaf, name)
      specs.append(spec_fn(tuple(leaf.shape), name))
    return specs

  def init_fn(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    specs = specs_of(params)
    proj = treedef.unflatten([proj_init(s) for s in specs])
    mu = treedef.unflatten([jnp.zeros(s.low_shape, jnp.float32) for s in specs])
    nu = treedef.unflatten([jnp.zeros(s.low_shape, jnp.float32) for s in specs])
    return ProjectedAdamState(count=jnp.zeros([], jnp.int32), inner_count=jnp.zeros([], jnp.int32),
                              key=jax.random.PRNGKey(seed), proj=proj, mu=mu, nu=nu)

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    specs = specs_of(updates)
    g32 = [g.astype(jnp.float32) for g in leaves]
    proj_l = treedef.flatten_up_to(state.proj)
    mu_l = treedef.flatten_up_to(state.mu)
    nu_l = treedef.flatten_up_to(state.nu)

    def refresh(_):
      keys = jax.random.split(jax.random.fold_in(state.key, state.count), max(len(leaves), 1))
      if proj_type == "svd":
        new_proj = [None] * len(leaves)
        groups = {}
        for i, s in enumerate(specs):
          groups.setdefault(s, []).append(i)
        for s, idxs in groups.items():
          got = map_by_shape(lambda g, s=s: svd_basis(g, s.axis, s.size), [g32[i] for i in idxs])
          for i, b in zip(idxs, got):
            new_proj[i] = b
      else:
        new_proj = [proj_new(s, proj_type, g, keys[i]) for i, (s, g) in enumerate(zip(specs, g32))]
      if reset_statistics:
        return (new_proj, [jnp.zeros_like(m) for m in mu_l], [jnp.zeros_like(v) for v in nu_l],
                jnp.zeros([], jnp.int32))
      return new_proj, mu_l, nu_l, state.inner_count

    def keep(_):
      return proj_l, mu_l, nu_l, state.inner_count

    proj_l, mu_l, nu_l, inner = jax.lax.cond(state.count % update_gap == 0, refresh, keep, None)
    inner = inner + 1
    out, new_mu, new_nu = [], [], []
    for s, g, p, m, v, orig in zip(specs, g32, proj_l, mu_l, nu_l, leaves):
      low = proj_down(s, p, g)
      m = b1 * m + (1.0 - b1) * low
      v = b2 * v + (1.0 - b2) * low * low
      d = active_scale * proj_up(s, p, adam_direction(m, v, inner, b1, b2, eps, adam_form))
      if inactive_rule != "no":
        resid = g - proj_up(s, p, low)
        d = d + inactive_scale * (jnp.sign(resid) if inactive_rule == "sign_sgd" else resid)
      out.append(d.astype(orig.dtype))
      new_mu.append(m)
      new_nu.append(v)
    new_state = ProjectedAdamState(count=state.count + 1, inner_count=inner, key=state.key,
                                   proj=treedef.unflatten(proj_l), mu=treedef.unflatten(new_mu),
                                   nu=treedef.unflatten(new_nu))
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def round_half_even(x: float) -> int:
  """Python's round(), as used by the reference for ranks/block counts (banker's rounding)."""
  return int(round(x))

