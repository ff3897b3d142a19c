"""SAF trajectory loss (per-example store) and MESA (EMA teacher), arXiv 2205.14083, against numpy loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax import sharding
from train import objectives
from train.objectives import saf


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max()
  return z - m - math.log(np.exp(z - m).sum())


def np_kl_full(teacher, student, tau):
  """KL(softmax(teacher/τ) ‖ softmax(student/τ)) per position, one loop over positions."""
  b, t, v = teacher.shape
  out = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      lp, lq = np_log_softmax(teacher[i, j] / tau), np_log_softmax(student[i, j] / tau)
      out[i, j] = sum(math.exp(lp[c]) * (lp[c] - lq[c]) for c in range(v))
  return out


def np_kl_topk(past, student, tau, k):
  """KL on the partition {top-k ids of the past output, rest}, one loop over positions."""
  b, t, v = past.shape
  out = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      lp, lq = np_log_softmax(past[i, j] / tau), np_log_softmax(student[i, j] / tau)
      top = np.argsort(-past[i, j], kind="stable")[:k]
      p, q = np.exp(lp), np.exp(lq)
      parts = [(p[c], q[c]) for c in top]
      rest = [c for c in range(v) if c not in set(top)]
      if rest:
        parts.append((p[rest].sum(), q[rest].sum()))
      out[i, j] = sum(a * math.log(a / c) for a, c in parts if a > 0)
  return out


def np_grad_topk(past, student, tau, k):
  """d/dz [τ²·KL_k] per position, derived by hand: τ·(q − p̃), q = softmax(z/τ), p̃_c = p_c on the stored top-k
  ids and p_rest·q_c/q_rest on the tail (the target's tail mass spread like the student's). With k = V it is the
  full-KL gradient τ·(q − p)."""
  b, t, v = past.shape
  out = np.zeros((b, t, v))
  for i in range(b):
    for j in range(t):
      p, q = np.exp(np_log_softmax(past[i, j] / tau)), np.exp(np_log_softmax(student[i, j] / tau))
      top = np.argsort(-past[i, j], kind="stable")[:k]
      rest = np.setdiff1d(np.arange(v), top)
      target = np.zeros(v)
      target[top] = p[top]
      if len(rest):
        target[rest] = p[rest].sum() * q[rest] / q[rest].sum()
      out[i, j] = tau * (q - target)
  return out


def np_fd_positions(fun, z, h=1e-5):
  """Central differences of a per-position numpy function fun(z [B, T, V]) -> [B, T], all positions at once."""
  g = np.zeros(z.shape)
  for c in range(z.shape[-1]):
    zp, zm = z.astype(np.float64), z.astype(np.float64)
    zp[..., c] += h
    zm[..., c] -= h
    g[..., c] = (fun(zp) - fun(zm)) / (2 * h)
  return g


def _rand(shape, seed, scale=3.0):
  return np.random.default_rng(seed).normal(0.0, scale, shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------- KL terms

def test_kl_full_matches_numpy_and_gradient():
  t, s = _rand((2, 3, 11), 0), _rand((2, 3, 11), 1)
  np.testing.assert_allclose(np.asarray(saf.kl_full(jnp.asarray(t), jnp.asarray(s), 5.0)),
                             np_kl_full(t, s, 5.0), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(saf.kl_full(jnp.asarray(t), jnp.asarray(t), 5.0)), 0.0, atol=1e-6)
  # d/dz_s [τ²·KL(p ‖ softmax(z_s/τ))] = τ·(q − p); the teacher receives no gradient.
  gt, gs = jax.grad(lambda a, b: 25.0 * jnp.sum(saf.kl_full(a, b, 5.0)), argnums=(0, 1))(jnp.asarray(t),
                                                                                         jnp.asarray(s))
  p = np.exp(np.apply_along_axis(np_log_softmax, -1, t / 5.0))
  q = np.exp(np.apply_along_axis(np_log_softmax, -1, s / 5.0))
  np.testing.assert_allclose(np.asarray(gs), 5.0 * (q - p), rtol=1e-4, atol=1e-6)
  assert not np.asarray(gt).any()


@pytest.mark.parametrize("k", [1, 3, 11])
def test_topk_kl_matches_numpy_and_bounds_full_kl(k):
  past, cur = _rand((2, 4, 11), 2), _rand((2, 4, 11), 3)
  logp, ids = saf.topk_targets(jnp.asarray(past), 5.0, k)
  assert logp.shape == (2, 4, k + 1) and ids.shape == (2, 4, k)
  np.testing.assert_allclose(np.exp(np.asarray(logp, np.float64)).sum(-1), 1.0, rtol=1e-5)
  got = np.asarray(saf.kl_topk(logp, ids, jnp.asarray(cur), 5.0))
  np.testing.assert_allclose(got, np_kl_topk(past, cur, 5.0, k), rtol=2e-4, atol=1e-6)
  full = np_kl_full(past, cur, 5.0)
  assert (got <= full + 1e-5).all()
  if k == 11:  # every token stored: the exact KL
    np.testing.assert_allclose(got, full, rtol=2e-4, atol=1e-6)
  # finite gradient even when the stored tail is empty (k = V), and none into the stored target
  g = jax.grad(lambda z: jnp.sum(saf.kl_topk(logp, ids, z, 5.0)))(jnp.asarray(cur))
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


@pytest.mark.parametrize("k", [1, pytest.param(4, marks=pytest.mark.slow), 11])
def test_kl_gradients_match_numpy_oracle(k):
  # d/dz_student [τ²·KL] of the stored top-k (+ tail mass) target and of the full KL vs the hand-derived numpy
  # gradient, which is itself checked against finite differences of the numpy KL loops (float64).
  tau = 2.0
  past, cur = _rand((2, 2, 11), 20), _rand((2, 2, 11), 21)
  want = np_grad_topk(past, cur, tau, k)
  fd = tau ** 2 * np_fd_positions(lambda z: np_kl_topk(past, z, tau, k), cur)
  np.testing.assert_allclose(want, fd, rtol=1e-5, atol=1e-8)
  logp, ids = saf.topk_targets(jnp.asarray(past), tau, k)
  g_top = jax.jit(jax.grad(lambda z: tau ** 2 * jnp.sum(saf.kl_topk(logp, ids, z, tau))))(jnp.asarray(cur))
  np.testing.assert_allclose(np.asarray(g_top), want, rtol=1e-4, atol=2e-6)
  # no gradient into the stored target
  g_lp = jax.grad(lambda lp: jnp.sum(saf.kl_topk(lp, ids, jnp.asarray(cur), tau)))(logp)
  assert not np.asarray(g_lp).any()
  if k == 11:  # full KL: τ·(q − p), also against finite differences of the numpy loop
    fd_full = tau ** 2 * np_fd_positions(lambda z: np_kl_full(past, z, tau), cur)
    np.testing.assert_allclose(want, fd_full, rtol=1e-5, atol=1e-8)
    g_full = jax.grad(lambda z: tau ** 2 * jnp.sum(saf.kl_full(jnp.asarray(past), z, tau)))(jnp.asarray(cur))
    np.testing.assert_allclose(np.asarray(g_full), want, rtol=1e-4, atol=2e-6)


def test_topk_extreme_logits_and_bad_input():
  past = np.zeros((1, 2, 6), np.float32)
  past[0, 0, 2] = 1e4           # all mass on one token: tail ~ 0
  logp, ids = saf.topk_targets(jnp.asarray(past), 1.0, 2)
  assert np.isfinite(np.asarray(logp)).all()
  kl = saf.kl_topk(logp, ids, jnp.asarray(past), 1.0)
  np.testing.assert_allclose(np.asarray(kl), 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="saf.topk=7"):
    saf.topk_targets(jnp.asarray(past), 1.0, 7)
  with pytest.raises(ValueError, match="tau=0"):
    saf.kl_full(jnp.asarray(past), jnp.asarray(past), 0)
  with pytest.raises(ValueError, match="3 dims"):
    saf.kl_full(jnp.zeros((2, 6)), jnp.zeros((2, 6)), 1.0)


# --------------------------------------------------------------------------------------------- the store

def _epochs(n, batch, num_epochs, seed=0):
  """The pipeline's visiting order: one permutation per epoch, batches of `batch`, remainder skipped."""
  out = []
  for e in range(num_epochs):
    perm = np.random.default_rng([seed, e]).permutation(n)
    out += [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]
  return out


