"""mw_loss / auc vs numpy loops, rax.pairwise_logistic_loss, sklearn/scipy AUC, the AUC bound."""
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest
import rax
import scipy.stats

from losses import auc, mw_loss

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

mw_loss = _jitted('mw_loss', 'scope', 'max_positives')
auc = _jitted('auc', 'scope', 'max_positives')


RNG = np.random.default_rng(0)
Q, M = 4, 6
S = RNG.normal(size=(Q, M))
Y = np.zeros((Q, M), int)
Y[np.arange(Q), RNG.integers(0, M, Q)] = 1
Y[0, (np.argmax(Y[0]) + 1) % M] = 1   # a query with two positives


def np_pairs(s, y, w, scope, fn):
  items = [(i, j) for i in range(s.shape[0]) for j in range(s.shape[1]) if w[i, j]]
  P = [(i, j) for i, j in items if y[i, j]]
  N = [(i, j) for i, j in items if not y[i, j]]
  vals = [fn(s[p] - s[n]) for p in P for n in N if scope == "global" or p[0] == n[0]]
  return np.mean(vals) if vals else 0.


def sp(d):
  return np.log1p(np.exp(-d))


@pytest.mark.parametrize("scope", ["global", "per_query"])
@pytest.mark.parametrize("temperature", [1.0, pytest.param(0.05, marks=pytest.mark.slow)])
def test_numpy_loop_and_rax(scope, temperature):
  w = np.ones_like(Y, bool)
  w[1, -2:] = False
  with jax.enable_x64(True):
    got = mw_loss(jnp.asarray(S), jnp.asarray(Y), jnp.asarray(w), scope=scope, temperature=temperature)
    np.testing.assert_allclose(float(got), np_pairs(S / temperature, Y, w, scope, sp), rtol=1e-10)
    if scope == "global":
      ref = rax.pairwise_logistic_loss(jnp.asarray(S.reshape(-1) / temperature), jnp.asarray(Y.reshape(-1), float),
                                       where=jnp.asarray(w.reshape(-1)))
    else:
      ref = rax.pairwise_logistic_loss(jnp.asarray(S / temperature), jnp.asarray(Y, float), where=jnp.asarray(w))
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-10)
    # max_positives (chunked / gathered path) gives the same value
    got2 = mw_loss(jnp.asarray(S), jnp.asarray(Y), jnp.asarray(w), scope=scope, temperature=temperature,
                   max_positives=2 if scope == "per_query" else 5)
    np.testing.assert_allclose(float(got2), float(got), rtol=1e-12)


def test_auc_vs_sklearn_scipy_and_bound():
  sk = pytest.importorskip("sklearn.metrics")
  s = np.round(S, 1)   # create ties
  got = auc(jnp.asarray(s), jnp.asarray(Y))
  np.testing.assert_allclose(float(got), sk.roc_auc_score(Y.ravel(), s.ravel()), rtol=1e-6)
  u = scipy.stats.mannwhitneyu(s[Y == 1], s[Y == 0]).statistic / (Y.sum() * (Y.size - Y.sum()))
  np.testing.assert_allclose(float(got), u, rtol=1e-6)
  pq = np.mean([sk.roc_auc_score(Y[i], s[i]) for i in range(Q)])
  np.testing.assert_allclose(float(auc(jnp.asarray(s), jnp.asarray(Y), scope="per_query")), pq, rtol=1e-6)
  w = np.ones_like(Y, bool)                     # one query keeps its positive and one lower negative: a single pair
  q = next(i for i in range(1, Q) if s[i][Y[i] == 0].min() < s[i][Y[i] == 1].min())
  w[q] = Y[q] == 1
  w[q, np.argmin(np.where(Y[q] == 1, np.inf, s[q]))] = True
  pq = np.mean([sk.roc_auc_score(Y[i][w[i]], s[i][w[i]]) for i in range(Q)])
  np.testing.assert_allclose(float(auc(jnp.asarray(s), jnp.asarray(Y), jnp.asarray(w), scope="per_query")), pq,
                             rtol=1e-6)
  for seed in range(5):   # L_MW / ln 2 >= 1 - AUC on any input
    r = np.random.default_rng(seed)
    ss, yy = r.normal(size=(3, 5)) * r.uniform(0.1, 5), (r.uniform(size=(3, 5)) < 0.4).astype(int)
    assert float(mw_loss(jnp.asarray(ss), jnp.asarray(yy))) / np.log(2) >= 1 - float(auc(jnp.asarray(ss), jnp.asarray(yy))) - 1e-6


