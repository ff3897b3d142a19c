"""Tests for lostjax.metrics.gradient_spectra on a small NNX model defined here (dense, low-rank and LOST
leaves named as in lostjax.layers): vmap per-sample gradients vs a python loop of jax.grad, the LOST effective
update vs jax.jvp of W_eff, spectra vs numpy/scipy, the paper's aggregation, chunking, bad input, and the CLI."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from lostjax.metrics import gradient_spectra

gs = importlib.import_module("lostjax.metrics.gradient_spectra")  # the module (the package exports the function)

D, VOCAB, T = 8, 11, 6


class Idx(nnx.Variable):
  pass


class Dense(nnx.Module):
  def __init__(self, d_in, d_out, rngs):
    self.kernel = nnx.Param(0.3 * jax.random.normal(rngs.params(), (d_in, d_out)))

  def __call__(self, x):
    return x @ self.kernel[...]


class LowRank(nnx.Module):
  def __init__(self, d_in, d_out, rngs, r=3):
    self.a = nnx.Param(0.5 * jax.random.normal(rngs.params(), (d_in, r)))
    self.b = nnx.Param(0.5 * jax.random.normal(rngs.params(), (r, d_out)))

  def __call__(self, x):
    return x @ self.a[...] @ self.b[...]


class Lost(nnx.Module):
  def __init__(self, d_in, d_out, rngs, r=3, k=3, gamma=0.3):
    self.gamma = gamma
    self.a = nnx.Param(0.5 * jax.random.normal(rngs.params(), (d_in, r)))
    self.b = nnx.Param(0.5 * jax.random.normal(rngs.params(), (r, d_out)))
    self.w_sparse = nnx.Param(0.5 * jax.random.normal(rngs.params(), (k, d_out)))
    self.idx = Idx(jnp.array([1, 4, 6][:k], jnp.int32))

  def __call__(self, x):
    sparse = x[..., self.idx[...]] @ self.w_sparse[...]
    return self.gamma * (x @ self.a[...] @ self.b[...]) + (1 - self.gamma) * sparse


class Attn(nnx.Module):
  def __init__(self, make, rngs):
    self.q, self.k, self.v, self.o = (make(D, D, rngs) for _ in range(4))

  def __call__(self, x):
    q, k, v = self.q(x), self.k(x), self.v(x)
    s = q @ k.T / np.sqrt(D) + jnp.triu(jnp.full((x.shape[0],) * 2, -1e9), 1)
    return self.o(jax.nn.softmax(s, axis=-1) @ v)


class Mlp(nnx.Module):
  def __init__(self, make, rngs):
    self.gate, self.up, self.down = make(D, 2 * D, rngs), make(D, 2 * D, rngs), make(2 * D, D, rngs)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  def __init__(self, make, rngs):
    self.attn, self.mlp = Attn(make, rngs), Mlp(make, rngs)

  def __call__(self, x):
    x = x + self.attn(x)
    return x + self.mlp(x)


class TinyLM(nnx.Module):
  def __init__(self, kinds, rngs):
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (VOCAB, D)))
    self.layers = nnx.List([Block(k, rngs) for k in kinds])
    self.head = nnx.Param(0.3 * jax.random.normal(rngs.params(), (D, VOCAB)))

  def __call__(self, tokens):
    x = self.embed[...][tokens]
    for blk in self.layers:
      x = blk(x)
    return x @ self.head[...]


@functools.lru_cache(maxsize=None)
def _model(kinds):
  with jax.default_device(jax.devices("cpu")[0]):
    return TinyLM(kinds, nnx.Rngs(0))


def build(kinds=(Dense, Lost, LowRank)):
  model = _model(kinds)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, ex):
    logits = nnx.merge(graphdef, p, rest)(ex["tokens"][:-1])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ex["tokens"][1:, None], axis=-1)[:, 0]
    return ex["weight"] * jnp.mean(nll)

  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, VOCAB, size=(5, T)).astype(np.int32), "weight": np.ones(5, np.float32)}
  return model, params, rest, loss_fn, batch


def grads_loop(loss_fn, params, batch):
  """Oracle: one jax.grad per sample, python loop; returns a list of {path: grad} numpy dicts."""
  out = []
  grad_fn = jax.jit(jax.grad(loss_fn))
  for i in range(batch["tokens"].shape[0]):
    g = grad_fn(params, {k: v[i] for k, v in batch.items()})
    out.append({gs.path_to_str(p): np.asarray(x, np.float64)
                for p, x in jax.tree_util.tree_flatten_with_path(g)[0]})
  return out


def flat_params(params):
  return {gs.path_to_str(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def oracle_matrix(g, flat, name, kind, gamma=0.3, idx=(1, 4, 6)):
  """The analysed matrix of one sample from its looped gradients `g`, by the module docstring's formulas."""
  if kind == "dense":
    return g[name + "/kernel"]
  m = g[name + "/a"] @ flat[name + "/b"] + flat[name + "/a"] @ g[name + "/b"]
  if kind == "lowrank":
    return m
  sparse = np.zeros_like(m)
  for row, i in enumerate(idx):
    sparse[i] += g[name + "/w_sparse"][row]
  return gamma * m + (1 - gamma) * sparse


