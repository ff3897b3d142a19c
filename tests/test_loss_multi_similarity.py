"""multi_similarity_loss / multi_similarity_miner vs a numpy loop, PML, and the official loop."""
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest

from losses import multi_similarity_loss, multi_similarity_miner

import losses as _L  # eager originals, used by test_jit_matches_eager

# The tests call jitted versions (one compile per shape instead of op-by-op eager dispatch, which
# keeps the suite fast); test_jit_matches_eager compares them with the eager functions.
def _jitted(name, *static):
  return jax.jit(getattr(_L, name), static_argnames=static)

multi_similarity_loss = _jitted('multi_similarity_loss', 'mining', 'require_both')
multi_similarity_miner = _jitted('multi_similarity_miner')



def _np_norm(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_ms(emb, labels, ref=None, ref_labels=None, alpha=2., beta=50., base=.5, mining=False,
          eps=.1, require_both=False):
  """Brute-force loop of Eq. 8-9 and 15 (per anchor, python sets)."""
  selfref = ref is None
  ref, ref_labels = (emb, labels) if selfref else (ref, ref_labels)
  s = _np_norm(emb) @ _np_norm(ref).T
  total = 0.
  for i in range(len(emb)):
    P = [j for j in range(len(ref)) if ref_labels[j] == labels[i] and not (selfref and j == i)]
    N = [j for j in range(len(ref)) if ref_labels[j] != labels[i]]
    if mining:
      mn = min([s[i, j] for j in P], default=np.inf)
      mx = max([s[i, j] for j in N], default=-np.inf)
      P, N = [j for j in P if s[i, j] - eps < mx], [j for j in N if s[i, j] + eps > mn]
    if require_both and (not P or not N):
      continue
    total += np.log(1 + sum(np.exp(-alpha * (s[i, j] - base)) for j in P)) / alpha
    total += np.log(1 + sum(np.exp(beta * (s[i, j] - base)) for j in N)) / beta
  return total / len(emb)


def official_ms(feats, labels, eps=0.1, thresh=0.5, alpha=2., beta=40.):
  """Transcription of the MalongTech loop (value-threshold self removal, skip incomplete anchors)."""
  sim = np.asarray(feats, np.float64) @ np.asarray(feats, np.float64).T
  losses = []
  for i in range(len(feats)):
    pos_ = sim[i][labels == labels[i]]
    pos_ = pos_[pos_ < 1 - 1e-5]
    neg_ = sim[i][labels != labels[i]]
    neg = neg_[neg_ + eps > min(pos_)]
    pos = pos_[pos_ - eps < max(neg_)]
    if len(neg) < 1 or len(pos) < 1:
      continue
    losses.append(np.log(1 + np.sum(np.exp(-alpha * (pos - thresh)))) / alpha
                  + np.log(1 + np.sum(np.exp(beta * (neg - thresh)))) / beta)
  return sum(losses) / len(feats)


def angle_emb(angles):
  a = np.deg2rad(np.asarray(angles, np.float64))
  return np.stack([2 * np.cos(a), 0.5 * np.sin(a)], 1)   # unnormalised on purpose (PML test style)


RNG = np.random.default_rng(0)
EMB = RNG.normal(size=(12, 5))
LAB = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0, 1])


@pytest.mark.parametrize("mining", [False, True])
@pytest.mark.parametrize("hp", [dict(), pytest.param(dict(alpha=0.1, beta=40., base=0.5), marks=pytest.mark.slow),
                                pytest.param(dict(alpha=3., beta=10., base=0.2), marks=pytest.mark.slow)])
def test_numpy_loop_float64(mining, hp):
  with jax.enable_x64(True):
    got = multi_similarity_loss(jnp.asarray(EMB), jnp.asarray(LAB), mining=mining, **hp)
    np.testing.assert_allclose(float(got), np_ms(EMB, LAB, mining=mining, **hp), rtol=1e-10)
    pml_angles = angle_emb([0, 20, 40, 60, 80])
    got = multi_similarity_loss(jnp.asarray(pml_angles), jnp.array([0, 0, 1, 1, 2]), mining=mining, **hp)
    np.testing.assert_allclose(float(got), np_ms(pml_angles, [0, 0, 1, 1, 2], mining=mining, **hp), rtol=1e-10)


def test_float32_close_to_float64_oracle():
  got = multi_similarity_loss(jnp.asarray(EMB, jnp.float32), jnp.asarray(LAB))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), np_ms(EMB, LAB), rtol=1e-5)