def _run_store(store, batches, outputs, put=lambda x: x, on_mesh=None):
  """Reads then writes each batch; returns the (logp, has) read at every step."""
  read = jax.jit(saf.store_read)
  write = jax.jit(saf.store_write, donate_argnums=0)
  seen = []
  for step, ids in enumerate(batches):
    ids = put(jnp.asarray(ids, jnp.int32))
    logp, _, has = read(store, ids)
    seen.append((np.asarray(logp), np.asarray(has)))
    lp, tok = outputs(step, np.asarray(ids))
    store = write(store, ids, put(jnp.asarray(lp)), put(jnp.asarray(tok)))
  return store, seen


def _outputs(step, ids, t=3, k=2):
  """A distinct, recognisable output per (step, example)."""
  lp = (np.asarray(ids, np.float32)[:, None, None] * 100 + step + np.zeros((1, t, k + 1), np.float32))
  return -lp, np.broadcast_to(np.arange(k, dtype=np.int32), (len(ids), t, k)) + (np.asarray(ids)[:, None, None] % 5)


@pytest.mark.parametrize("epochs_back", [1, 2, 3])
def test_store_returns_output_from_e_visits_earlier(epochs_back):
  n, batch = 10, 4  # 2 batches per epoch: examples 8, 9 of each permutation are skipped
  batches = _epochs(n, batch, 6)
  store = saf.store_init(num_examples=n, epochs_back=epochs_back, seq_len=3, topk=2, vocab_size=7,
                         store_dtype="float32")
  store, seen = _run_store(store, batches, _outputs)
  history = {}  # numpy oracle: example id -> list of (step) of its past visits
  for step, ids in enumerate(batches):
    for row, i in enumerate(ids):
      past = history.setdefault(int(i), [])
      logp, has = seen[step]
      assert has[row] == (len(past) >= epochs_back)
      if has[row]:
        np.testing.assert_array_equal(logp[row], _outputs(past[-epochs_back], [i])[0][0])
      past.append(step)
  counts = np.asarray(store["count"])
  assert [counts[i] for i in range(n)] == [len(history.get(i, [])) for i in range(n)]


