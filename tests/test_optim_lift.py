"""LIFT against a numpy transcription of SparseAdamW (zihanghliu/LIFT src/sparseAdam.py, with largest=True)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim import lift, state_size
from optim.lift import remap_moments


def np_mask(w, filter_rank, k):
  u, s, vh = np.linalg.svd(w, full_matrices=False)
  approx = (u[:, :filter_rank] * s[:filter_rank]) @ vh[:filter_rank]
  flat = np.abs(approx).reshape(-1)
  mask = np.zeros(flat.shape, bool)
  mask[np.argsort(-flat, kind="stable")[:k]] = True  # the k LARGEST entries
  return mask.reshape(w.shape)


def np_lift(w_t, grad_fn_t, steps, lora_rank, filter_rank, gap, lr, b1, b2, eps):
  """Torch-layout SparseAdamW: dense-mask bookkeeping, moments carried via scatter/gather at refresh."""
  w = w_t.astype(np.float64).copy()
  m_, n_ = w.shape
  k = min((m_ + n_) * lora_rank, m_ * n_)
  mask = np_mask(w, filter_rank, k)
  mom = vel = None
  step = total_step = 0
  for it in range(steps):
    g = grad_fn_t(w, it)
    gm = g[mask]
    if mom is None:
      mom, vel = np.zeros_like(gm), np.zeros_like(gm)
    step += 1
    mom = b1 * mom + (1 - b1) * gm
    vel = b2 * vel + (1 - b2) * gm ** 2
    step_size = lr * np.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    upd = np.zeros_like(w)
    upd[mask] = mom / (np.sqrt(vel) + eps)
    w = w - step_size * upd
    total_step += 1
    if (total_step + 1) % gap == 0:
      dense_m, dense_v = np.zeros_like(w), np.zeros_like(w)
      dense_m[mask], dense_v[mask] = mom, vel
      mask = np_mask(w, filter_rank, k)
      mom, vel = dense_m[mask], dense_v[mask]
  return w


@pytest.mark.parametrize("shape", [(12, 10), (10, 16)])
def test_matches_reference_transcription(shape):
  steps, gap, lora_rank, filter_rank, lr, b1, b2, eps = 11, 3, 2, 3, 0.05, 0.9, 0.95, 1e-6
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=shape).astype(np.float32)
  target = rng.normal(size=shape).astype(np.float32)
  params = {"attn": {"q": {"kernel": jnp.asarray(w0)}}}
  tx = lift(lr, lora_rank=lora_rank, filter_rank=filter_rank, update_gap=gap, b1=b1, b2=b2, eps=eps)
  state = tx.init(params)
  upd = jax.jit(tx.update)
  p = params
  for it in range(steps):
    g = {"attn": {"q": {"kernel": 2.0 * (p["attn"]["q"]["kernel"] - target) + np.sin(it)}}}
    u, state = upd(g, state, p)
    p = optax.apply_updates(p, u)
  ref = np_lift(w0.T, lambda w, it: 2.0 * (w - target.T) + np.sin(it), steps, lora_rank, filter_rank, gap, lr,
                b1, b2, eps)
  np.testing.assert_allclose(np.asarray(p["attn"]["q"]["kernel"]), ref.T, rtol=1e-4, atol=1e-5)


def _inner(state):
  return state.inner_states["matrix"].inner_state[0]


def test_selects_largest_not_smallest_and_budget():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(20, 12)).astype(np.float32)
  params = {"mlp": {"kernel": jnp.asarray(w)}}
  tx = lift(0.01, lora_rank=2, filter_rank=4)
  idx = np.asarray(jax.tree.leaves(_inner(tx.init(params)).idx)[0])
  k = (20 + 12) * 2
  assert idx.shape == (k,) and (np.diff(idx) > 0).all()
  u, s, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
  mag = np.abs((u[:, :4] * s[:4]) @ vh[:4]).reshape(-1)
  sel = np.zeros(mag.size, bool)
  sel[idx] = True
  assert mag[sel].min() >= mag[~sel].max()  # the k largest (the released reference picks the smallest)
  assert mag[sel].sum() > mag[np.argsort(mag)[:k]].sum()


def test_frozen_entries_bit_identical_and_compact_state():
  rng = np.random.default_rng(2)
  params = {"mlp": {"kernel": jnp.asarray(rng.normal(size=(16, 24)).astype(np.float32))},
            "norm": {"scale": jnp.ones(16)}}
  tx = lift(0.01, lora_rank=1, filter_rank=2, update_gap=1000, freeze_others=True)
  state = tx.init(params)
  idx = np.asarray(jax.tree.leaves(_inner(state).idx)[0])
  p = params
  step = jax.jit(tx.update)
  for it in range(4):
    u, state = step(jax.tree.map(lambda x: jnp.cos(x + it), p), state, p)
    p = optax.apply_updates(p, u)
  before = np.asarray(params["mlp"]["kernel"]).reshape(-1)
  after = np.asarray(p["mlp"]["kernel"]).reshape(-1)
  frozen = np.ones(before.size, bool)
  frozen[idx] = False
  assert (before[frozen] == after[frozen]).all() and (before[~frozen] != after[~frozen]).all()
  assert (np.asarray(p["norm"]["scale"]) == 1.0).all()
  k = (16 + 24) * 1
  s = state_size(tx, params)
  assert s.moment_elements == 2 * k and s.elements == 3 * k + 1  # mu, nu, int32 idx, count


def test_remap_moments_carries_retained_entries():
  old = jnp.array([1, 4, 7, 9], jnp.int32)
  new = jnp.array([0, 4, 9, 11], jnp.int32)
  m = jnp.array([10.0, 40.0, 70.0, 90.0])
  np.testing.assert_array_equal(np.asarray(remap_moments(old, new, m)), [0.0, 40.0, 90.0, 0.0])


def test_moments_survive_refresh_in_state():
  rng = np.random.default_rng(3)
  params = {"mlp": {"kernel": jnp.asarray(rng.normal(size=(10, 10)).astype(np.float32))}}
  tx = lift(1e-3, lora_rank=2, filter_rank=3, update_gap=3)
  st = tx.init(params)
  p = params
  for it in range(2):  # the refresh happens before the update with count 2
    u, st = tx.update(jax.tree.map(lambda x: x + 1.0, p), st, p)
    p = optax.apply_updates(p, u)
  old_idx = np.asarray(jax.tree.leaves(_inner(st).idx)[0])
  old_mu = np.asarray(jax.tree.leaves(_inner(st).mu)[0])
  g = jax.tree.map(lambda x: x + 1.0, p)
  _, st2 = tx.update(g, st, p)
  new_idx = np.asarray(jax.tree.leaves(_inner(st2).idx)[0])
  new_mu = np.asarray(jax.tree.leaves(_inner(st2).mu)[0])
  gflat = np.asarray(g["mlp"]["kernel"]).reshape(-1)
  for j, i in enumerate(new_idx):
    prev = old_mu[list(old_idx).index(i)] if i in old_idx else 0.0
    assert new_mu[j] == pytest.approx(0.9 * prev + 0.1 * gflat[i], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kwargs", [dict(lora_rank=0), dict(filter_rank=0), dict(update_gap=0), dict(b2=1.0),
                                    dict(weight_decay=-1.0)])
def test_bad_hyperparameters(kwargs):
  with pytest.raises(ValueError):
    lift(0.01, **kwargs)


def test_filter_rank_too_large_and_missing_params():
  with pytest.raises(ValueError, match="filter_rank"):
    lift(0.01, filter_rank=9).init({"mlp": {"kernel": jnp.ones((8, 16))}})
  tx = lift(0.01, lora_rank=1, filter_rank=2)
  params = {"mlp": {"kernel": jnp.ones((8, 16))}}
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))


def test_inject_hyperparams():
  params = {"mlp": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32))}}
  tx = optax.inject_hyperparams(lift, static_args=("lora_rank", "filter_rank", "update_gap"))(
      learning_rate=0.01, lora_rank=1, filter_rank=2, weight_decay=0.1)
  st = tx.init(params)
  u, st = jax.jit(tx.update)(params, st, params)
  assert int(jnp.sum(u["mlp"]["kernel"] != 0)) == 16


def test_defaults_are_the_documented_reference_values():
  """docs/lift.md: lora_rank 128, filter_rank 64, update_gap 400, betas (0.9, 0.95), eps 1e-6, weight decay 0 — in
  lift and in scale_by_lift used on its own (its own defaults are not reached through lift)."""
  import inspect
  from optim.lift import scale_by_lift
  doc = dict(lora_rank=128, filter_rank=64, update_gap=400, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.0)
  for fn in (lift, scale_by_lift):
    params = inspect.signature(fn).parameters
    assert {k: params[k].default for k in doc} == doc, fn.__name__
