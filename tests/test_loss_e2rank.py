"""e2rank losses vs numpy loops, rax.pairwise_logistic_loss and optax softmax CE."""
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import optax
import pytest
import rax

from losses import e2rank_infonce_loss, e2rank_loss, e2rank_ranknet_loss

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

e2rank_infonce_loss = _jitted('e2rank_infonce_loss')
e2rank_ranknet_loss = _jitted('e2rank_ranknet_loss')
e2rank_loss = _jitted('e2rank_loss')


RNG = np.random.default_rng(0)
Q, G, L, D = 3, 2, 5, 4
QE, DE = RNG.normal(size=(Q, D)), RNG.normal(size=(Q * G, D))
QH, CE_ = RNG.normal(size=(Q, D)), RNG.normal(size=(Q, L, D))
REL = np.stack([RNG.permutation(L) + 1 for _ in range(Q)]).astype(np.float64)


def _n(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_ranknet(qh, c, rel, scale, mask=None):
  mask = np.ones(rel.shape, bool) if mask is None else mask
  tot, cnt = 0., 0
  for i in range(len(qh)):
    s = [scale * float(_n(qh[i]) @ _n(c[i, j])) for j in range(c.shape[1])]
    for j in range(c.shape[1]):
      for k in range(c.shape[1]):
        if mask[i, j] and mask[i, k] and rel[i, j] > rel[i, k]:
          tot += np.log1p(np.exp(-(s[j] - s[k])))
          cnt += 1
  return tot / max(cnt, 1)


def np_infonce(q, d, tau):
  g = len(d) // len(q)
  tot = 0.
  for i in range(len(q)):
    logits = [float(_n(q[i]) @ _n(d[j])) / tau for j in range(len(d))]
    tot += -(logits[i * g] - np.log(np.sum(np.exp(logits))))
  return tot / len(q)


def test_numpy_loops_and_library_oracles():
  with jax.enable_x64(True):
    r = e2rank_ranknet_loss(jnp.asarray(QH), jnp.asarray(CE_), jnp.asarray(REL))
    np.testing.assert_allclose(float(r), np_ranknet(QH, CE_, REL, 10.), rtol=1e-10)
    s = 10. * jnp.einsum("qd,qld->ql", jnp.asarray(_n(QH)), jnp.asarray(_n(CE_)))
    np.testing.assert_allclose(float(r), float(rax.pairwise_logistic_loss(s, jnp.asarray(REL))), rtol=1e-10)
    e = e2rank_infonce_loss(jnp.asarray(QE), jnp.asarray(DE))
    np.testing.assert_allclose(float(e), np_infonce(QE, DE, 0.03), rtol=1e-10)
    logits = jnp.asarray(_n(QE) @ _n(DE).T / 0.03)
    ref = optax.losses.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(Q) * G).mean()
    np.testing.assert_allclose(float(e), float(ref), rtol=1e-10)
    tot = e2rank_loss(jnp.asarray(QE), jnp.asarray(DE), jnp.asarray(QH), jnp.asarray(CE_), jnp.asarray(REL))
    np.testing.assert_allclose(float(tot), float(e) + 2 * float(r), rtol=1e-12)
    jtu.check_grads(lambda a, b: e2rank_loss(jnp.asarray(QE), jnp.asarray(DE), a, b, jnp.asarray(REL)),
                    (jnp.asarray(QH), jnp.asarray(CE_)), order=1, modes=["rev"])


def test_mask_ties_edge_cases():
  qh, c, rel = jnp.asarray(QH, jnp.float32), jnp.asarray(CE_, jnp.float32), jnp.asarray(REL)
  m = np.ones((Q, L), bool)
  m[0, 3:] = False
  with jax.enable_x64(True):
    got = e2rank_ranknet_loss(jnp.asarray(QH), jnp.asarray(CE_), jnp.asarray(REL), where=jnp.asarray(m))
    np.testing.assert_allclose(float(got), np_ranknet(QH, CE_, REL, 10., m), rtol=1e-10)
    np.testing.assert_allclose(float(got), float(rax.pairwise_logistic_loss(
        10. * jnp.einsum("qd,qld->ql", jnp.asarray(_n(QH)), jnp.asarray(_n(CE_))), jnp.asarray(REL),
        where=jnp.asarray(m))), rtol=1e-10)
  # all ties in relevance -> no pairs -> 0, finite zero grads
  f = lambda a: e2rank_ranknet_loss(a, c, jnp.ones((Q, L)))
  assert float(f(qh)) == 0.0 and np.all(jax.grad(f)(qh) == 0)
  # single query / single doc, zero vectors, huge values, duplicates, bf16
  assert float(e2rank_ranknet_loss(qh[:1], c[:1, :1], rel[:1, :1])) == 0.0
  for x in (jnp.zeros_like(qh), 1e3 * qh, jnp.ones_like(qh), qh.astype(jnp.bfloat16)):
    g = jax.grad(lambda a: e2rank_loss(a, jnp.asarray(DE, jnp.float32), a, c, rel))(x)
    assert np.all(np.isfinite(g.astype(jnp.float32)))
  np.testing.assert_allclose(float(e2rank_infonce_loss(qh[:1], jnp.asarray(DE[:1]))), 0.0, atol=1e-6)
  f2 = lambda a: e2rank_loss(a, jnp.asarray(DE, jnp.float32), a, c, rel)
  np.testing.assert_allclose(jax.jit(f2)(qh), f2(qh), rtol=1e-6)


def test_bad_inputs():
  with pytest.raises(ValueError, match="doc_emb"):
    _L.e2rank_infonce_loss(jnp.ones((3, 4)), jnp.ones((4, 4)))
  with pytest.raises(ValueError, match="relevance"):
    _L.e2rank_ranknet_loss(jnp.ones((2, 4)), jnp.ones((2, 3, 4)), jnp.ones((2, 4)))
  for cand in (jnp.ones((3, 3, 4)), jnp.ones((2, 3, 5))):   # one wrong dimension (queries, then features)
    with pytest.raises(ValueError, match="cand_emb shape"):
      _L.e2rank_ranknet_loss(jnp.ones((2, 4)), cand, jnp.ones((cand.shape[0], 3)))
  with pytest.raises(ValueError, match="temperature"):
    _L.e2rank_infonce_loss(jnp.ones((3, 4)), jnp.ones((3, 4)), temperature=0.)


def test_jit_matches_eager():
  a = [jnp.asarray(x, jnp.float32) for x in (QE, DE, QH, CE_, REL)]
  np.testing.assert_allclose(e2rank_loss(*a), _L.e2rank_loss(*a), rtol=1e-6)