def test_with_reference_set():
  ref = RNG.normal(size=(7, 5))
  rl = np.array([0, 1, 1, 3, 5, 5, 2])
  with jax.enable_x64(True):
    for mining in (False, True):
      got = multi_similarity_loss(jnp.asarray(EMB), jnp.asarray(LAB), jnp.asarray(ref), jnp.asarray(rl),
                                  mining=mining)
      np.testing.assert_allclose(float(got), np_ms(EMB, LAB, ref, rl, mining=mining), rtol=1e-10)


@pytest.fixture(scope="module")
def pml():
  torch = pytest.importorskip("torch")
  pytest.importorskip("pytorch_metric_learning")
  from pytorch_metric_learning import losses as pl, miners as pm
  return torch, pl, pm


@pytest.mark.parametrize("with_ref", [False, True])
def test_pml_oracle(pml, with_ref):
  torch, pl, pm = pml
  loss_fn, miner = pl.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), pm.MultiSimilarityMiner(epsilon=0.1)
  emb = RNG.normal(size=(16, 6))
  lab = RNG.integers(0, 4, 16)
  te, tl = torch.tensor(emb), torch.tensor(lab)
  kw, jkw = {}, {}
  if with_ref:
    ref, rl = RNG.normal(size=(9, 6)), RNG.integers(0, 4, 9)
    kw = dict(ref_emb=torch.tensor(ref), ref_labels=torch.tensor(rl))
    jkw = dict(ref_embeddings=ref, ref_labels=rl)
  with jax.enable_x64(True):
    jkw = {k: jnp.asarray(v) for k, v in jkw.items()}
    plain = loss_fn(te, tl, **kw).item()
    idx = miner(te, tl, kw.get("ref_emb"), kw.get("ref_labels"))
    mined = loss_fn(te, tl, idx, **kw).item()
    np.testing.assert_allclose(float(multi_similarity_loss(jnp.asarray(emb), jnp.asarray(lab), **jkw)), plain,
                               rtol=1e-10)
    np.testing.assert_allclose(float(multi_similarity_loss(jnp.asarray(emb), jnp.asarray(lab), mining=True, **jkw)),
                               mined, rtol=1e-10)
    hp, hn = multi_similarity_miner(jnp.asarray(emb), jnp.asarray(lab), **jkw)
  a1, p, a2, n = (t.numpy() for t in idx)
  assert set(zip(a1, p)) == set(zip(*np.nonzero(np.asarray(hp))))
  assert set(zip(a2, n)) == set(zip(*np.nonzero(np.asarray(hn))))


def test_official_loop_with_require_both():
  feats = _np_norm(RNG.normal(size=(14, 4)))
  lab = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5])
  with jax.enable_x64(True):
    got = multi_similarity_loss(jnp.asarray(feats), jnp.asarray(lab), beta=40., mining=True, require_both=True)
  np.testing.assert_allclose(float(got), official_ms(feats, lab), rtol=1e-10)


def test_deviation_duplicates_stay_positive():
  """Official code drops positives with S >= 1-1e-5 (also genuine duplicates); we drop the diagonal only."""
  feats = _np_norm(RNG.normal(size=(6, 4)))
  feats[1] = feats[0]   # duplicate of the same class ...
  feats[3] = _np_norm(feats[0:1] + 0.05 * RNG.normal(size=(1, 4)))[0]   # ... and a very close negative
  lab = np.array([0, 0, 0, 1, 1, 1])
  with jax.enable_x64(True):
    ours = float(multi_similarity_loss(jnp.asarray(feats), jnp.asarray(lab), beta=40., mining=True,
                                       require_both=True))
    np.testing.assert_allclose(ours, np_ms(feats, lab, beta=40., mining=True, require_both=True), rtol=1e-10)
    assert abs(ours - official_ms(feats, lab)) > 1e-6


@pytest.mark.parametrize("mining", [False, True])
def test_edge_cases_finite(mining):
  f = lambda e, l, **k: multi_similarity_loss(e, l, mining=mining, **k)
  g = jax.grad(f)
  e1 = jnp.ones((1, 3))
  assert float(f(e1, jnp.array([0]))) == 0.0            # single sample: no pairs
  assert np.all(g(e1, jnp.array([0])) == 0)
  e = jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)
  for lab in (jnp.zeros(5, int), jnp.arange(5)):         # one class (no negatives) / no positives
    v = f(e, lab)
    np.testing.assert_allclose(float(v), np_ms(np.asarray(e), np.asarray(lab), mining=mining), rtol=1e-5)
    assert np.all(np.isfinite(g(e, lab)))
  # zero embedding, ties, duplicates, huge magnitudes
  for e in (jnp.zeros((4, 3)), jnp.ones((4, 3)), 1e3 * jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)):
    lab = jnp.array([0, 0, 1, 1])
    assert np.isfinite(float(f(e, lab)))
    assert np.all(np.isfinite(g(e, lab)))


