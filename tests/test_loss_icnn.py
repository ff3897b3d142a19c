"""proto_triplet_loss / icnn_loss vs numpy transcriptions of the official code, optax triplet loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from losses import icnn_loss, icnn_score, proto_triplet_loss

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

proto_triplet_loss = _jitted('proto_triplet_loss')
icnn_score = _jitted('icnn_score', 'k', 'ipc', 'drop_nearest')
icnn_loss = _jitted('icnn_loss', 'k', 'ipc', 'drop_nearest')


RNG = np.random.default_rng(0)


def np_dist(x, y):
  return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) + 1e-6)


def np_proto_triplet(q, yq, protos, margin=0.5):
  d = np_dist(q, protos)
  out = []
  for i in range(len(q)):
    dp = d[i, yq[i]]
    others = [d[i, c] for c in range(len(protos)) if c != yq[i]]
    out.append(max(0., dp - min(others) + margin) if others else 0.)
  return np.mean(out)


def np_modified_score(origin, yo, target=None, yt=None, k=4, ipc=None, drop=True):
  """Loop transcription of the official `modified_score` (drop=True: always drops the nearest)."""
  target = origin if target is None else target
  yt = yo if yt is None else yt
  k = len(target) - 2 if k + 2 >= len(target) else k
  ipc = k + 1 if ipc is None else ipc
  eps = 1e-7
  d = np_dist(origin, target)
  n = len(origin)
  D, C = [], []
  for i in range(n):
    order = np.argsort(d[i], kind="stable")[:ipc + int(drop)][int(drop):]
    D.append(d[i, order])
    C.append(yt[order])
  D, C = np.array(D), np.array(C)
  sc = (C == np.asarray(yo)[:, None]).astype(float)
  dc = 1 - sc
  nn_dc = np.array([min([D[i, j] for j in range(ipc) if dc[i, j]], default=np.inf) for i in range(n)])
  nd = D / (nn_dc[:, None] + eps)
  nd = nd[:, :k]
  nd = nd / np.maximum(1., nd.max(1, keepdims=True))
  sck, dck = sc[:, :k], dc[:, :k]
  sc_cnt = sck.sum(1)
  sclamb = 1 - ((nd * sck).sum(1) / (sc_cnt + eps)).sum() / (np.count_nonzero(sc_cnt) + eps)
  dcnd = (D * dc)[:, :k]
  dcnd = dcnd / (dcnd.max() + eps)
  dcop = -1 if np.all(dck == 0) else 0
  dc_cnt = dck.sum(1)
  dclamb = abs((dcnd.sum(1) / (dc_cnt + eps)).sum() / (np.count_nonzero(dc_cnt) + eps) + dcop)
  gamma = (sck.sum(1) / k).sum() / n if k + 2 < len(target) else 1.0
  return ((sclamb + dclamb) / 2 + gamma) / 2


def episode(way=3, shot=4, nq=5, spread=1.0):
  centers = RNG.normal(size=(way, 6)) * 3
  ys = np.repeat(np.arange(way), shot)
  sup = centers[ys] + spread * RNG.normal(size=(way * shot, 6))
  yq = RNG.integers(0, way, nq)
  qry = centers[yq] + spread * RNG.normal(size=(nq, 6))
  protos = np.stack([sup[ys == c].mean(0) for c in range(way)])
  return sup, ys, qry, yq, protos


def test_proto_triplet_numpy_and_optax():
  sup, ys, qry, yq, protos = episode()
  with jax.enable_x64(True):
    for m in (0.5, 3.0):
      got = proto_triplet_loss(jnp.asarray(qry), jnp.asarray(yq), jnp.asarray(protos), margin=m)
      np.testing.assert_allclose(float(got), np_proto_triplet(qry, yq, protos, m), rtol=1e-10)
      d = np_dist(qry, protos)
      d[np.arange(len(yq)), yq] = np.inf
      nearest = d.argmin(1)
      ref = optax.losses.triplet_margin_loss(jnp.asarray(qry), jnp.asarray(protos[yq]), jnp.asarray(protos[nearest]),
                                             margin=m, eps=1e-6).mean()
      np.testing.assert_allclose(float(got), float(ref), rtol=1e-10)


def test_proto_triplet_edges():
  sup, ys, qry, yq, protos = episode()
  q, p, y = jnp.asarray(qry, jnp.float32), jnp.asarray(protos, jnp.float32), jnp.asarray(yq)
  f = lambda a: proto_triplet_loss(a, y, p)
  np.testing.assert_allclose(jax.jit(f)(q), f(q), rtol=1e-6)
  # single prototype (one class): no negatives -> 0 with zero grads
  assert float(proto_triplet_loss(q, jnp.zeros(5, int), p[:1])) == 0.0
  assert np.all(jax.grad(lambda a: proto_triplet_loss(a, jnp.zeros(5, int), p[:1]))(q) == 0)
  # perfectly separated with margin: 0
  assert float(proto_triplet_loss(p, jnp.arange(3), p, margin=0.1)) == 0.0
  for x in (jnp.zeros_like(q), 1e3 * q, q.astype(jnp.bfloat16)):   # duplicates/ties, huge, bf16
    assert np.all(np.isfinite(jax.grad(f)(x).astype(jnp.float32)))
  w = jnp.arange(5) < 3
  np.testing.assert_allclose(proto_triplet_loss(q, y, p, where=w), proto_triplet_loss(q[:3], y[:3], p), rtol=1e-6)


@pytest.mark.parametrize("variant", ["supp", "query_support", "query_protos", "full"])
def test_icnn_numpy_transcription(variant):
  sup, ys, qry, yq, protos = episode()
  with jax.enable_x64(True):
    J = jnp.asarray
    if variant == "supp":
      got, want = icnn_score(J(sup), J(ys)), np_modified_score(sup, ys)
    elif variant == "query_support":
      got = icnn_score(J(qry), J(yq), J(sup), J(ys), drop_nearest=True)
      want = np_modified_score(qry, yq, sup, ys)
    elif variant == "query_protos":
      got = icnn_score(J(qry), J(yq), J(protos), J(np.arange(3)), drop_nearest=True)
      want = np_modified_score(qry, yq, protos, np.arange(3))
    else:
      feats, labels = np.concatenate([sup, qry]), np.concatenate([ys, yq])
      got, want = icnn_score(J(feats), J(labels), ipc=4 + 5), np_modified_score(feats, labels, ipc=9)
    np.testing.assert_allclose(float(got), want, rtol=1e-10)
    assert 0 < float(got) <= 1


def test_icnn_deviation_drop_nearest_only_for_self():
  """Official code drops the nearest target also when origin != target; default here keeps it."""
  sup, ys, qry, yq, protos = episode()
  with jax.enable_x64(True):
    J = jnp.asarray
    ours = float(icnn_score(J(qry), J(yq), J(sup), J(ys)))
    np.testing.assert_allclose(ours, np_modified_score(qry, yq, sup, ys, drop=False), rtol=1e-10)
    assert abs(ours - np_modified_score(qry, yq, sup, ys, drop=True)) > 1e-6


def test_icnn_properties_edges_grads():
  # tight, well separated clusters -> gamma = 1 and loss near its minimum
  sup, ys, *_ = episode(spread=1e-3)
  s = jnp.asarray(sup, jnp.float32)
  tight = float(icnn_loss(s, jnp.asarray(ys)))
  loose_sup, loose_ys, *_ = episode(spread=5.0)
  assert tight < float(icnn_loss(jnp.asarray(loose_sup, jnp.float32), jnp.asarray(loose_ys)))
  assert tight < 0.3
  f = lambda a: icnn_loss(a, jnp.asarray(ys))
  np.testing.assert_allclose(jax.jit(f)(s), f(s), rtol=1e-6)
  g = jax.grad(f)(jnp.asarray(loose_sup, jnp.float32))
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  # one class only (no different-class neighbours), duplicates, huge values, bf16
  one = jnp.asarray(RNG.normal(size=(7, 3)), jnp.float32)
  np.testing.assert_allclose(float(icnn_score(one, jnp.zeros(7, int))),
                             np_modified_score(np.asarray(one, np.float64), np.zeros(7, int)), rtol=1e-5)
  for x in (one, jnp.zeros_like(one), 1e3 * one, one.astype(jnp.bfloat16)):
    v = icnn_loss(x, jnp.array([0, 0, 0, 1, 1, 1, 1]))
    assert np.isfinite(float(v))
    assert np.all(np.isfinite(jax.grad(lambda a: icnn_loss(a, jnp.array([0, 0, 0, 1, 1, 1, 1])))(x).astype(jnp.float32)))


def test_icnn_candidate_path_large_sets():
  """Sets larger than ipc + drop + 8 take the matmul-preselection path: still equal to the numpy
  transcription (float64 tight, float32 within float tolerance), coincident points included, and no
  [N_o, N_t, D] intermediate in the value+grad program."""
  way, n, dim = 4, 60, 8
  centers = RNG.normal(size=(way, dim)) * 2
  y = RNG.integers(0, way, n)
  x = centers[y] + 1.5 * RNG.normal(size=(n, dim))
  x[10:14] = x[0]   # coincident points (ties in the distance and in the neighbour order)
  t, yt = x[::2] + 0.1, y[::2]
  with jax.enable_x64(True):
    J = jnp.asarray
    np.testing.assert_allclose(float(icnn_score(J(x), J(y))), np_modified_score(x, y), rtol=1e-10)
    np.testing.assert_allclose(float(icnn_score(J(x), J(y), J(t), J(yt), drop_nearest=True)),
                               np_modified_score(x, y, t, yt), rtol=1e-10)
  x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  want = np_modified_score(x, y)
  for scale in (1., 1e3):   # the ranking key's rounding grows with |x|^2
    np.testing.assert_allclose(float(icnn_score(scale * x32, y32)), np_modified_score(scale * x, y), rtol=2e-5)
  f = lambda a: icnn_loss(a, y32)
  val, g = jax.value_and_grad(f)(x32)
  np.testing.assert_allclose(float(val), -np.log(want), rtol=2e-5)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  g_dup = jax.grad(f)(jnp.zeros_like(x32).at[:5].set(x32[:5]))   # 55 coincident points
  assert np.all(np.isfinite(g_dup))
  hlo = jax.jit(jax.value_and_grad(_L.icnn_loss)).lower(x32, y32).as_text()
  assert f"{n}x{n}x{dim}x" not in hlo and f"{n}x{n // 2}x{dim}x" not in hlo
  assert f"{n}x{n}x" in hlo   # the [N_o, N_t] ranking key (sanity check of the pattern)


def test_bad_inputs():
  with pytest.raises(ValueError, match="target set too small"):
    icnn_loss(jnp.ones((2, 3)), jnp.zeros(2, int))
  with pytest.raises(ValueError, match="query_labels"):
    proto_triplet_loss(jnp.ones((2, 3)), jnp.zeros(3, int), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="target_labels"):
    icnn_loss(jnp.ones((5, 3)), jnp.zeros(5, int), jnp.ones((5, 3)))


def test_jit_matches_eager():
  sup, ys, qry, yq, protos = episode()
  s, q, p = (jnp.asarray(x, jnp.float32) for x in (sup, qry, protos))
  np.testing.assert_allclose(icnn_loss(s, jnp.asarray(ys)), _L.icnn_loss(s, jnp.asarray(ys)), rtol=1e-6)
  np.testing.assert_allclose(proto_triplet_loss(q, jnp.asarray(yq), p), _L.proto_triplet_loss(q, jnp.asarray(yq), p),
                             rtol=1e-6)
