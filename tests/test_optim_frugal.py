"""FRUGAL against numpy transcriptions of the reference update rule (fzmushko/FRUGAL, torch layout [out, in])."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim import frugal, scale_by_frugal, state_size
from optim.projection import default_label_fn


def np_adam_dir(m, v, t, b1, b2, eps):
  # frugal/adamw.py: lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
  return (m / (1 - b1 ** t)) / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps)


def np_frugal_svd(w_t, targets_t, noises_t, steps, rho, gap, lr, b1, b2, eps, wd, s_proj, s_inact, rule):
  """GaloreAdamW(proj_type='svd', proj_side='std', reset_statistics=True) on one torch-layout matrix.

  Gradient of 0.5||W - target||^2 plus a fixed noise sequence, so the gradients depend on the trajectory.
  """
  w = w_t.astype(np.float64).copy()
  m_, n_ = w.shape
  side = "right" if m_ >= n_ else "left"
  r = round((n_ if side == "right" else m_) * rho)
  for k in range(steps):
    g = w - targets_t + noises_t[k]
    if k % gap == 0:
      u, _, vh = np.linalg.svd(g, full_matrices=False)
      basis = vh[:r] if side == "right" else u[:, :r]
      low_shape = (m_, r) if side == "right" else (r, n_)
      mom, vel, step = np.zeros(low_shape), np.zeros(low_shape), 0
    w = w * (1 - lr * wd)
    step += 1
    low = g @ basis.T if side == "right" else basis.T @ g
    mom = b1 * mom + (1 - b1) * low
    vel = b2 * vel + (1 - b2) * low ** 2
    upd_low = -lr * s_proj * np_adam_dir(mom, vel, step, b1, b2, eps)
    up = upd_low @ basis if side == "right" else basis @ upd_low
    back = low @ basis if side == "right" else basis @ low
    resid = g - back
    if rule == "sign_sgd":
      up = up - lr * s_proj * s_inact * np.sign(resid)
    elif rule == "sgd":
      up = up - lr * s_proj * s_inact * resid
    w = w + up
  return w


def run_jax(tx, params, grad_fn, steps, jit=True):
  state = tx.init(params)
  upd = jax.jit(tx.update) if jit else tx.update
  for k in range(steps):
    u, state = upd(grad_fn(params, k), state, params)
    params = optax.apply_updates(params, u)
  return params, state


def make_problem(shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  w0 = rng.normal(size=shape).astype(np.float32)
  target = rng.normal(size=shape).astype(np.float32)
  noise = (0.5 * rng.normal(size=(steps,) + shape)).astype(np.float32)
  return w0, target, noise


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (8, 8)])
@pytest.mark.parametrize("rule,rho", [("sign_sgd", 0.25), ("sgd", 0.5), ("no", 0.375)])
def test_svd_matches_reference_transcription(shape, rule, rho):
  steps, gap = 10, 3  # refreshes at steps 0, 3, 6, 9
  lr, b1, b2, eps, wd, s_proj, s_inact = 0.05, 0.9, 0.999, 1e-8, 0.1, 0.7, 0.5
  w0, target, noise = make_problem(shape, steps)
  params = {"layers": {"mlp": {"kernel": jnp.asarray(w0)}}}
  tx = frugal(lr, rho=rho, update_gap=gap, proj_type="svd", b1=b1, b2=b2, eps=eps, weight_decay=wd,
              inactive_update_rule=rule, proj_lr_scale=s_proj, inactive_lr_scale=s_inact)
  grad_fn = lambda p, k: {"layers": {"mlp": {"kernel": p["layers"]["mlp"]["kernel"] - target + noise[k]}}}
  out, _ = run_jax(tx, params, grad_fn, steps)
  # JAX kernel [d_in, d_out] is the transpose of the torch weight [out, in].
  ref = np_frugal_svd(w0.T, target.T, noise.transpose(0, 2, 1), steps, rho, gap, lr, b1, b2, eps, wd, s_proj,
                      s_inact, rule)
  np.testing.assert_allclose(np.asarray(out["layers"]["mlp"]["kernel"]), ref.T, rtol=2e-4, atol=2e-5)


def np_coord_oracle(g_seq_fn, w0, idx_seq, kind, steps, gap, lr, b1, b2, eps):
  """CoordAdamW update rule with the indices the implementation drew (randomness is not reproducible)."""
  w = w0.astype(np.float64).copy()
  for k in range(steps):
    g = g_seq_fn(w, k)
    idx = idx_seq[k]
    if k % gap == 0:
      mom = np.zeros(len(idx) * (1 if kind == "randk" else (w.shape[1] if kind == "columns" else w.shape[0])))
      vel, t = np.zeros_like(mom), 0
    sel = np.zeros(w.shape, bool)
    if kind == "randk":
      sel.reshape(-1)[idx] = True
    elif kind == "columns":  # torch columns = input features = rows of the JAX kernel
      sel[idx, :] = True
    else:
      sel[:, idx] = True
    t += 1
    low = g[sel]
    mom = b1 * mom + (1 - b1) * low
    vel = b2 * vel + (1 - b2) * low ** 2
    upd = np.where(sel, 0.0, -lr * np.sign(g))
    upd[sel] = -lr * np_adam_dir(mom, vel, t, b1, b2, eps)
    w = w + upd
  return w


@pytest.mark.parametrize("kind,expected_k", [("randk", int(10 * 6 * 0.3)), ("columns", int(10 * 0.3)),
                                             ("rows", int(6 * 0.3))])
def test_coordinate_modes(kind, expected_k):
  steps, gap, lr, b1, b2, eps = 7, 3, 0.05, 0.9, 0.99, 1e-8
  shape = (10, 6)
  w0, target, noise = make_problem(shape, steps, seed=1)
  tx = optax.chain(scale_by_frugal(rho=0.3, update_gap=gap, proj_type=kind, b1=b1, b2=b2, eps=eps, seed=3),
                   optax.scale(-lr))
  state = tx.init(jnp.asarray(w0))
  upd = jax.jit(tx.update)
  w = jnp.asarray(w0)
  idx_seq = []
  for k in range(steps):
    u, state = upd(w - target + noise[k], state)
    idx = np.asarray(state[0].proj)
    assert idx.shape == (expected_k,) and len(set(idx.tolist())) == expected_k
    idx_seq.append(idx)
    w = w + u
  assert all((idx_seq[k] == idx_seq[k - 1]).all() for k in range(1, steps) if k % gap)
  assert any((idx_seq[k] != idx_seq[k - 1]).any() for k in range(1, steps) if k % gap == 0)
  ref = np_coord_oracle(lambda ww, k: ww - target + noise[k], w0, idx_seq, kind, steps, gap, lr, b1, b2, eps)
  np.testing.assert_allclose(np.asarray(w), ref, rtol=2e-4, atol=2e-5)


def mini_llama(n_layers=4, d=8, ff=12, seed=0):
  rng = np.random.default_rng(seed)
  mat = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  layers = {}
  for i in range(n_layers):
    layers[i] = {"attn": {n: {"kernel": mat(d, d)} for n in ("q", "k", "v", "o")},
                 "mlp": {"gate": {"kernel": mat(d, ff)}, "up": {"kernel": mat(d, ff)}, "down": {"kernel": mat(ff, d)}},
                 "attn_norm": {"scale": jnp.ones(d)}}
  return {"embed": {"embedding": mat(20, d)}, "layers": layers, "lm_head": {"kernel": mat(d, 20)}}


def torch_order(params):
  """(layer, kind, name) in the reference module order: q, k, v, o, gate, up, down per layer."""
  out = []
  for i in sorted(params["layers"]):
    out += [(i, "attn", n) for n in ("q", "k", "v", "o")] + [(i, "mlp", n) for n in ("gate", "up", "down")]
  return out


def ref_block_selection(n, rho, order, refreshes):
  """Plain-Python transcription of BlockOptimizer._update_states (fzmushko/FRUGAL): active indices per refresh."""
  k = round(n * rho)
  if order == "mirror":
    assert k % 2 == 0
  start = {"descending": n - 1, "ascending": 0, "mirror": 0}[order]
  out = []
  for _ in range(refreshes):
    if order == "ascending":
      act = [i % n for i in range(start, start + k)]
      start += k
      if start >= n:
        start -= n
    elif order == "descending":
      act = [i % n for i in range(start, start - k, -1)]
      start -= k
      if start < 0:
        start += n
    else:
      h = n // 2
      act = []
      for i in range(start, start + k // 2):
        act += [i % h, n - 1 - i % h]
      start += k // 2
      if start >= h:
        start -= h
    out.append(sorted(act))
  return out


def observed_active_sets(tx, params, refreshes, order_keys):
  """Active matrices per refresh seen from the outside: update_gap=1, inactive rule 'no' => only they move."""
  state = tx.init(params)
  upd = jax.jit(tx.update)
  rng = np.random.default_rng(7)
  out = []
  for _ in range(refreshes):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params)
    u, state = upd(g, state, params)
    out.append([j for j, key in enumerate(order_keys) if float(jnp.abs(key(u)).max()) > 0])
  return out


def test_mirror_selection_matches_reference_llama_56():
  params = mini_llama(n_layers=8)  # 56 matrices in the reference's module order, three shape groups
  order = torch_order(params)
  keys = [lambda t, key=key: t["layers"][key[0]][key[1]][key[2]]["kernel"] for key in order]
  tx = scale_by_frugal(rho=0.25, update_gap=1, proj_type="blockwise", block_order="mirror",
                       inactive_update_rule="no")
  matrices = {"layers": {i: {"attn": lay["attn"], "mlp": lay["mlp"]} for i, lay in params["layers"].items()}}
  got = observed_active_sets(tx, matrices, 10, keys)
  ref = ref_block_selection(56, 0.25, "mirror", 10)
  assert ref[0] == list(range(7)) + list(range(49, 56))  # layers 0 and 7, then 1 and 6, ...
  assert got == ref


@pytest.mark.parametrize("n,rho", [(13, 0.3), (10, 0.4), (12, 0.5), (6, 1.0), (9, 0.25)])
def test_mirror_selection_matches_reference_one_group(n, rho):
  params = {f"w{i:02d}": jnp.ones((3, 2)) for i in range(n)}  # one shape group, flatten order = index order
  keys = [lambda t, i=i: t[f"w{i:02d}"] for i in range(n)]
  tx = scale_by_frugal(rho=rho, update_gap=1, proj_type="blockwise", block_order="mirror",
                       inactive_update_rule="no")
  got = observed_active_sets(tx, params, 10, keys)
  ref = ref_block_selection(n, rho, "mirror", 10)
  assert got == ref
  if n % 2:
    assert all(n // 2 not in act for act in got)  # the middle matrix of an odd stack is never state-full


@pytest.mark.parametrize("n,rho", [(7, 1.0), (12, 0.25), (5, 0.2)])
def test_mirror_odd_active_count_raises(n, rho):
  tx = frugal(0.01, rho=rho, proj_type="blockwise", block_order="mirror")
  with pytest.raises(ValueError, match="mirror"):
    tx.init({f"w{i}": {"kernel": jnp.ones((3, 2))} for i in range(n)})


@pytest.mark.parametrize("block_order", ["descending", "ascending", "mirror"])
def test_blockwise_matches_reference(block_order):
  steps, gap, lr, b1, b2, eps, rho = 7, 2, 0.01, 0.9, 0.999, 1e-8, 0.25
  params = mini_llama(n_layers=8)
  rng = np.random.default_rng(5)
  noise = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params)
           for _ in range(steps)]
  grad_fn = lambda p, k: jax.tree.map(lambda a, n: 0.3 * a + n, p, noise[k])
  tx = frugal(lr, rho=rho, update_gap=gap, proj_type="blockwise", block_order=block_order, b1=b1, b2=b2, eps=eps)
  out, _ = run_jax(tx, params, grad_fn, steps)

  # Oracle: BlockAdamW over the global tensor list (reference order), state cleared at every refresh.
  order = torch_order(params)
  ws = {key: np.asarray(params["layers"][key[0]][key[1]][key[2]]["kernel"], np.float64) for key in order}
  selection = ref_block_selection(len(order), rho, block_order, (steps + gap - 1) // gap)
  states = {}
  for k in range(steps):
    if k % gap == 0:
      states = {order[j]: [0.0, 0.0, 0] for j in selection[k // gap]}
    for key in order:
      g = 0.3 * ws[key] + np.asarray(noise[k]["layers"][key[0]][key[1]][key[2]]["kernel"])
      if key in states:
        st = states[key]
        st[2] += 1
        st[0] = b1 * st[0] + (1 - b1) * g
        st[1] = b2 * st[1] + (1 - b2) * g ** 2
        ws[key] = ws[key] - lr * np_adam_dir(st[0], st[1], st[2], b1, b2, eps)
      else:
        ws[key] = ws[key] - lr * np.sign(g)
  for key in order:
    np.testing.assert_allclose(np.asarray(out["layers"][key[0]][key[1]][key[2]]["kernel"]), ws[key],
                               rtol=1e-4, atol=1e-5, err_msg=str(key))
  # Non-matrix leaves (embedding, lm_head, norms) follow plain AdamW.
  ref_other = run_jax(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=0.0), params, grad_fn, steps)[0]
  np.testing.assert_allclose(out["embed"]["embedding"], ref_other["embed"]["embedding"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["lm_head"]["kernel"], ref_other["lm_head"]["kernel"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("proj_type", ["svd", "blockwise", "columns"])
def test_rho_zero_is_sign_sgd_plus_adamw(proj_type):
  params = mini_llama(n_layers=2)
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params) for _ in range(3)]
  tx = frugal(0.01, rho=0.0, update_gap=2, proj_type=proj_type)
  ref = optax.partition({"matrix": optax.sign_sgd(0.01), "other": optax.adamw(0.01, b2=0.999, weight_decay=0.0)},
                        default_label_fn)
  a, sa = params, tx.init(params)
  b, sb = params, ref.init(params)
  for g in grads:
    ua, sa = tx.update(g, sa, a)
    ub, sb = ref.update(g, sb, b)
    a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  assert state_size(tx, params).moment_elements == state_size(ref, params).moment_elements


def test_jit_eager_agree_and_static_shapes():
  params = {"a": {"kernel": jnp.ones((6, 4))}, "b": {"kernel": jnp.ones((6, 4)) * 2}, "c": {"scale": jnp.ones(4)}}
  grad_fn = lambda p, k: jax.tree.map(lambda a: jnp.sin(a * (k + 1) + jnp.arange(a.shape[-1])), p)
  for proj_type in ("random", "blockwise"):
    tx = frugal(0.01, rho=0.5, update_gap=2, proj_type=proj_type, block_order="random")
    a, sa = run_jax(tx, params, grad_fn, 3, jit=True)
    b, sb = run_jax(tx, params, grad_fn, 2, jit=False)
    a = run_jax(tx, params, grad_fn, 2, jit=True)[0]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    shapes0 = jax.tree.map(lambda x: (x.shape, x.dtype), tx.init(params))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), sa) == shapes0


def test_composition_chain_partition_inject_and_nnx_paths():
  from flax import nnx

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(11, 8, rngs=rngs)
      self.layers = nnx.List([nnx.Linear(8, 12, rngs=rngs), nnx.Linear(12, 8, rngs=rngs)])
      self.norm = nnx.RMSNorm(8, rngs=rngs)

  params = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
  labels = jax.tree.leaves(default_label_fn(params))
  assert sorted(labels) == ["matrix", "matrix"] + ["other"] * 4  # 2 kernels; embed, 2 biases, norm scale
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.inject_hyperparams(frugal, static_args=("rho", "update_gap", "seed"))(
                       learning_rate=optax.linear_schedule(0.0, 0.01, 3), rho=0.5))
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 3.0, params)
  step = jax.jit(tx.update)
  for _ in range(3):
    u, state = step(grads, state, params)
    params = optax.apply_updates(params, u)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  assert float(state[1].hyperparams["learning_rate"]) == pytest.approx(0.01 * 2 / 3)  # schedule(2), last step


def test_bf16_params():
  params = {"w": {"kernel": jnp.ones((8, 12), jnp.bfloat16)}, "norm": {"scale": jnp.ones(8, jnp.bfloat16)}}
  tx = frugal(0.01, rho=0.5, update_gap=2)
  state = tx.init(params)
  u, state = jax.jit(tx.update)(jax.tree.map(lambda p: p * 0.5, params), state, params)
  assert u["w"]["kernel"].dtype == jnp.bfloat16
  assert all(x.dtype in (jnp.float32, jnp.int32, jnp.uint32) for x in jax.tree.leaves(state)
             if x.dtype != jnp.bfloat16) and bool(jnp.all(jnp.isfinite(u["w"]["kernel"].astype(jnp.float32))))


@pytest.mark.parametrize("kwargs", [dict(rho=-0.1), dict(rho=1.5), dict(update_gap=0), dict(update_gap=2.5),
                                    dict(proj_type="qr"), dict(inactive_update_rule="same"),
                                    dict(block_order="spiral"), dict(proj_side="up"), dict(b2=1.0),
                                    dict(proj_lr_scale=-1.0)])
def test_bad_hyperparameters(kwargs):
  with pytest.raises(ValueError):
    frugal(0.01, **kwargs)
  frugal(0.01, proj_lr_scale=0.0, inactive_lr_scale=0.0)   # 0 (a frozen part) is allowed


def test_block_cursor_wraps_within_the_stack():
  """The checkpointed cyclic cursor wraps like the reference's next_block_start: it stays in [0, n) ([0, n/2) for
  mirror), so a resumed run continues the same cycle."""
  params = {f"w{i}": jnp.ones((3, 2)) for i in range(6)}
  for order, bound in (("ascending", 6), ("descending", 6), ("mirror", 3)):
    tx = scale_by_frugal(rho=1 / 3, update_gap=1, proj_type="blockwise", block_order=order,
                         inactive_update_rule="no")
    state, upd = tx.init(params), jax.jit(tx.update)
    for _ in range(4):
      _, state = upd(params, state, params)
      (cursor,) = state.next_start
      assert 0 <= int(cursor) < bound, (order, int(cursor))


def test_non_matrix_leaf_labelled_matrix_raises():
  tx = frugal(0.01, label_fn=lambda p: jax.tree.map(lambda _: "matrix", p))
  with pytest.raises(ValueError, match="2-D"):
    tx.init({"b": jnp.ones(3)})
