"""Curriculum heuristics/weights vs scipy gaussian_kde and numpy transcriptions of OpenNIR."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from losses import (curriculum_weighted_loss, curriculum_weights, kde_difficulty, normscore_difficulty,
                    reciprank_difficulty)

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

curriculum_weights = _jitted('curriculum_weights', 'end_epoch', 'anti_curriculum')
curriculum_weighted_loss = _jitted('curriculum_weighted_loss', 'per_sample')
kde_difficulty = _jitted('kde_difficulty')
normscore_difficulty = _jitted('normscore_difficulty')


RNG = np.random.default_rng(0)
RUN = RNG.normal(10, 3, size=(3, 20))
DOCS = RUN[:, [0, 4, 9]] + 0.1


def test_kde_vs_scipy():
  with jax.enable_x64(True):
    got = kde_difficulty(jnp.asarray(DOCS), jnp.asarray(RUN))
  for q in range(3):
    kde = scipy.stats.gaussian_kde(RUN[q])
    want = [kde.integrate_box_1d(-np.inf, s) for s in DOCS[q]]
    np.testing.assert_allclose(got[q], want, rtol=1e-9)
  # padding of the run
  w = np.ones_like(RUN, bool)
  w[:, 15:] = False
  with jax.enable_x64(True):
    got = kde_difficulty(jnp.asarray(DOCS), jnp.asarray(RUN), jnp.asarray(w))
  np.testing.assert_allclose(got[1], [scipy.stats.gaussian_kde(RUN[1, :15]).integrate_box_1d(-np.inf, s) for s in DOCS[1]],
                             rtol=1e-9)


def test_normscore_reciprank():
  got = normscore_difficulty(jnp.asarray(DOCS, jnp.float32), jnp.asarray(RUN, jnp.float32))
  want = (DOCS - RUN.min(1, keepdims=True)) / (RUN.max(1, keepdims=True) - RUN.min(1, keepdims=True))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(reciprank_difficulty(jnp.array([1, 2, 10, 0])), [1., .5, .1, 1e-3], rtol=1e-6)


def np_weights(hp, hn, epoch, m=20, rel=None, anti=False):
  hp = 1 - hp if anti else hp
  if hn is None:
    d = np.where(rel, hp, 1 - hp)
  else:
    hn = 1 - hn if anti else hn
    d = np.array([min((hp[b] - hn[b, j] + 1) / 2 for j in range(hn.shape[1])) for b in range(len(hp))])
  d = d + 1e-8
  return d * (1 - epoch / m) + epoch / m if epoch < m else np.ones_like(d)


@pytest.mark.parametrize("epoch", [0, 5, 20, pytest.param(19, marks=pytest.mark.slow), pytest.param(30, marks=pytest.mark.slow)])
@pytest.mark.parametrize("anti", [False, True])
def test_weights_numpy(epoch, anti):
  hp, hn, rel = RNG.uniform(size=5), RNG.uniform(size=(5, 3)), RNG.uniform(size=5) < 0.5
  with jax.enable_x64(True):
    pw = curriculum_weights(jnp.asarray(hp), jnp.asarray(hn), epoch=epoch, anti_curriculum=anti)
    pt = curriculum_weights(jnp.asarray(hp), epoch=epoch, relevant=jnp.asarray(rel), anti_curriculum=anti)
    np.testing.assert_allclose(pw, np_weights(hp, hn, epoch, anti=anti), rtol=1e-12)
    np.testing.assert_allclose(pt, np_weights(hp, None, epoch, rel=rel, anti=anti), rtol=1e-12)
  assert np.all((np.asarray(pw) > 0) & (np.asarray(pw) <= 1))
  jit_w = jax.jit(lambda e: curriculum_weights(jnp.asarray(hp, jnp.float32), jnp.asarray(hn, jnp.float32), epoch=e))
  np.testing.assert_allclose(jit_w(epoch), np_weights(hp, hn, epoch), rtol=1e-5)


def test_weighted_loss_deviation_and_edges():
  l, w = jnp.array([1., 3.]), jnp.array([0.2, 1.0])
  np.testing.assert_allclose(curriculum_weighted_loss(l, w), 2. * 0.6, rtol=1e-6)          # code: mean x mean
  np.testing.assert_allclose(curriculum_weighted_loss(l, w, per_sample=True), 1.6, rtol=1e-6)   # paper notation
  g = jax.grad(lambda x: curriculum_weighted_loss(x, w))(l)
  np.testing.assert_allclose(g, [0.3, 0.3], rtol=1e-6)
  assert float(curriculum_weighted_loss(l, w, where=jnp.zeros(2, bool))) == 0.0
  # degenerate runs: constant scores, single document, bf16
  const = jnp.ones((1, 5))
  np.testing.assert_allclose(normscore_difficulty(jnp.array([[3., -1.]]), const), 0.5)   # no range: 0.5
  empty = jnp.array([[True, True], [False, False]])                 # query 1: every run document masked out
  got = normscore_difficulty(jnp.array([[2., 4.], [7., -3.]]), jnp.array([[0., 4.], [1., 2.]]), run_where=empty)
  np.testing.assert_allclose(got, [[0.5, 1.0], [0.5, 0.5]], rtol=1e-6)   # an empty run is treated like a constant one
  assert np.all(np.isfinite(kde_difficulty(jnp.ones((1, 2)), const)))
  assert np.all(np.isfinite(kde_difficulty(jnp.ones((1, 2)), jnp.ones((1, 1)))))
  assert kde_difficulty(jnp.asarray(DOCS, jnp.bfloat16), jnp.asarray(RUN, jnp.bfloat16)).dtype == jnp.float32
  with pytest.raises(ValueError, match="relevant"):
    curriculum_weights(jnp.ones(3), epoch=0)
  with pytest.raises(ValueError, match="neg_difficulty"):
    curriculum_weights(jnp.ones(3), jnp.ones((2, 3)), epoch=0)
  with pytest.raises(ValueError, match="end_epoch"):
    curriculum_weights(jnp.ones(3), jnp.ones((3, 2)), epoch=0, end_epoch=0)


def test_jit_matches_eager():
  d, r = jnp.asarray(DOCS, jnp.float32), jnp.asarray(RUN, jnp.float32)
  np.testing.assert_allclose(kde_difficulty(d, r), _L.kde_difficulty(d, r), rtol=1e-6)
  hp, hn = jnp.array([0.2, 0.9]), jnp.array([[0.1, 0.5], [0.3, 0.95]])
  np.testing.assert_allclose(curriculum_weights(hp, hn, epoch=4), _L.curriculum_weights(hp, hn, epoch=4), rtol=1e-6)