def test_padding_mask_equals_truncation():
  e, lab = jnp.asarray(EMB, jnp.float32), jnp.asarray(LAB)
  pad_e = jnp.concatenate([e, 100 * jnp.ones((3, 5))])
  pad_l = jnp.concatenate([lab, jnp.array([0, 1, 2])])
  w = jnp.arange(15) < 12
  for mining in (False, True):
    np.testing.assert_allclose(multi_similarity_loss(pad_e, pad_l, where=w, mining=mining),
                               multi_similarity_loss(e, lab, mining=mining), rtol=1e-6)
    gp = jax.grad(multi_similarity_loss)(pad_e, pad_l, where=w, mining=mining)
    assert np.all(gp[12:] == 0)


def test_bf16_jit_vmap():
  e = jnp.asarray(EMB, jnp.bfloat16)
  v = multi_similarity_loss(e, jnp.asarray(LAB))
  assert v.dtype == jnp.float32
  np.testing.assert_allclose(float(v), np_ms(np.asarray(e.astype(jnp.float32)), LAB), rtol=1e-4)
  assert jax.grad(lambda x: multi_similarity_loss(x, jnp.asarray(LAB)))(e).dtype == jnp.bfloat16
  e32 = jnp.asarray(EMB, jnp.float32)
  for mining in (False, True):
    f = lambda x: multi_similarity_loss(x, jnp.asarray(LAB), mining=mining)
    np.testing.assert_allclose(jax.jit(f)(e32), f(e32), rtol=1e-6)
  batched = jax.vmap(lambda x: multi_similarity_loss(x, jnp.asarray(LAB)))(jnp.stack([e32, 2 * e32]))
  np.testing.assert_allclose(batched, [multi_similarity_loss(e32, jnp.asarray(LAB))] * 2, rtol=1e-6)


def test_check_grads_and_mining_is_stop_gradient():
  with jax.enable_x64(True):
    e = jnp.asarray(EMB)
    jtu.check_grads(lambda x: multi_similarity_loss(x, jnp.asarray(LAB)), (e,), order=1,
                              modes=["rev"])
    # mined gradient == gradient of the unmined loss on fixed (constant) mined masks
    hp, hn = multi_similarity_miner(e, jnp.asarray(LAB))
    def fixed(x):
      xn = x / jnp.linalg.norm(x, axis=1, keepdims=True)
      s = xn @ xn.T
      pos = jnp.log1p(jnp.sum(jnp.where(hp, jnp.exp(-2 * (s - .5)), 0.), 1)) / 2
      neg = jnp.log1p(jnp.sum(jnp.where(hn, jnp.exp(50 * (s - .5)), 0.), 1)) / 50
      return jnp.mean(pos + neg)
    np.testing.assert_allclose(jax.grad(lambda x: multi_similarity_loss(x, jnp.asarray(LAB), mining=True))(e),
                               jax.grad(fixed)(e), rtol=1e-9, atol=1e-12)


def test_bad_inputs():
  with pytest.raises(ValueError, match="labels"):
    _L.multi_similarity_loss(jnp.ones((4, 3)), jnp.zeros(5, int))
  with pytest.raises(ValueError, match="embeddings"):
    _L.multi_similarity_loss(jnp.ones((4,)), jnp.zeros(4, int))
  with pytest.raises(ValueError, match="alpha"):
    _L.multi_similarity_loss(jnp.ones((4, 3)), jnp.zeros(4, int), alpha=0.)
  with pytest.raises(ValueError, match="labels"):
    _L.multi_similarity_loss(jnp.ones((4, 3)), jnp.zeros(4))


def test_jit_matches_eager():
  e, l = jnp.asarray(EMB[:6], jnp.float32), jnp.asarray(LAB[:6])
  for mining in (False, True):
    np.testing.assert_allclose(multi_similarity_loss(e, l, mining=mining), _L.multi_similarity_loss(e, l, mining=mining),
                               rtol=1e-6)