def test_store_on_eight_devices_and_device_change_equal_one_device():
  n, batch = 40, 8
  batches = _epochs(n, batch, 4, seed=1)
  kw = dict(num_examples=n, epochs_back=2, seq_len=3, topk=2, vocab_size=300, store_dtype="float32")
  one, seen1 = _run_store(saf.store_init(**kw), batches, _outputs)

  mesh = sharding.make_mesh(2, 4, 1)
  with jax.set_mesh(mesh):
    store8 = saf.store_init(**kw)
    assert store8["logp"].sharding.spec[0] == ("data", "fsdp")
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
    eight, seen8 = _run_store(store8, batches, _outputs, put)
  for (a, ha), (b, hb) in zip(seen1, seen8):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ha, hb)
  for key in one:
    np.testing.assert_array_equal(np.asarray(one[key]), np.asarray(eight[key]))

  # the store's shape does not depend on the mesh (a checkpoint restores on any device count)
  shapes = lambda st: {k: v.shape for k, v in st.items()}
  kw100 = dict(kw, num_examples=100)
  with jax.set_mesh(sharding.make_mesh(6, 1, 1, devices=jax.devices()[:6])):
    six = saf.store_init(**kw100)  # 6 does not divide the 1024 rows: replicated
    assert six["logp"].sharding.spec == jax.P()
  with jax.set_mesh(mesh):
    sharded = saf.store_init(**kw100)
    assert sharded["logp"].sharding.spec[0] == ("data", "fsdp")
  assert shapes(saf.store_init(**kw100)) == shapes(sharded) == shapes(six)
  assert six["count"].shape == (saf.ROW_MULTIPLE,)

  # change of device count mid-run (what a resume on another mesh does): 2 epochs on 8 devices, then 1 device
  with jax.set_mesh(mesh):
    half, _ = _run_store(saf.store_init(**kw), batches[:10], _outputs, put)
  half = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), half)
  rest, seen_rest = _run_store(half, batches[10:], lambda s, i: _outputs(s + 10, i))
  for (a, ha), (b, hb) in zip(seen1[10:], seen_rest):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ha, hb)
  assert seen_rest[-1][1].all()  # by then every example has targets


