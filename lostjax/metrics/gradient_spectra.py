"""Layer-wise gradient spectra: nuclear norm and effective rank of per-sample gradients of each layer.

Paper: M. Li, Y. Li, Z. Li, T. Zhou, "How Instruction and Reasoning Data shape Post-Training: Data Quality
through a Layer-wise Gradient Lens", arXiv:2504.10766 (code: MingLiiii/Gradient_Unified). For every sample x,
layer L and projection P in {q, k, v, o} the gradient G = dloss(x)/dW_{L,P} of the *one-sample* loss is
decomposed, with singular values S_1 >= S_2 >= ...:

  NuclearNorm(G) = sum_i S_i                      (raw: not divided by size, loss or token count)
  EffRank(G)     = exp(-sum_{p_i > 0} p_i ln p_i),  p_i = S_i / sum_j S_j   (no epsilon)

Aggregation as the paper's code: per (projection, layer) the mean over the samples of a data set; the
summary number per projection is the plain mean over layers of those per-layer means. A sample whose
gradient has sum S < 1e-12 is skipped for the effective rank (NaN, ignored by the mean), as in the code.

Implementation: `loss_fn(params, example) -> scalar` is differentiated only with respect to the selected
projection leaves, and `jax.vmap(jax.grad(...))` runs over the samples of a chunk (`chunk_size` samples per
compiled call, the last chunk padded), so memory is chunk_size x (selected parameters + activations of one
sample); only the per-sample scalars leave a chunk (the singular values are taken inside the same jit).

Analysed matrix per layer kind (leaf names as in lostjax.layers; W_eff in layout [d_in, d_out]):
- dense ('kernel'):                     M = dloss/dkernel (the paper's G; a Flax kernel is the transpose of the
                                        torch weight, singular values are unchanged).
- low-rank ('a' [d_in, r], 'b' [r, d_out]), W_eff = a b:
                                        M = g_a b + a g_b.
- LOST ('a', 'b', 'w_sparse' [k, d_out], index variable 'idx' [k]),
  W_eff = gamma a b + (1 - gamma) scatter_rows(idx, w_sparse):
                                        M = gamma (g_a b + a g_b) + (1 - gamma) scatter_rows(idx, g_sparse).
  This is our definition (the paper has no factorised layers): M is the effective dense update, i.e. the
  first-order change of W_eff under one SGD step on the factors (dW_eff/deta at eta = 0 of W_eff(theta - eta g),
  chain rule; the second-order term eta^2 g_a g_b is dropped). It is the update the layer really makes,
  not the gradient dloss/dW_eff of an equivalent dense layer (which has rank structure of its own).
  `gamma` is the layer's mixing weight: by default (`gamma=None`) read from the layers of `model=` (the nnx
  model the params come from, via `lost_gammas`); or given as a float or a {module-path-prefix: float} mapping.
  LOST layers with neither raise a ValueError (no silent 0.5). With a nonlinearity between the factors (CoLA-style) M is still g_a b + a g_b but W_eff is
  then only a linearisation.

Not implemented: the paper's gradient-similarity metrics (same-layer / adjacent-layer cosines, which its
README reports as uninformative) and its instruction/response masking (the CLI uses every token of a sample).

Command line (reads a training run): `python -m train.analyze spectra --workdir=<run> --text=<file>`.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from lostjax.pytree import path_to_str

ATTN_PROJECTIONS = ("q", "k", "v", "o")
MLP_PROJECTIONS = ("gate", "up", "down")
_MATRIX_RE = re.compile(r"^(?P<prefix>(?:.*/)?layers/(?P<layer>\d+)/(?P<group>attn|mlp)/(?P<proj>[^/]+))/"
                        r"(?P<leaf>kernel|a|b|w_sparse|idx)$")


def matrix_spectrum_metrics(m: jax.Array):
  """(nuclear norm, effective rank) of matrices m [..., d_in, d_out]; erank NaN where sum S < 1e-12."""
  s = jnp.linalg.svd(m.astype(jnp.float32), compute_uv=False)
  total = jnp.sum(s, axis=-1)
  ok = total >= 1e-12
  p = s / jnp.where(ok, total, 1.0)[..., None]
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  erank = jnp.where(ok, jnp.exp(-jnp.sum(plogp, axis=-1)), jnp.nan)
  return total, erank


@dataclasses.dataclass(frozen=True)
class _Matrix:
  name: str          # module path prefix, e.g. 'layers/3/attn/q'
  layer: int
  group: str         # 'attn' | 'mlp'
  proj: str
  kind: str          # 'dense' | 'lowrank' | 'lost'
  leaves: tuple      # indices into the flattened params: (kernel,) or (a, b) or (a, b, w_sparse)
  idx: tuple | None  # LOST channel indices (python ints, hashable) or None
  gamma: float


def _find_matrices(params, static, include_mlp: bool, gamma) -> tuple[list, list, object]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  groups = {}
  for i, (path, leaf) in enumerate(flat):
    m = _MATRIX_RE.match(path_to_str(path))
    if m is None:
      continue
    if m["group"] == "mlp" and not include_mlp:
      continue
    entry = groups.setdefault(m["prefix"], {"layer": int(m["layer"]), "group": m["group"], "proj": m["proj"]})
    entry[m["leaf"]] = i if m["leaf"] != "idx" else np.asarray(leaf)
  if static is not None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(static)[0]:
      m = _MATRIX_RE.match(path_to_str(path))
      if m is not None and m["leaf"] == "idx" and m["prefix"] in groups:
        groups[m["prefix"]]["idx"] = np.asarray(leaf)
  matrices = []
  known = ATTN_PROJECTIONS + MLP_PROJECTIONS
  order = lambda e: (e["group"], e["layer"], known.index(e["proj"]) if e["proj"] in known else len(known), e["proj"])
  for prefix, e in sorted(groups.items(), key=lambda kv: order(kv[1])):
    if "kernel" in e:
      matrices.append(_Matrix(prefix, e["layer"], e["group"], e["proj"], "dense", (e["kernel"],), None, 1.0))
    elif "a" in e and "b" in e and "w_sparse" in e:
      if "idx" not in e:
        raise ValueError(f"LOST layer {prefix!r} has 'w_sparse' but no 'idx' index variable in params or static")
      matrices.append(_Matrix(prefix, e["layer"], e["group"], e["proj"], "lost",
                              (e["a"], e["b"], e["w_sparse"]), tuple(int(i) for i in np.ravel(e["idx"])),
                              _gamma_for(prefix, gamma)))
    elif "a" in e and "b" in e:
      matrices.append(_Matrix(prefix, e["layer"], e["group"], e["proj"], "lowrank", (e["a"], e["b"]), None, 1.0))
    else:
      raise ValueError(f"layer {prefix!r} has leaves {sorted(k for k in e if k in ('kernel', 'a', 'b', 'w_sparse'))}"
                       f"; expected 'kernel', or 'a' and 'b' (+ 'w_sparse' and 'idx' for LOST)")
  return matrices, flat, treedef


def _gamma_for(prefix: str, gamma) -> float:
  if gamma is None:
    raise ValueError(f"gamma of LOST layer {prefix!r} unknown: pass model=<the nnx model> (its layers' gamma) "
                     f"or gamma=<float or mapping>")
  if isinstance(gamma, Mapping):
    best = None
    for key, val in gamma.items():
      if key == "" or prefix == key or prefix.startswith(key.rstrip("/") + "/"):
        if best is None or len(key) > len(best[0]):
          best = (key, val)
    if best is None:
      raise ValueError(f"gamma mapping has no entry for LOST layer {prefix!r}")
    g = float(best[1])
  else:
    g = float(gamma)
  if not 0.0 <= g <= 1.0:
    raise ValueError(f"gamma for {prefix!r} must be in [0, 1], got {g}")
  return g


def _analysed(mat: _Matrix, grads, leaves):
  """The analysed matrix of one layer for a chunk of samples: grads are [chunk, ...] per selected leaf.
  Computed in float32 whatever the parameter dtype."""
  f32 = lambda x: x.astype(jnp.float32)
  if mat.kind == "dense":
    return f32(grads[0])
  a, b = f32(leaves[mat.leaves[0]]), f32(leaves[mat.leaves[1]])
  g_a, g_b = f32(grads[0]), f32(grads[1])
  lowrank = jnp.einsum("nir,ro->nio", g_a, b) + jnp.einsum("ir,nro->nio", a, g_b)
  if mat.kind == "lowrank":
    return lowrank
  g_s = f32(grads[2])
  idx = jnp.asarray(np.asarray(mat.idx, np.int32))
  sparse = jnp.zeros((g_s.shape[0], a.shape[0], g_s.shape[2]), jnp.float32).at[:, idx].add(g_s)
  return mat.gamma * lowrank + (1.0 - mat.gamma) * sparse


def _selected_grads(loss_fn, leaves, treedef, selected, examples):
  """Per-sample gradients (vmap over the leading axis of `examples`) w.r.t. the leaves `selected` only."""
  def one(sel_values, example):
    new = list(leaves)
    for i, v in zip(selected, sel_values):
      new[i] = v
    return loss_fn(jax.tree_util.tree_unflatten(treedef, new), example)

  sel = [leaves[i] for i in selected]
  return jax.vmap(jax.grad(one), in_axes=(None, 0))(sel, examples)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _chunk_matrices(loss_fn, treedef, matrices, want_matrices, leaves, examples):
  selected = sorted({i for m in matrices for i in m.leaves})
  pos = {i: n for n, i in enumerate(selected)}
  grads = _selected_grads(loss_fn, leaves, treedef, selected, examples)
  out = []
  for mat in matrices:
    analysed = _analysed(mat, [grads[pos[i]] for i in mat.leaves], leaves)
    out.append(analysed if want_matrices else matrix_spectrum_metrics(analysed))
  return out


@dataclasses.dataclass(frozen=True)
class GradientSpectra:
  """Per-sample metrics of every analysed matrix, plus the paper's per-layer aggregation."""
  names: tuple              # module path of each analysed matrix, e.g. 'layers/0/attn/q'
  layers: np.ndarray        # [num_matrices] layer index
  projections: tuple        # [num_matrices] projection name ('q', 'k', ..., 'gate', ...)
  kinds: tuple              # [num_matrices] 'dense' | 'lowrank' | 'lost'
  nuclear_norm: np.ndarray  # [num_samples, num_matrices]
  effective_rank: np.ndarray  # [num_samples, num_matrices], NaN where the gradient is ~0

  def per_layer(self, metric: str = "effective_rank") -> dict:
    """{projection: [num_layers] mean over samples} (NaN-aware for the effective rank)."""
    values = self._metric(metric)
    out = {}
    for proj in dict.fromkeys(self.projections):
      cols = [i for i, p in enumerate(self.projections) if p == proj]
      order = np.argsort(self.layers[cols])
      with np.errstate(all="ignore"):
        out[proj] = np.array([np.nanmean(values[:, cols[j]]) if np.any(np.isfinite(values[:, cols[j]]))
                              else np.nan for j in order])
    return out

  def summary(self, metric: str = "effective_rank") -> dict:
    """{projection: plain mean over layers of the per-layer means} (the paper's summary numbers)."""
    return {p: float(np.nanmean(v)) if np.any(np.isfinite(v)) else float("nan")
            for p, v in self.per_layer(metric).items()}

  def _metric(self, metric):
    if metric not in ("effective_rank", "nuclear_norm"):
      raise ValueError(f"metric must be 'effective_rank' or 'nuclear_norm', got {metric!r}")
    return getattr(self, metric)

  def table(self) -> str:
    """Per-layer table: one row per layer, nuclear norm and effective rank per projection."""
    nuc, er = self.per_layer("nuclear_norm"), self.per_layer("effective_rank")
    projs = list(nuc)
    layer_ids = sorted(set(self.layers.tolist()))
    head = "layer " + " ".join(f"{'nuc_' + p:>11} {'erank_' + p:>11}" for p in projs)
    lines = [head]
    for j, layer in enumerate(layer_ids):
      cells = []
      for p in projs:
        cells.append(f"{nuc[p][j]:11.4g} {er[p][j]:11.4g}" if j < len(nuc[p]) else " " * 23)
      lines.append(f"{layer:5d} " + " ".join(cells))
    sn, se = self.summary("nuclear_norm"), self.summary("effective_rank")
    lines.append("mean  " + " ".join(f"{sn[p]:11.4g} {se[p]:11.4g}" for p in projs))
    return "\n".join(lines)


