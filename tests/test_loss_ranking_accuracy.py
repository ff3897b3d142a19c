"""dpo_loss, ranking_accuracy, idealized_ranking_accuracy vs numpy loops and rax.opa_metric."""
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest
import rax

from losses import dpo_loss, idealized_ranking_accuracy, ranking_accuracy

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

dpo_loss = _jitted('dpo_loss')
ranking_accuracy = _jitted('ranking_accuracy')
idealized_ranking_accuracy = _jitted('idealized_ranking_accuracy', 'eps')


RNG = np.random.default_rng(0)
N = 9
PC, PR, RC, RR = (RNG.normal(-20, 5, size=N) for _ in range(4))
LC, LR = RNG.integers(5, 30, N), RNG.integers(5, 30, N)


def test_dpo_numpy_and_grads():
  for beta in (0.1, 1.0):
    want = np.mean([np.log1p(np.exp(-beta * ((PC[i] - RC[i]) - (PR[i] - RR[i])))) for i in range(N)])
    with jax.enable_x64(True):
      kw = {} if beta == 0.1 else {"beta": beta}         # beta = 0.1 is the default
      got = dpo_loss(*(jnp.asarray(x) for x in (PC, PR, RC, RR)), **kw)
      np.testing.assert_allclose(float(got), want, rtol=1e-10)
      jtu.check_grads(lambda a, b: dpo_loss(a, b, jnp.asarray(RC), jnp.asarray(RR), beta=beta),
                      (jnp.asarray(PC), jnp.asarray(PR)), order=1, modes=["rev"])
  g = jax.grad(dpo_loss, argnums=(2, 3))(*(jnp.asarray(x, jnp.float32) for x in (PC, PR, RC, RR)))
  assert all(np.all(x == 0) for x in g)   # reference model detached
  # huge margins, bf16, mask, jit
  big = [jnp.asarray(x * 100, jnp.float32) for x in (PC, PR, RC, RR)]
  assert np.isfinite(float(dpo_loss(*big))) and np.all(np.isfinite(jax.grad(dpo_loss)(*big)))
  assert dpo_loss(*(x.astype(jnp.bfloat16) for x in big)).dtype == jnp.float32
  w = jnp.arange(N) < 5
  args = [jnp.asarray(x, jnp.float32) for x in (PC, PR, RC, RR)]
  np.testing.assert_allclose(dpo_loss(*args, where=w), dpo_loss(*(a[:5] for a in args)), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(dpo_loss)(*args), dpo_loss(*args), rtol=1e-6)


def test_ranking_accuracy_numpy_opa_ties_lengths():
  want = np.mean([float(PC[i] >= PR[i]) for i in range(N)])
  np.testing.assert_allclose(float(ranking_accuracy(jnp.asarray(PC), jnp.asarray(PR))), want, rtol=1e-6)
  opa = rax.opa_metric(jnp.stack([jnp.asarray(PC), jnp.asarray(PR)], 1), jnp.tile(jnp.array([1., 0.]), (N, 1)))
  np.testing.assert_allclose(float(ranking_accuracy(jnp.asarray(PC), jnp.asarray(PR))), float(opa), rtol=1e-6)
  want_n = np.mean([float(PC[i] / LC[i] >= PR[i] / LR[i]) for i in range(N)])
  got_n = ranking_accuracy(jnp.asarray(PC), jnp.asarray(PR), chosen_lengths=jnp.asarray(LC),
                           rejected_lengths=jnp.asarray(LR))
  np.testing.assert_allclose(float(got_n), want_n, rtol=1e-6)
  # lengths 1 and 0 (an empty response counts as length 1)
  c, r, lc, lr = np.array([-3., -3., -4.]), np.array([-2., -5., -4.5]), np.array([1, 0, 1]), np.array([1, 2, 0])
  want = np.mean(c / np.maximum(lc, 1) >= r / np.maximum(lr, 1))
  got = ranking_accuracy(jnp.asarray(c), jnp.asarray(r), chosen_lengths=jnp.asarray(lc), rejected_lengths=jnp.asarray(lr))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # equal log-likelihoods count as correct (>=); ties (rater fraction 1/2) judged with a tolerance
  assert float(ranking_accuracy(jnp.zeros(3), jnp.zeros(3))) == 1.0
  ties = jnp.array([True, True, False])
  got = ranking_accuracy(jnp.array([-1., -1., -1.]), jnp.array([-1.005, -3., -3.]), ties=ties)
  np.testing.assert_allclose(float(got), 2 / 3, rtol=1e-6)   # pair 0 tie-correct, pair 1 tie-wrong, pair 2 ok
  assert float(ranking_accuracy(jnp.zeros(3), jnp.zeros(3), where=jnp.zeros(3, bool))) == 0.0


def test_idealized_ranking_accuracy():
  alpha = RNG.uniform(0.5, 1.0, N)
  alpha[0] = 1.0
  for beta in (0.01, 0.1, 1., 5., 10.):
    want = np.mean([float(RC[i] - RR[i] + (np.log(min(a, 1 - 1e-3)) - np.log(1 - min(a, 1 - 1e-3))) / beta > 0)
                    for i, a in enumerate(alpha)])
    got = idealized_ranking_accuracy(jnp.asarray(RC), jnp.asarray(RR), jnp.asarray(alpha), beta=beta)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # beta -> large: reduces to the reference model's ranking accuracy
  np.testing.assert_allclose(float(idealized_ranking_accuracy(jnp.asarray(RC), jnp.asarray(RR), jnp.full(N, 0.9),
                                                              beta=1e9)),
                             np.mean(RC > RR), rtol=1e-6)
  # unanimous raters with small beta: always correct (alpha=1 clipped, finite)
  assert float(idealized_ranking_accuracy(jnp.asarray(RC), jnp.asarray(RR), jnp.ones(N), beta=1e-3)) == 1.0
  with pytest.raises(ValueError, match="beta"):
    _L.idealized_ranking_accuracy(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), beta=0.)
  for eps in (0., 0.5):   # eps = 0 gives an infinite margin for unanimous raters; 0.5 clips every fraction to 1/2
    with pytest.raises(ValueError, match="eps"):
      _L.idealized_ranking_accuracy(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), beta=1., eps=eps)
  with pytest.raises(ValueError, match="rater_fraction"):
    idealized_ranking_accuracy(jnp.zeros(2), jnp.zeros(2), jnp.ones(3), beta=1.)
  with pytest.raises(ValueError, match="policy_rejected_logps"):
    dpo_loss(jnp.zeros(2), jnp.zeros(3), jnp.zeros(2), jnp.zeros(2))


def test_jit_matches_eager():
  a = [jnp.asarray(x, jnp.float32) for x in (PC, PR, RC, RR)]
  np.testing.assert_allclose(dpo_loss(*a), _L.dpo_loss(*a), rtol=1e-6)
  np.testing.assert_allclose(ranking_accuracy(a[0], a[1]), _L.ranking_accuracy(a[0], a[1]), rtol=1e-6)
  np.testing.assert_allclose(idealized_ranking_accuracy(a[2], a[3], jnp.full(N, 0.8), beta=0.1),
                             _L.idealized_ranking_accuracy(a[2], a[3], jnp.full(N, 0.8), beta=0.1), rtol=1e-6)
