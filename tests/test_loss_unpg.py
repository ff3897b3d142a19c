"""unpg_loss vs a numpy transcription of the official UNPG head + box-and-whisker filter."""
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest

from losses import unpg_loss as _unpg_loss
from oracle_utils import np_fd_grad

# tests call the jitted function (one compile per shape instead of op-by-op dispatch); the eager
# function is compared with it in test_mask_bf16_jit_huge
unpg_loss = jax.jit(_unpg_loss, static_argnames=("margin_type",))

RNG = np.random.default_rng(0)
B, C, D = 8, 5, 6
F, W, Y = RNG.normal(size=(B, D)), RNG.normal(size=(C, D)), RNG.integers(0, C, B)


def _n(x):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_unpg(f, w, y, s=64., m=0.5, kind="arcface", wisk=1.5):
  fn, wn = _n(f), _n(w)
  cos = fn @ wn.T
  logits = cos.copy()
  for i in range(len(f)):
    logits[i, y[i]] = np.cos(np.arccos(cos[i, y[i]]) + m) if kind == "arcface" else cos[i, y[i]] - m
  sn = [float(fn[i] @ fn[j]) for i in range(len(f)) for j in range(i + 1, len(f)) if y[i] != y[j]]
  extra = []
  if sn:
    srt = sorted(sn)
    l = len(srt)
    q1, q3 = srt[int(0.25 * l)], srt[int(0.75 * l)]
    iqr = q3 - q1
    extra = [x for x in sn if q1 - wisk * iqr <= x <= q3 + wisk * iqr]
  out = []
  for i in range(len(f)):
    row = np.concatenate([s * logits[i], s * np.asarray(extra)])
    mx = row.max()
    out.append(mx + np.log(np.exp(row - mx).sum()) - s * logits[i, y[i]])
  return np.mean(out)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize("wisk", [1.5, pytest.param(0.0, marks=pytest.mark.slow), pytest.param(1e9, marks=pytest.mark.slow)])
def test_numpy_transcription(kind, wisk):
  with jax.enable_x64(True):
    got = unpg_loss(jnp.asarray(F), jnp.asarray(W), jnp.asarray(Y), margin_type=kind, whisker=wisk)
  np.testing.assert_allclose(float(got), np_unpg(F, W, Y, kind=kind, wisk=wisk), rtol=1e-10)


def test_quartile_edge_cases_and_no_negatives():
  with jax.enable_x64(True):
    for labels in ([0, 1, 1, 1], [0, 1, 2, 2], [0, 1, 2, 3, 0]):   # l = 3, 5, 9 negative pairs
      f = F[:len(labels)]
      y = np.array(labels)
      np.testing.assert_allclose(float(unpg_loss(jnp.asarray(f), jnp.asarray(W), jnp.asarray(y))),
                                 np_unpg(f, W, y), rtol=1e-10)
    f2, y2 = F[:2], np.array([0, 1])   # l = 1
    np.testing.assert_allclose(float(unpg_loss(jnp.asarray(f2), jnp.asarray(W), jnp.asarray(y2))), np_unpg(f2, W, y2), rtol=1e-10)
    # deviation: a batch with no negative pair (official code crashes) = plain ArcFace CE
    one = np.zeros(4, int)
    np.testing.assert_allclose(float(unpg_loss(jnp.asarray(F[:4]), jnp.asarray(W), jnp.asarray(one))),
                               np_unpg(F[:4], W, one), rtol=1e-10)
    g = jax.jit(jax.grad(unpg_loss))(jnp.asarray(F[:4]), jnp.asarray(W), jnp.asarray(one))
    assert np.all(np.isfinite(g))
    # single sample
    assert np.isfinite(float(unpg_loss(jnp.asarray(F[:1]), jnp.asarray(W), jnp.asarray(Y[:1]))))