def test_store_bf16_out_of_range_ids_and_memory():
  store = saf.store_init(num_examples=4, epochs_back=1, seq_len=2, topk=3, vocab_size=70000)
  assert store["logp"].dtype == jnp.bfloat16 and store["ids"].dtype == jnp.int32
  ids = jnp.array([0, 3, 4, -1])
  lp = jnp.full((4, 2, 4), -1.2345)
  tok = jnp.full((4, 2, 3), 69999)
  store = saf.store_write(store, ids, lp, tok)
  np.testing.assert_array_equal(np.asarray(store["count"])[:4], [1, 0, 0, 1])
  assert int(store["count"].sum()) == 2  # ids 4 and -1 are outside [0, N=4): not written (nor wrapped)
  logp, tk, has = saf.store_read(store, ids)
  np.testing.assert_array_equal(np.asarray(has), [True, True, False, False])
  np.testing.assert_allclose(np.asarray(logp[:2]), -1.2345, rtol=1e-2)
  assert int(tk[0, 0, 0]) == 69999
  assert saf.id_dtype(32000) == jnp.uint16
  # 3 slots x 256 positions x (9 bf16 + 8 uint16) + int32 counter
  assert saf.store_bytes_per_example(seq_len=256, topk=8, epochs_back=3, vocab_size=32000) == 3 * 256 * 34 + 4
  with pytest.raises(ValueError, match="num_train_examples=0"):
    saf.store_init(num_examples=0, epochs_back=1, seq_len=2, topk=3, vocab_size=10)
  with pytest.raises(ValueError, match="store_dtype"):
    saf.store_init(num_examples=2, epochs_back=1, seq_len=2, topk=3, vocab_size=10, store_dtype="int8")


# ------------------------------------------------------------------------------ SAF through objectives.apply

def _saf_cfg(**kw):
  c = objectives.default_objectives_config()
  c.saf.enabled = True
  c.saf.update(dict(store_dtype="float32", epochs_back=1, topk=4, **kw))
  return c