def test_vmap_per_sample_matrices_match_python_loop_and_chain_rule():
  _, params, rest, loss_fn, batch = build()
  mats = gs.analysed_matrices(loss_fn, params, batch, static=rest, include_mlp=True, gamma={"layers/1": 0.3},
                              chunk_size=2)
  assert len(mats) == 3 * 7
  loop = grads_loop(loss_fn, params, batch)
  flat = flat_params(params)
  for i, g in enumerate(loop):
    for name in mats:
      kind = ("dense", "lost", "lowrank")[int(name.split("/")[1])]
      np.testing.assert_allclose(mats[name][i], oracle_matrix(g, flat, name, kind), rtol=1e-4, atol=5e-5)
    for name in ("layers/1/attn/v", "layers/1/mlp/gate"):  # LOST: jvp of W_eff along the gradient (oracle)
      idx = np.array([1, 4, 6])  # Lost.idx of the test model
      a, b, s = (jnp.asarray(flat[f"{name}/{leaf}"]) for leaf in ("a", "b", "w_sparse"))
      d_in = a.shape[0]
      w_eff = lambda a, b, s: 0.3 * a @ b + 0.7 * jnp.zeros((d_in, s.shape[1]), s.dtype).at[idx].set(s)
      tangents = tuple(jnp.asarray(g[f"{name}/{leaf}"]) for leaf in ("a", "b", "w_sparse"))
      _, tangent = jax.jvp(w_eff, (a, b, s), tangents)
      np.testing.assert_allclose(mats[name][i], tangent, rtol=1e-4, atol=5e-5)


def numpy_metrics(m):
  nuc = np.linalg.norm(m, "nuc")
  s = np.linalg.svd(m, compute_uv=False)
  return nuc, (np.exp(scipy.stats.entropy(s / s.sum())) if s.sum() >= 1e-12 else np.nan)


def test_spectra_match_numpy_and_paper_aggregation():
  _, params, rest, loss_fn, batch = build()
  batch["weight"][3] = 0.0   # sample 3 has an all-zero gradient: nuclear 0, erank skipped (NaN)
  spec = gradient_spectra(loss_fn, params, batch, static=rest, gamma=0.3, chunk_size=3)
  assert spec.nuclear_norm.shape == (5, 12) and spec.projections[:4] == ("q", "k", "v", "o")
  assert spec.kinds[:4] == ("dense",) * 4 and spec.kinds[4] == "lost" and spec.kinds[8] == "lowrank"
  loop = grads_loop(loss_fn, params, batch)
  flat = flat_params(params)
  for j, name in enumerate(spec.names):
    for i in range(5):
      nuc, er = numpy_metrics(oracle_matrix(loop[i], flat, name, spec.kinds[j]))
      np.testing.assert_allclose(spec.nuclear_norm[i, j], nuc, rtol=1e-3, atol=1e-9)
      if i == 3:
        assert nuc == 0 and np.isnan(spec.effective_rank[i, j])
      else:
        np.testing.assert_allclose(spec.effective_rank[i, j], er, rtol=1e-3)
  per_layer = spec.per_layer("effective_rank")
  for p_i, proj in enumerate("qkvo"):
    ref = [np.mean(np.delete(spec.effective_rank[:, layer * 4 + p_i], 3)) for layer in range(3)]
    np.testing.assert_allclose(per_layer[proj], ref, rtol=1e-12)
    np.testing.assert_allclose(spec.summary("effective_rank")[proj], np.mean(ref), rtol=1e-12)
    np.testing.assert_allclose(spec.per_layer("nuclear_norm")[proj],
                               [np.mean(spec.nuclear_norm[:, layer * 4 + p_i]) for layer in range(3)], rtol=1e-12)
  table = spec.table()
  assert table.splitlines()[0].split()[:3] == ["layer", "nuc_q", "erank_q"] and len(table.splitlines()) == 5