def test_pairs_not_detached_and_arccos_clamp():
  f, w, y = jnp.asarray(F, jnp.float32), jnp.asarray(W, jnp.float32), jnp.asarray(Y)
  g_pairs = jax.jit(jax.grad(lambda a: unpg_loss(a, w, y, whisker=1e9)))(f)
  g_plain = jax.jit(jax.grad(lambda a: unpg_loss(a, w, jnp.zeros_like(y))))(f)
  assert np.all(np.isfinite(g_pairs)) and np.all(np.isfinite(g_plain))
  # features exactly aligned with their class weight: cos = 1, arccos clamped -> finite gradient
  wf = jnp.asarray(W[Y], jnp.float32)
  assert np.all(np.isfinite(jax.jit(jax.grad(lambda a: unpg_loss(a, w, y)))(wf)))
  axes = jnp.eye(C, D, dtype=jnp.float32)            # unit class weights: the cosine is exactly +-1 in float32
  g_axes = jax.jit(jax.grad(lambda a: unpg_loss(a, axes, y)))
  assert all(np.all(np.isfinite(g_axes(sign * axes[y]))) for sign in (1., -1.))
  # gradient flows through the appended pair logits: differs from the no-pair (huge-margin filter) case
  g_none = jax.jit(jax.grad(lambda a: unpg_loss(a, w, y, whisker=0.)))(f)
  assert np.abs(np.asarray(g_pairs - g_none)).max() > 1e-6


def test_mask_bf16_jit_huge():
  f, w, y = jnp.asarray(F, jnp.float32), jnp.asarray(W, jnp.float32), jnp.asarray(Y)
  fn = lambda a: unpg_loss(a, w, y)
  np.testing.assert_allclose(fn(f), _unpg_loss(f, w, y), rtol=1e-6)
  m = jnp.arange(B) < 5
  np.testing.assert_allclose(unpg_loss(f, w, y, where=m), unpg_loss(f[:5], w, y[:5]), rtol=1e-6)
  gfn = jax.jit(jax.grad(fn))
  for x in (1e3 * f, jnp.zeros_like(f), f.astype(jnp.bfloat16), jnp.ones_like(f)):
    assert np.isfinite(float(fn(x))) and np.all(np.isfinite(gfn(x).astype(jnp.float32)))
  with pytest.raises(ValueError, match="margin_type"):
    _unpg_loss(f, w, y, margin_type="sphereface")
  with pytest.raises(ValueError, match="class_weights"):
    _unpg_loss(f, w[:, :3], y)


@pytest.mark.parametrize("kind", ["arcface", pytest.param("cosface", marks=pytest.mark.slow)])
def test_gradient_values_numpy_oracle(kind):
  # gradients w.r.t. the features (through the class logits AND the appended pair logits) and the class
  # weights equal finite differences of the float64 numpy transcription; a stop_gradient on the pair
  # similarities (or on sn') would drop the pair term's share of d/df and fail here.
  f, w, y = F[:6], W, Y[:6]
  assert len({int(a) for a in y}) > 1   # negative pairs exist
  with jax.enable_x64(True):
    gf, gw = jax.grad(lambda a, b: unpg_loss(a, b, jnp.asarray(y), margin_type=kind), argnums=(0, 1))(
        jnp.asarray(f), jnp.asarray(w))
    jtu.check_grads(lambda a, b: unpg_loss(a, b, jnp.asarray(y), margin_type=kind), (jnp.asarray(f), jnp.asarray(w)),
                    order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)
  want_f = np_fd_grad(lambda a: np_unpg(a, w, y, kind=kind), f)
  want_w = np_fd_grad(lambda b: np_unpg(f, b, y, kind=kind), w)
  np.testing.assert_allclose(np.asarray(gf), want_f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gw), want_w, rtol=1e-5, atol=1e-6)
  # the pair term's share of d/df is far above the tolerance used above (so the check is sensitive to it)
  no_pairs = np_fd_grad(lambda a: np_unpg(a, w, y, kind=kind, wisk=-1.0), f)   # whisker < 0: empty sn'
  assert np.abs(want_f - no_pairs).max() > 100 * (1e-5 * np.abs(want_f).max() + 1e-6)