def test_invariance_grads_edge_cases():
  s, y = jnp.asarray(S, jnp.float32), jnp.asarray(Y)
  np.testing.assert_allclose(mw_loss(s + 3., y), mw_loss(s, y), rtol=1e-6)
  with jax.enable_x64(True):
    jtu.check_grads(lambda a: mw_loss(a, jnp.asarray(Y)), (jnp.asarray(S),), order=1, modes=["rev"])
  for yy in (jnp.zeros_like(y), jnp.ones_like(y)):   # no positives / no negatives
    assert float(mw_loss(s, yy)) == 0.0 and float(auc(s, yy)) == 0.0
    assert np.all(jax.grad(mw_loss)(s, yy) == 0)
  assert float(mw_loss(s[:1, :1], y[:1, :1])) == 0.0   # single sample
  np.testing.assert_allclose(float(mw_loss(jnp.zeros((2, 3)), jnp.array([[1, 0, 0], [0, 1, 0]]))), np.log(2), rtol=1e-6)
  np.testing.assert_allclose(float(auc(jnp.zeros((2, 3)), jnp.array([[1, 0, 0], [0, 1, 0]]))), 0.5)
  for x in (1e3 * s, s.astype(jnp.bfloat16)):
    assert np.isfinite(float(mw_loss(x, y))) and np.all(np.isfinite(jax.grad(mw_loss)(x, y).astype(jnp.float32)))
  np.testing.assert_allclose(float(mw_loss(1e3 * s, y)), np_pairs(1e3 * S.astype(np.float32), Y, np.ones_like(Y, bool), "global",
                                                                 lambda d: np.logaddexp(0, -d)), rtol=1e-5)
  for scope in ("global", "per_query"):
    f = lambda a: mw_loss(a, y, scope=scope)
    np.testing.assert_allclose(jax.jit(f)(s), f(s), rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(lambda a: mw_loss(a, y[0]))(s), [mw_loss(s[i], y[0]) for i in range(Q)], rtol=1e-6)


def test_bad_inputs():
  with pytest.raises(ValueError, match="labels"):
    mw_loss(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="scope"):
    mw_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), scope="x")
  with pytest.raises(ValueError, match="scores"):
    auc(jnp.ones((2, 3, 1)), jnp.ones((2, 3, 1)))


def test_jit_matches_eager():
  s, y = jnp.asarray(S, jnp.float32), jnp.asarray(Y)
  for scope in ("global", "per_query"):
    np.testing.assert_allclose(mw_loss(s, y, scope=scope), _L.mw_loss(s, y, scope=scope), rtol=1e-6)
    np.testing.assert_allclose(auc(s, y, scope=scope), _L.auc(s, y, scope=scope), rtol=1e-6)


def test_chunked_path_matches_rax():
  """k * m > 2^22 pairs switches to the lax.map-chunked evaluation."""
  s = RNG.normal(size=(30, 70))
  y = (RNG.uniform(size=(30, 70)) < 0.5).astype(int)
  got = mw_loss(jnp.asarray(s, jnp.float32), jnp.asarray(y))
  ref = rax.pairwise_logistic_loss(jnp.asarray(s.reshape(-1), jnp.float32), jnp.asarray(y.reshape(-1), jnp.float32))
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