def test_saf_apply_loss_and_post_update_match_numpy():
  b, t, v = 3, 4, 9
  cfg = _saf_cfg(lam=0.3, tau=5.0)
  state = objectives.init_state(cfg, {}, num_train_examples=6, seq_len=t, vocab_size=v)
  past, cur = _rand((b, t, v), 4), _rand((b, t, v), 5)
  ids = jnp.array([5, 0, 2])
  per_token = jnp.asarray(_rand((b, t), 6, 1.0) ** 2)
  mask = jnp.ones((b, t))
  call = lambda lg, st, step: objectives.apply(cfg, per_token_loss=per_token, mask=mask, logits=lg, ids=ids,
                                               step=jnp.int32(step), obj_state=st, forward=None)
  loss, upd, met = call(jnp.asarray(past), state, 0)  # first visit: no target yet
  assert float(loss) == float(jnp.mean(per_token)) and float(met["saf_hit_frac"]) == 0.0
  state = objectives.post_update(cfg, state, upd, None, 0)
  loss, upd, met = call(jnp.asarray(cur), state, 1)
  expect = float(np.mean(per_token)) + 0.3 * 25.0 * np_kl_topk(past, cur, 5.0, 4).mean()
  np.testing.assert_allclose(float(loss), expect, rtol=1e-4)
  assert float(met["saf_hit_frac"]) == 1.0 and float(met["saf_active"]) == 1.0
  np.testing.assert_allclose(float(met["saf_kl"]), np_kl_topk(past, cur, 5.0, 4).mean(), rtol=1e-4)
  # before start_step the stored target is ignored (but the store still fills)
  cfg.saf.start_step = 5
  loss, _, met = call(jnp.asarray(cur), state, 1)
  assert float(loss) == float(jnp.mean(per_token)) and float(met["saf_active"]) == 0.0
  # jit + grad: the gradient w.r.t. the logits is λτ²·τ(q − p̃)/(B·T) on the stored partition
  cfg.saf.start_step = 0
  g = jax.jit(jax.grad(lambda lg: call(lg, state, 1)[0]))(jnp.asarray(cur))
  np.testing.assert_allclose(np.asarray(g), 0.3 * np_grad_topk(past, cur, 5.0, 4) / (b * t), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------------ MESA

def _mesa_cfg(**kw):
  c = objectives.default_objectives_config()
  c.mesa.enabled = True
  c.mesa.update(kw)
  return c


def _toy_forward(x):
  return lambda p: jnp.einsum("btd,dv->btv", x, p["w"]) + p["b"]


def test_mesa_ema_update_matches_numpy():
  cfg = _mesa_cfg(decay=0.9)
  p0 = {"w": jnp.asarray(_rand((3, 5), 7)), "b": jnp.asarray(_rand((5,), 8))}
  state = objectives.init_state(cfg, p0, num_train_examples=0, seq_len=2, vocab_size=5)
  np.testing.assert_array_equal(np.asarray(state["ema"]["w"]), np.asarray(p0["w"]))
  ema = {k: np.asarray(v, np.float64) for k, v in p0.items()}
  params = p0
  for step in range(4):
    params = jax.tree.map(lambda x: x + 0.5 * (step + 1), params)
    state = jax.jit(lambda s, p: objectives.post_update(cfg, s, {}, p, step))(state, params)
    ema = {k: 0.9 * ema[k] + 0.1 * np.asarray(params[k], np.float64) for k in ema}
  for k in ema:
    np.testing.assert_allclose(np.asarray(state["ema"][k]), ema[k], rtol=1e-6, atol=1e-6)
  # bf16 parameters: the EMA is kept in float32
  st = objectives.init_state(cfg, {"w": jnp.ones(3, jnp.bfloat16)}, num_train_examples=0, seq_len=2, vocab_size=5)
  assert st["ema"]["w"].dtype == jnp.float32


def test_mesa_apply_kl_against_ema_teacher():
  b, t, d, v = 2, 3, 4, 6
  x = jnp.asarray(_rand((b, t, d), 9, 1.0))
  student = {"w": jnp.asarray(_rand((d, v), 10)), "b": jnp.zeros(v)}
  teacher = {"w": jnp.asarray(_rand((d, v), 11)), "b": jnp.asarray(_rand((v,), 12))}
  forward = _toy_forward(x)
  per_token = jnp.asarray(_rand((b, t), 13, 1.0) ** 2)
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  cfg = _mesa_cfg(lam=0.8, tau=5.0, start_step=3)

  def loss_of(p, step):
    return objectives.apply(cfg, per_token_loss=per_token, mask=mask, logits=forward(p), ids=jnp.arange(b),
                            step=jnp.int32(step), obj_state={"ema": teacher}, forward=forward)

  loss, upd, met = jax.jit(loss_of)(student, 3)
  kl = np_kl_full(np.asarray(forward(teacher)), np.asarray(forward(student)), 5.0)
  m = np.asarray(mask)
  expect = (np.asarray(per_token) * m).sum() / m.sum() + 0.8 * 25.0 * (kl * m).sum() / m.sum()
  np.testing.assert_allclose(float(loss), expect, rtol=1e-5)
  np.testing.assert_allclose(float(met["mesa_kl"]), (kl * m).sum() / m.sum(), rtol=1e-5)
  assert upd == {}
  loss0, _, met0 = loss_of(student, 2)  # before start_step: plain CE
  assert float(loss0) == float((per_token * mask).sum() / mask.sum()) and float(met0["mesa_active"]) == 0.0
  # gradient flows into the student only (the teacher is the EMA state, a constant)
  g_student = jax.grad(lambda p: loss_of(p, 3)[0])(student)
  g_teacher = jax.grad(lambda tp: objectives.apply(
      cfg, per_token_loss=per_token, mask=mask, logits=forward(student), ids=jnp.arange(b), step=jnp.int32(3),
      obj_state={"ema": tp}, forward=forward)[0])(teacher)
  # values: d/dlogits = λ·τ·(softmax(z_s/τ) − softmax(z_t/τ))·mask / Σmask, chained through the linear forward
  p_t = np.exp(np.apply_along_axis(np_log_softmax, -1, np.asarray(forward(teacher), np.float64) / 5.0))
  q_s = np.exp(np.apply_along_axis(np_log_softmax, -1, np.asarray(forward(student), np.float64) / 5.0))
  g_logits = 0.8 * 5.0 * (q_s - p_t) * m[..., None] / m.sum()
  np.testing.assert_allclose(np.asarray(g_student["w"]), np.einsum("btd,btv->dv", np.asarray(x), g_logits),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_student["b"]), g_logits.sum((0, 1)), rtol=1e-4, atol=1e-7)
  assert not any(np.asarray(l).any() for l in jax.tree.leaves(g_teacher))
  # same teacher as student: KL 0
  same, _, _ = objectives.apply(cfg, per_token_loss=per_token, mask=mask, logits=forward(student),
                                ids=jnp.arange(b), step=jnp.int32(5), obj_state={"ema": student}, forward=forward)
  np.testing.assert_allclose(float(same), float((per_token * mask).sum() / mask.sum()), rtol=1e-6)


def test_saf_on_synthetic_data_is_refused_at_config_time():
  """SAF's store is indexed by example id; synthetic batches have none, so the config check names both fields."""
  from train import state
  from train.configs.base import base_config
  c = base_config()
  c.data.source = "synthetic"
  state.validate_config(c)                       # SAF off: fine
  c.objectives.saf.enabled = True
  with pytest.raises(ValueError, match=r"^objectives.saf.enabled=True .* data.source='synthetic' has none"):
    state.validate_config(c)