def _prepare(loss_fn, params, batch, static, include_mlp, gamma, chunk_size):
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable (params, example) -> scalar, got {type(loss_fn).__name__}")
  if not (isinstance(chunk_size, int) and chunk_size >= 1):
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  batch_leaves = jax.tree_util.tree_leaves(batch)
  if not batch_leaves:
    raise ValueError("batch has no arrays")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in batch_leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"every batch leaf needs the same leading (sample) axis, got leading sizes "
                     f"{sorted(str(s) for s in sizes)}")
  num = sizes.pop()
  if num == 0:
    raise ValueError("batch is empty (0 samples)")
  matrices, flat, treedef = _find_matrices(params, static, include_mlp, gamma)
  if not matrices:
    raise ValueError("no projection matrices found: expected parameter paths like layers/<i>/attn/{q,k,v,o}/"
                     "{kernel | a, b[, w_sparse]} (and layers/<i>/mlp/... with include_mlp=True)")
  leaves = [leaf for _, leaf in flat]
  return matrices, leaves, treedef, num


def _run_chunks(loss_fn, params, batch, static, include_mlp, gamma, chunk_size, want_matrices):
  matrices, leaves, treedef, num = _prepare(loss_fn, params, batch, static, include_mlp, gamma, chunk_size)
  key = tuple(matrices)   # hashable by value: repeated calls on the same model reuse the compilation
  chunk = min(chunk_size, num)
  results = []
  for start in range(0, num, chunk):
    stop = min(start + chunk, num)
    idx = np.arange(start, start + chunk).clip(max=num - 1)  # pad the last chunk by repeating its last sample
    examples = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[idx], batch)
    out = _chunk_matrices(loss_fn, treedef, key, want_matrices, leaves, examples)
    out = jax.tree_util.tree_map(lambda x: np.asarray(x)[: stop - start], out)
    results.append(out)
  merged = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *results)
  return matrices, merged


