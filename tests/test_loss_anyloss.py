"""anyloss vs scikit-learn metrics on hard predictions and a numpy transcription on soft inputs."""
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest

from losses import anyloss

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

anyloss = _jitted('anyloss', 'metric', 'gmean_sqrt')


RNG = np.random.default_rng(0)
N = 12
Y = RNG.integers(0, 2, N)
Y[:2] = [0, 1]
P = RNG.uniform(0.3, 0.7, N)
METRICS = ["accuracy", "f_beta", "gmean", "balanced_accuracy"]


def _div(a, b):
  return a / b if b > 0 else 0.   # the documented guard: a ratio with a zero denominator is 0


def np_any(p, y, metric, L=73., beta=1., eps=0., gsqrt=True):
  yh = 1 / (1 + np.exp(-L * (p - 0.5)))
  n, y1 = len(y), y.sum()
  y0 = n - y1
  tp = sum(y[i] * yh[i] for i in range(n))
  fn, fp = y1 - tp, yh.sum() - tp
  tn = n - y1 - yh.sum() + tp
  if metric == "accuracy":
    m = _div(tp + tn, n + eps)
  elif metric == "f_beta":
    m = _div((1 + beta ** 2) * tp, (1 + beta ** 2) * tp + beta ** 2 * fn + fp + eps)
  elif metric == "gmean":
    m = _div(tp, y1 + eps) * _div(tn, y0 + eps)
    m = np.sqrt(m + 1e-12) if gsqrt else m
  else:
    m = 0.5 * (_div(tp, y1 + eps) + _div(tn, y0 + eps))
  return 1 - m


@pytest.mark.parametrize("metric", METRICS)
def test_hard_predictions_equal_sklearn(metric):
  skm = pytest.importorskip("sklearn.metrics")
  hard = RNG.integers(0, 2, N)
  p = np.where(hard == 1, 0.95, 0.05)
  with jax.enable_x64(True):
    got = 1 - float(anyloss(jnp.asarray(p), jnp.asarray(Y), metric=metric, beta=2. if metric == "f_beta" else 1.))
  if metric == "accuracy":
    want = skm.accuracy_score(Y, hard)
  elif metric == "f_beta":
    want = skm.fbeta_score(Y, hard, beta=2.)
  elif metric == "gmean":
    want = np.sqrt(skm.recall_score(Y, hard) * skm.recall_score(1 - Y, 1 - hard))
  else:
    want = skm.balanced_accuracy_score(Y, hard)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_soft_numpy_transcription_and_grads(metric):
  with jax.enable_x64(True):
    for kw in (dict(), dict(eps=1e-5), dict(amplifier=10., beta=0.5)):
      got = anyloss(jnp.asarray(P), jnp.asarray(Y), metric=metric, **kw)
      want = np_any(P, Y, metric, L=kw.get("amplifier", 73.), beta=kw.get("beta", 1.), eps=kw.get("eps", 0.))
      np.testing.assert_allclose(float(got), want, rtol=1e-10)
    jtu.check_grads(lambda p: anyloss(p, jnp.asarray(Y), metric=metric, amplifier=5.), (jnp.asarray(P),),
                    order=1, modes=["rev"])
  if metric == "gmean":
    np.testing.assert_allclose(float(anyloss(jnp.asarray(P), jnp.asarray(Y), metric=metric, gmean_sqrt=False)),
                               np_any(P, Y, metric, gsqrt=False), rtol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_edges(metric):
  p, y = jnp.asarray(P, jnp.float32), jnp.asarray(Y)
  f = lambda a, lab: anyloss(a, lab, metric=metric)
  for lab in (jnp.zeros(N, int), jnp.ones(N, int)):   # one-class batch: finite (guarded denominators)
    assert np.isfinite(float(f(p, lab))) and np.all(np.isfinite(jax.grad(f)(p, lab)))
    np.testing.assert_allclose(float(f(p, lab)), np_any(P, np.asarray(lab), metric), rtol=1e-5)
  assert np.isfinite(float(f(p[:1], y[:1])))          # single sample
  for x in (jnp.full(N, 0.5), jnp.zeros(N), jnp.ones(N), p.astype(jnp.bfloat16)):   # ties, saturation, bf16
    assert np.all(np.isfinite(jax.grad(f)(x, y).astype(jnp.float32)))
  np.testing.assert_allclose(jax.jit(f)(p, y), f(p, y), rtol=1e-6)
  w = jnp.arange(N) < 7
  np.testing.assert_allclose(anyloss(p, y, metric=metric, where=w), f(p[:7], y[:7]), rtol=1e-6)


def test_deviation_batch_size_normalisation_and_bad_inputs():
  # accuracy is normalised by the batch size: a perfect batch has loss 0 whatever its size
  p = jnp.array([0.99, 0.01, 0.99])
  assert abs(float(anyloss(p, jnp.array([1, 0, 1])))) < 1e-6
  with pytest.raises(ValueError, match="metric"):
    anyloss(p, jnp.array([1, 0, 1]), metric="auc")
  with pytest.raises(ValueError, match="labels"):
    anyloss(p, jnp.array([1, 0]))


def test_jit_matches_eager():
  p, y = jnp.asarray(P, jnp.float32), jnp.asarray(Y)
  for metric in METRICS:
    np.testing.assert_allclose(anyloss(p, y, metric=metric), _L.anyloss(p, y, metric=metric), rtol=1e-6)
