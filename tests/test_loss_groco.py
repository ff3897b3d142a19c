"""Sorting networks and GroCo vs diffsort, a torch transcription of GroCo.compute_loss, numpy loops."""
import functools

import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest

from losses import diffsort_permutation, groco_loss, groco_sorting_loss, soft_sort

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

groco_loss = _jitted('groco_loss', 'steepness', 'topk_neg', 'n_pos_views', 'stop_grad', 'network', 'distribution',
                     'axis_name')
groco_sorting_loss = _jitted('groco_sorting_loss', 'steepness', 'network', 'distribution')
soft_sort = _jitted('soft_sort', 'network', 'steepness', 'art_lambda', 'distribution')


RNG = np.random.default_rng(0)
DISTS = ["cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal"]


def np_odd_even(x, steepness):
  """Odd-even transposition network, cauchy comparator, from the formula (python loops, float64)."""
  x = np.array(x, np.float64)
  n = len(x)
  P = np.eye(n)
  for layer in range(n):
    for i in range(layer % 2, n - 1, 2):
      a, b = x[i], x[i + 1]
      al = np.arctan(steepness * (b - a)) / np.pi + 0.5
      x[i], x[i + 1] = al * a + (1 - al) * b, (1 - al) * a + al * b
      pa, pb = P[:, i].copy(), P[:, i + 1].copy()
      P[:, i], P[:, i + 1] = al * pa + (1 - al) * pb, (1 - al) * pa + al * pb
  return x, P


@pytest.fixture(scope="module")
def ds():
  torch = pytest.importorskip("torch")
  diffsort = pytest.importorskip("diffsort")
  return torch, diffsort


