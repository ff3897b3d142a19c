"""unlikeliness_reward / grpo_advantages vs a numpy transcription of the official code."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from losses import grpo_advantages, unlikeliness_reward

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

unlikeliness_reward = _jitted('unlikeliness_reward')
grpo_advantages = _jitted('grpo_advantages')


RNG = np.random.default_rng(0)
NG, G, T = 3, 6, 5
R = RNG.integers(0, 2, (NG, G)).astype(float)
LP = RNG.normal(-1, 0.5, (NG, G, T))
M = (RNG.uniform(size=(NG, G, T)) < 0.8).astype(float)
M[:, :, 0] = 1


def np_ref(r, lp, m, beta=0.25, eps=1e-6):
  out = np.zeros_like(r)
  for n in range(r.shape[0]):
    seq = [(lp[n, i] * m[n, i]).sum() / m[n, i].sum() for i in range(r.shape[1])]
    order = sorted(range(len(seq)), key=lambda i: (seq[i], i))
    rank = {i: k for k, i in enumerate(order)}
    rt = np.array([r[n, i] * (1 - beta * rank[i] / r.shape[1]) for i in range(r.shape[1])])
    if r.shape[1] == 1:
      out[n] = rt / (1 + eps)
    else:
      out[n] = (rt - rt.mean()) / (rt.std(ddof=1) + eps)
  return out


def test_numpy_transcription():
  with jax.enable_x64(True):
    rt = unlikeliness_reward(jnp.asarray(R), jnp.asarray(LP), jnp.asarray(M))
    adv = grpo_advantages(rt)
    np.testing.assert_allclose(adv, np_ref(R, LP, M), rtol=1e-10, atol=1e-12)
    one = unlikeliness_reward(jnp.asarray(R[1]), jnp.asarray(LP[1]), jnp.asarray(M[1]))   # a single group [G]
    np.testing.assert_allclose(one, rt[1], rtol=1e-12)
    tok = grpo_advantages(rt, jnp.asarray(M))
    np.testing.assert_allclose(tok, np_ref(R, LP, M)[..., None] * M, rtol=1e-10, atol=1e-12)
    # beta_rank = 0 is plain GRPO
    plain = grpo_advantages(unlikeliness_reward(jnp.asarray(R), jnp.asarray(LP), jnp.asarray(M), beta_rank=0.))
    want = (R - R.mean(1, keepdims=True)) / (R.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(plain, want, rtol=1e-10, atol=1e-12)


def test_properties():
  # all correct: reward decreases with likelihood rank; least likely keeps 1, most likely 1 - beta (G-1)/G
  lp = jnp.asarray(np.arange(G, dtype=float)[None, :, None] * np.ones((1, G, 2)))
  rt = unlikeliness_reward(jnp.ones((1, G)), lp)
  np.testing.assert_allclose(rt[0], 1 - 0.25 * np.arange(G) / G, rtol=1e-6)
  adv = grpo_advantages(rt)
  assert np.all(np.diff(np.asarray(adv[0])) < 0)
  np.testing.assert_allclose(np.asarray(adv).sum(), 0., atol=1e-5)
  # all-equal rewards -> A = 0; group of one -> r / (1 + eps); ties in log-probs broken by index
  np.testing.assert_allclose(grpo_advantages(jnp.zeros((2, 4))), 0.)
  np.testing.assert_allclose(grpo_advantages(jnp.array([[1.], [0.]])), [[1 / (1 + 1e-6)], [0.]], rtol=1e-6)
  tie = unlikeliness_reward(jnp.ones((1, 3)), jnp.zeros((1, 3, 2)))
  np.testing.assert_allclose(tie[0], [1., 1 - 0.25 / 3, 1 - 0.5 / 3], rtol=1e-6)
  # fully masked response -> finite; huge log-probs; bf16; jit; int rewards; vmap over groups
  m0 = jnp.zeros((1, 3, 2))
  assert np.all(np.isfinite(unlikeliness_reward(jnp.ones((1, 3)), jnp.zeros((1, 3, 2)), m0)))
  big = 1e3 * jnp.asarray(LP, jnp.float32)
  assert np.all(np.isfinite(grpo_advantages(unlikeliness_reward(jnp.asarray(R), big))))
  assert unlikeliness_reward(jnp.asarray(R), jnp.asarray(LP, jnp.bfloat16)).dtype == jnp.float32
  f = lambda r, l: grpo_advantages(unlikeliness_reward(r, l, jnp.asarray(M)))
  r32, l32 = jnp.asarray(R, jnp.float32), jnp.asarray(LP, jnp.float32)
  np.testing.assert_allclose(jax.jit(f)(r32, l32), f(r32, l32), rtol=1e-6)
  np.testing.assert_allclose(unlikeliness_reward(jnp.asarray(R, int), l32), unlikeliness_reward(r32, l32), rtol=1e-6)
  v = jax.vmap(lambda r, l, m: grpo_advantages(unlikeliness_reward(r[None], l[None], m[None]))[0])(
      r32, l32, jnp.asarray(M))
  np.testing.assert_allclose(v, f(r32, l32), rtol=1e-6)
  # no gradient flows into the log-probs through the ranks
  g = jax.grad(lambda l: unlikeliness_reward(r32, l).sum())(l32)
  assert np.all(g == 0)
  with pytest.raises(ValueError, match="token_logps"):
    unlikeliness_reward(jnp.ones((2, 3)), jnp.ones((2, 4, 5)))
  with pytest.raises(ValueError, match="token_mask"):
    grpo_advantages(jnp.ones((2, 3)), jnp.ones((2, 4, 5)))


def test_jit_matches_eager():
  r, lp, m = (jnp.asarray(x, jnp.float32) for x in (R, LP, M))
  np.testing.assert_allclose(grpo_advantages(unlikeliness_reward(r, lp, m)),
                             _L.grpo_advantages(_L.unlikeliness_reward(r, lp, m)), rtol=1e-6)