def _resolve_gamma(gamma, model):
  if gamma is None and model is not None:
    return lost_gammas(model)
  return gamma


def gradient_spectra(loss_fn: Callable, params, batch, *, static=None, include_mlp: bool = False,
                     gamma: Union[None, float, Mapping[str, float]] = None, chunk_size: int = 8,
                     model=None) -> GradientSpectra:
  """Nuclear norm and effective rank of each sample's gradient of every attention (and MLP) projection.

  Args:
    loss_fn: (params, example) -> scalar loss of ONE sample; `example` is `batch` without its leading axis.
    params: pytree of parameters (e.g. the nnx.Param state of `nnx.split(model, nnx.Param, ...)`); the
      matrices are found by path: .../layers/<i>/attn/{q,k,v,o}/{kernel | a, b[, w_sparse]}.
    batch: pytree of arrays with a leading sample axis.
    static: optional pytree holding LOST 'idx' index variables (e.g. the non-Param nnx state), if they are
      not part of `params`.
    include_mlp: also analyse layers/<i>/mlp/{gate,up,down}.
    gamma: LOST mixing weight (float or {module path or prefix: float}); None (default): each LOST layer's own
      `gamma`, read from `model`. Unused for dense/low-rank layers.
    chunk_size: samples per vmapped, compiled call (memory ~ chunk_size x selected params + activations).
    model: the nnx model `params` come from; its LOST layers' `gamma` attributes are the default `gamma`.

  Raises:
    ValueError: no matching matrices, empty batch, batch leaves with different sample counts, LOST layer
      without idx, bad gamma or chunk_size.
  """
  gamma = _resolve_gamma(gamma, model)
  matrices, out = _run_chunks(loss_fn, params, batch, static, include_mlp, gamma, chunk_size, False)
  return GradientSpectra(
      names=tuple(m.name for m in matrices), layers=np.array([m.layer for m in matrices]),
      projections=tuple(m.proj for m in matrices), kinds=tuple(m.kind for m in matrices),
      nuclear_norm=np.stack([o[0] for o in out], axis=1).astype(np.float64),
      effective_rank=np.stack([o[1] for o in out], axis=1).astype(np.float64))