def test_numpy_loop_odd_even():
  x = RNG.normal(size=(3, 7))
  with jax.enable_x64(True):
    s, P = diffsort_permutation(jnp.asarray(x), steepness=3.)
  for r in range(3):
    es, eP = np_odd_even(x[r], 3.)
    np.testing.assert_allclose(s[r], es, rtol=1e-12)
    np.testing.assert_allclose(P[r], eP, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("network, n, dists", [("odd_even", 5, DISTS), ("bitonic", 6, DISTS),
                                                ("odd_even", 12, ["cauchy"]), ("bitonic", 11, ["cauchy"]),
                                                pytest.param("bitonic", 8, ["logistic"], marks=pytest.mark.slow),
                                                pytest.param("odd_even", 2, ["cauchy"], marks=pytest.mark.slow)])
def test_diffsort_oracle(ds, network, n, dists):
  torch, diffsort = ds
  x = RNG.normal(size=(4, n))
  for dist in dists:
    net = diffsort.DiffSortNet(network, n, steepness=7., distribution=dist)
    ts, tP = net(torch.tensor(x))
    with jax.enable_x64(True):
      s, P = diffsort_permutation(jnp.asarray(x), network=network, steepness=7., distribution=dist)
    np.testing.assert_allclose(s, ts.numpy(), rtol=1e-12, atol=1e-14, err_msg=dist)
    np.testing.assert_allclose(P, tP.numpy(), rtol=1e-12, atol=1e-14, err_msg=dist)
    np.testing.assert_allclose(np.asarray(P).sum(-1), 1, atol=1e-12)
    np.testing.assert_allclose(np.asarray(P).sum(-2), 1, atol=1e-12)


def test_hard_sort_limit_and_ties():
  x = jnp.asarray(RNG.permutation(9).astype(np.float32))[None]
  for network in ("odd_even", "bitonic"):
    s, P = diffsort_permutation(x, network=network, steepness=1e6)
    np.testing.assert_allclose(s, jnp.sort(x), atol=1e-4)
    np.testing.assert_allclose(P[0], np.eye(9)[:, np.argsort(np.asarray(x[0]))], atol=1e-4)
  # ties: all equal -> sorted values unchanged, P doubly stochastic, grads finite
  s, P = diffsort_permutation(jnp.ones((2, 6)), network="bitonic")
  np.testing.assert_allclose(s, 1.)
  g = jax.grad(lambda v: soft_sort(v).sum() + diffsort_permutation(v)[1][..., 0].sum())(jnp.ones((2, 6)))
  assert np.all(np.isfinite(g))
  # huge values, bf16, n = 1, leading batch dims
  big = 1e3 * jnp.asarray(RNG.normal(size=(2, 3, 5)), jnp.float32)
  assert np.all(np.isfinite(jax.grad(lambda v: soft_sort(v, steepness=1.).sum())(big)))
  assert soft_sort(big.astype(jnp.bfloat16)).dtype == jnp.float32
  np.testing.assert_allclose(soft_sort(jnp.ones((3, 1))), 1.)


def _torch_groco(torch, diffsort, views, steepness, topk, n_pos, stop_grad):
  """Transcription of learning_by_sorting GroCo.forward/compute_loss (non-distributed)."""
  def norm(a):
    return a / torch.clamp(a.norm(dim=1, keepdim=True), min=1e-8)
  V = len(views)
  bce = torch.nn.BCELoss()
  total = 0
  for n in range(V):
    anchor = views[n]
    pos = [p for p in range(n_pos) if p != n]
    pos_sims = torch.stack([torch.nn.functional.cosine_similarity(
        anchor, views[p].detach() if stop_grad else views[p], dim=1) for p in pos], 1)
    neg_src = anchor.detach() if stop_grad else anchor
    neg = norm(anchor) @ norm(neg_src).T
    neg = neg.masked_fill(torch.eye(len(anchor), dtype=torch.bool), -float("inf"))
    pos_sims, _ = torch.sort(pos_sims, 1)
    neg_sims = torch.flip(torch.topk(neg, k=topk, dim=1)[0], dims=[1])
    sims = torch.cat([neg_sims, pos_sims], 1)
    net = diffsort.DiffSortNet("odd_even", sims.shape[1], steepness=steepness, interpolation_type="cauchy")
    _, P = net(sims)
    p_neg, p_pos = P[:, :, :topk].sum(2).clamp(0, 1), P[:, :, topk:].sum(2).clamp(0, 1)
    t_neg = (torch.arange(sims.shape[1]) < topk).double()[None].repeat(len(anchor), 1)
    total = total + (bce(p_pos, 1 - t_neg) + bce(p_neg, t_neg)) / 2
  return total / V


@pytest.mark.parametrize("V, n_pos, topk, stop_grad", [
    (2, None, 4, True), (2, None, 4, False),
    pytest.param(3, None, 3, True, marks=pytest.mark.slow), pytest.param(4, 2, 5, True, marks=pytest.mark.slow)])
def test_groco_vs_torch_transcription(ds, V, n_pos, topk, stop_grad):
  torch, diffsort = ds
  views = RNG.normal(size=(V, 8, 6))
  tv = torch.tensor(views, requires_grad=True)
  tl = _torch_groco(torch, diffsort, list(tv), 1.0, topk, n_pos or V, stop_grad)
  tl.backward()
  with jax.enable_x64(True):
    f = lambda v: groco_loss(v, topk_neg=topk, n_pos_views=n_pos, stop_grad=stop_grad)
    val, g = jax.value_and_grad(f)(jnp.asarray(views))
  np.testing.assert_allclose(float(val), tl.item(), rtol=1e-10)
  np.testing.assert_allclose(g, tv.grad.numpy(), rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_stop_gradient_only_through_anchor():
  """With stop_grad, the gradient equals that of a loss whose positives/negatives are constants."""
  with jax.enable_x64(True):
    views = jnp.asarray(RNG.normal(size=(2, 7, 5)))
    g = jax.grad(lambda v: groco_loss(v, topk_neg=3))(views)
    g_free = jax.grad(lambda v: groco_loss(v, topk_neg=3, stop_grad=False))(views)
    assert np.abs(np.asarray(g - g_free)).max() > 1e-6
    def manual(v, const):
      u = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
      out = 0.
      for n in range(2):
        a = u(v[n])
        pos = jnp.sum(a * u(const[1 - n]), -1)[:, None]
        neg = jnp.where(jnp.eye(7, dtype=bool), -jnp.inf, a @ u(const[n]).T)
        out += groco_sorting_loss(jax.lax.top_k(neg, 3)[0], pos, steepness=1.)
      return out / 2
    np.testing.assert_allclose(g, jax.grad(manual)(views, views), rtol=1e-10, atol=1e-14)
    jtu.check_grads(lambda v: groco_loss(v, topk_neg=3, stop_grad=False), (views,), order=1, modes=["rev"])


def test_monotone_in_separation_edge_cases_and_jit():
  neg = jnp.asarray(RNG.uniform(-0.5, 0.2, size=(4, 6)), jnp.float32)
  losses = [float(groco_sorting_loss(neg, jnp.full((4, 1), s))) for s in (-0.8, -0.2, 0.3, 0.9)]
  assert all(a > b for a, b in zip(losses, losses[1:]))
  v = jnp.asarray(RNG.normal(size=(2, 5, 4)), jnp.float32)
  f = lambda x: groco_loss(x, topk_neg=4)
  np.testing.assert_allclose(jax.jit(f)(v), f(v), rtol=1e-6)
  gf = jax.jit(jax.grad(f))
  for x in (jnp.ones((2, 5, 4)), jnp.zeros((2, 5, 4)), 1e3 * v, v.astype(jnp.bfloat16)):   # ties/duplicates
    assert np.isfinite(float(f(x)))
    assert np.all(np.isfinite(gf(x).astype(jnp.float32)))
  assert float(groco_loss(v, topk_neg=0)) >= 0.0


def _padded(views, n_pad, rng):
  """Inserts n_pad garbage rows (huge values, one NaN row) at random batch positions; returns (padded, where)."""
  v, b, d = views.shape
  where = np.ones(b + n_pad, bool)
  where[rng.choice(b + n_pad, n_pad, replace=False)] = False
  out = np.empty((v, b + n_pad, d))
  out[:, where] = views
  out[:, ~where] = 1e6 * rng.normal(size=(v, n_pad, d))
  out[0, np.flatnonzero(~where)[0]] = np.nan
  return out, where


@functools.lru_cache(maxsize=None)
def _groco_vg(stop_grad):
  """One jitted value_and_grad(groco_loss(views, where)) per flag, shared by the padding and sharding tests."""
  return jax.jit(jax.value_and_grad(lambda v, w: _L.groco_loss(v, topk_neg=4, stop_grad=stop_grad, where=w)))


def _padded_batch():
  rng = np.random.default_rng(1)
  views = rng.normal(size=(2, 19, 5))
  return (views,) + _padded(views, 5, rng)   # 24 rows, 5 of them padding


@pytest.mark.parametrize("stop_grad", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_groco_padding_mask(stop_grad):
  """Masked padding rows: loss == loss of the unpadded batch (JAX and the torch transcription on
  diffsort), padded rows' gradients exactly 0 even for garbage/NaN padding; all rows padded, or too
  few valid negatives for topk_neg -> 0 with zero gradients."""
  views, padded, where = _padded_batch()
  f = _groco_vg(stop_grad)
  with jax.enable_x64(True):
    val, g = f(jnp.asarray(padded), jnp.asarray(where))
    ref, g_ref = f(jnp.asarray(views), jnp.ones(19, bool))
    few = jnp.asarray(np.cumsum(where) <= 4) & jnp.asarray(where)   # 4 valid rows: 3 negatives < topk_neg = 4
    empty = [f(jnp.asarray(padded), w) for w in (jnp.zeros(24, bool), few)]
  np.testing.assert_allclose(float(val), float(ref), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(g)[:, where], g_ref, rtol=1e-10, atol=1e-15)
  assert np.all(np.asarray(g)[:, ~where] == 0)
  for v0, g0 in empty:
    assert float(v0) == 0.0 and np.all(np.asarray(g0) == 0)
  try:
    import diffsort
    import torch
  except ImportError:
    torch = None
  if torch is not None:
    tv = torch.tensor(views, requires_grad=True)
    tl = _torch_groco(torch, diffsort, list(tv), 1.0, 4, 2, stop_grad)
    tl.backward()
    np.testing.assert_allclose(float(val), tl.item(), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(g)[:, where], tv.grad.numpy(), rtol=1e-8, atol=1e-12)
  with pytest.raises(ValueError, match="where"):
    groco_loss(jnp.asarray(padded, jnp.float32), topk_neg=4, where=jnp.ones(5, bool))


def test_groco_sorting_loss_where():
  """Masked rows of the primitive may hold inf/NaN: finite, zero gradient; the masked mean is the
  mean of the single-row losses; nothing included -> 0."""
  rng = np.random.default_rng(2)
  neg, pos = rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
  neg[[1, 4]], pos[1] = np.inf, np.nan
  rows = np.array([1, 0, 1, 1, 0, 1], bool)
  h = jax.jit(jax.value_and_grad(lambda n_, p_, w_: _L.groco_sorting_loss(n_, p_, where=w_)))
  with jax.enable_x64(True):
    n_, p_ = jnp.asarray(neg), jnp.asarray(pos)
    val, gn = h(n_, p_, jnp.asarray(rows))
    singles = [float(h(n_, p_, jnp.arange(6) == r)[0]) for r in np.flatnonzero(rows)]
    none, g_none = h(n_, p_, jnp.zeros(6, bool))
  np.testing.assert_allclose(float(val), np.mean(singles), rtol=1e-12)
  np.testing.assert_allclose(singles[0], float(groco_sorting_loss(jnp.asarray(neg[:1], jnp.float32),
                                                                  jnp.asarray(pos[:1], jnp.float32))), rtol=1e-5)
  assert np.all(np.isfinite(gn)) and np.all(np.asarray(gn)[~rows] == 0)
  assert float(none) == 0.0 and np.all(np.asarray(g_none) == 0)


@pytest.mark.parametrize("stop_grad", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_groco_cross_device_negatives(stop_grad):
  """shard_map over 8 devices with axis_name == unsharded loss on the concatenated batch (value, grad).

  3 rows per device < topk_neg + 1 = 5: the loss only exists with the other devices' negatives."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py fakes 8 CPU devices)")
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]), ("b",))
  _, padded, where = _padded_batch()
  sharded = jax.shard_map(lambda v, w: _L.groco_loss(v, where=w, axis_name="b", topk_neg=4, stop_grad=stop_grad),
                          mesh=mesh, in_specs=(P(None, "b"), P("b")), out_specs=P())
  with jax.enable_x64(True):
    v, w = jnp.asarray(padded), jnp.asarray(where)
    val, g = jax.jit(jax.value_and_grad(sharded))(v, w)
    ref, g_ref = _groco_vg(stop_grad)(v, w)
  np.testing.assert_allclose(float(val), float(ref), rtol=1e-12)
  np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-15)
  assert np.all(np.asarray(g)[:, ~where] == 0)


def test_bad_inputs():
  with pytest.raises(ValueError, match="topk_neg"):
    groco_loss(jnp.ones((2, 4, 3)), topk_neg=4)
  with pytest.raises(ValueError, match="network"):
    soft_sort(jnp.ones((2, 4)), network="bubble")
  with pytest.raises(ValueError, match="views"):
    groco_loss(jnp.ones((4, 3)))


def test_jit_matches_eager():
  v = jnp.asarray(RNG.normal(size=(2, 5, 4)), jnp.float32)
  np.testing.assert_allclose(groco_loss(v, topk_neg=3), _L.groco_loss(v, topk_neg=3), rtol=1e-6)