def test_chunk_size_does_not_change_results():
  model, params, rest, loss_fn, batch = build((Lost,))
  a = gradient_spectra(loss_fn, params, batch, static=rest, chunk_size=1, model=model)
  b = gradient_spectra(loss_fn, params, batch, static=rest, chunk_size=4, model=model)
  np.testing.assert_allclose(a.nuclear_norm, b.nuclear_norm, rtol=1e-5)
  np.testing.assert_allclose(a.effective_rank, b.effective_rank, rtol=1e-5)


def test_matrix_metrics_reference_values():
  nuc, er = gs.matrix_spectrum_metrics(jnp.diag(jnp.array([3.0, 2.0, 1.0])))
  np.testing.assert_allclose(nuc, 6.0, rtol=1e-6)
  np.testing.assert_allclose(er, 2.749459273997205, rtol=1e-6)
  nuc, er = gs.matrix_spectrum_metrics(jnp.zeros((2, 4, 3)))
  assert np.all(nuc == 0) and np.all(np.isnan(er))
  np.testing.assert_allclose(gs.matrix_spectrum_metrics(jnp.eye(5))[1], 5.0, rtol=1e-6)
  m = np.random.default_rng(0).normal(size=(3, 7, 4)).astype(np.float32)
  nuc, er = gs.matrix_spectrum_metrics(jnp.asarray(m, jnp.bfloat16).astype(jnp.float32))
  for i in range(3):
    ref = numpy_metrics(np.asarray(jnp.asarray(m[i], jnp.bfloat16), np.float64))
    np.testing.assert_allclose([nuc[i], er[i]], ref, rtol=1e-5)


def test_bad_input_raises():
  _, params, rest, loss_fn, batch = build((Dense,))
  with pytest.raises(ValueError, match="empty"):
    gradient_spectra(loss_fn, params, {k: v[:0] for k, v in batch.items()})
  with pytest.raises(ValueError, match="leading"):
    gradient_spectra(loss_fn, params, {"tokens": batch["tokens"], "weight": np.ones(3)})
  with pytest.raises(ValueError, match="no projection matrices"):
    gradient_spectra(loss_fn, {"w": jnp.ones((2, 2))}, batch)
  with pytest.raises(ValueError, match="chunk_size"):
    gradient_spectra(loss_fn, params, batch, chunk_size=0)
  _, params, rest, loss_fn, batch = build((Lost,))
  with pytest.raises(ValueError, match="idx"):
    gradient_spectra(loss_fn, params, batch)   # LOST indices live in `rest`, not passed
  with pytest.raises(ValueError, match="gamma"):
    gradient_spectra(loss_fn, params, batch, static=rest, gamma=1.5)
  with pytest.raises(ValueError, match="no entry"):
    gradient_spectra(loss_fn, params, batch, static=rest, gamma={"layers/7": 0.5})


def test_lost_gammas(tmp_path):
  model, *_ = build((Dense, Lost))
  assert set(gs.lost_gammas(model).values()) == {0.3}
  assert "layers/1/attn/q" in gs.lost_gammas(model)