def analysed_matrices(loss_fn: Callable, params, batch, *, static=None, include_mlp: bool = False,
                      gamma: Union[None, float, Mapping[str, float]] = None, chunk_size: int = 8,
                      model=None) -> dict:
  """{module path: [num_samples, d_in, d_out]} the per-sample matrices `gradient_spectra` decomposes."""
  gamma = _resolve_gamma(gamma, model)
  matrices, out = _run_chunks(loss_fn, params, batch, static, include_mlp, gamma, chunk_size, True)
  return {m.name: o for m, o in zip(matrices, out)}


# ------------------------------------------------------------------------------------------------------ CLI


def lost_gammas(model) -> dict:
  """{module path: gamma} of every module of an NNX model that has a `gamma` attribute (LOST layers)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and isinstance(getattr(node, "gamma", None), (int, float)):
      out["/".join(str(p) for p in path)] = float(node.gamma)
  return out


def plot_spectra(spectra: GradientSpectra, path: str, title: str = "") -> None:
  """Two panels (nuclear norm, effective rank) of per-layer curves, one line per projection."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, metric, label in ((axes[0], "nuclear_norm", "nuclear norm"), (axes[1], "effective_rank", "effective rank")):
    for proj, vals in spectra.per_layer(metric).items():
      ax.plot(np.arange(len(vals)), vals, marker="o", ms=3, label=proj)
    ax.set_xlabel("layer")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
  fig.suptitle(title or "per-sample gradient spectra (mean over samples)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
