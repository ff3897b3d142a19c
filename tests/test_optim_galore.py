"""GaLore against a numpy transcription of galore_torch (torch layout [out, in]); projection side pinned."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim import galore, state_size


def np_canonical(vectors_as_columns):
  """Sign convention documented in optim/projection.py: largest-|entry| of each basis vector positive."""
  v = vectors_as_columns.copy()
  for j in range(v.shape[1]):
    if v[np.argmax(np.abs(v[:, j])), j] < 0:
      v[:, j] *= -1
  return v


def np_galore_torch(w_t, grad_fn_t, steps, rank, gap, lr, scale, b1, b2, eps):
  """galore_torch.AdamW + GaLoreProjector(proj_type='std') on one torch weight [out, in]."""
  w = w_t.astype(np.float64).copy()
  m_, n_ = w.shape
  step, basis, mom, vel = 0, None, None, None
  for k in range(steps):
    g = grad_fn_t(w, k)
    right = m_ >= n_  # torch 'std': right projection when out >= in
    if basis is None or step % gap == 0:
      u, _, vh = np.linalg.svd(g, full_matrices=False)
      basis = np_canonical(vh[:rank].T).T if right else np_canonical(u[:, :rank])
    low = g @ basis.T if right else basis.T @ g
    if mom is None:
      mom, vel = np.zeros_like(low), np.zeros_like(low)
    step += 1
    mom = b1 * mom + (1 - b1) * low
    vel = b2 * vel + (1 - b2) * low ** 2
    denom = np.sqrt(vel) + eps
    step_size = lr * np.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    norm = mom / denom
    back = (norm @ basis if right else basis @ norm) * scale
    w = w - step_size * back
  return w


def np_torch_adam(w, grad_fn, steps, lr, b1, b2, eps):
  w = w.astype(np.float64).copy()
  mom, vel = np.zeros_like(w), np.zeros_like(w)
  for k in range(steps):
    g = grad_fn(w, k)
    mom = b1 * mom + (1 - b1) * g
    vel = b2 * vel + (1 - b2) * g ** 2
    w = w - lr * np.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1)) * mom / (np.sqrt(vel) + eps)
  return w


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (8, 8)])
def test_matches_galore_torch_over_refreshes(shape):
  steps, gap, rank, lr, scale, b1, b2, eps = 10, 3, 3, 0.02, 0.25, 0.9, 0.999, 1e-6
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=shape).astype(np.float32)
  bias0 = rng.normal(size=(shape[1],)).astype(np.float32)
  target = rng.normal(size=shape).astype(np.float32)
  noise = (0.5 * rng.normal(size=(steps,) + shape)).astype(np.float32)
  params = {"attn": {"q": {"kernel": jnp.asarray(w0), "bias": jnp.asarray(bias0)}}}
  tx = galore(lr, rank=rank, update_gap=gap, scale=scale, b1=b1, b2=b2, eps=eps)
  state = tx.init(params)
  upd = jax.jit(tx.update)
  p = params
  for k in range(steps):
    q = p["attn"]["q"]
    g = {"attn": {"q": {"kernel": q["kernel"] - target + noise[k], "bias": jnp.tanh(q["bias"]) + k}}}
    u, state = upd(g, state, p)
    p = optax.apply_updates(p, u)
  # torch weight = kernel.T; its gradient is the transpose too.
  ref_w = np_galore_torch(w0.T, lambda w, k: w - target.T + noise[k].T, steps, rank, gap, lr, scale, b1, b2, eps)
  np.testing.assert_allclose(np.asarray(p["attn"]["q"]["kernel"]), ref_w.T, rtol=2e-4, atol=2e-5)
  ref_b = np_torch_adam(bias0, lambda b, k: np.tanh(b) + k, steps, lr, b1, b2, eps)
  np.testing.assert_allclose(np.asarray(p["attn"]["q"]["bias"]), ref_b, rtol=1e-5, atol=1e-5)


def _matrix_moment_shape(tx, params):
  st = tx.init(params)
  inner = st.inner_states["matrix"].inner_state[0]
  return jax.tree.leaves(inner.mu)[0].shape


@pytest.mark.parametrize("shape,expected", [((12, 8), (12, 3)), ((8, 12), (3, 12)), ((8, 8), (3, 8))])
def test_projection_side_matches_torch_and_differs_from_optax_contrib(shape, expected):
  # JAX [d_in, d_out] = torch [out=d_out, in=d_in]ᵀ. torch reduces the smaller side (in when out >= in), so the
  # state is rank x max(d_in, d_out): reduce axis 0 when d_out >= d_in (incl. square), else axis 1.
  params = {"mlp": {"kernel": jnp.ones(shape)}}
  assert _matrix_moment_shape(galore(0.01, rank=3), params) == expected
  # optax.contrib.galore keeps rank x min(m, n): a different (larger-dimension) reduction.
  ox = optax.contrib.galore(0.01, rank=3)
  ost = ox.init(params)
  mus = [x for path, x in jax.tree_util.tree_flatten_with_path(ost)[0]
         if any(getattr(k, "name", None) == "mu" for k in path)]
  assert mus and all(x.size == 3 * min(shape) for x in mus)
  if shape[0] != shape[1]:
    assert 3 * min(shape) != 3 * max(shape)


def test_every_projection_side_reduces_the_torch_axis():
  """galore_torch's proj_type on torch [out, in] = JAX [d_in, d_out]ᵀ: std projects the smaller torch side away
  (in when out >= in), reverse_std the larger, right always in (JAX axis 0), left always out (JAX axis 1)."""
  expected = {(8, 12): {"std": (3, 12), "reverse_std": (8, 3), "right": (3, 12), "left": (8, 3)},
              (12, 8): {"std": (12, 3), "reverse_std": (3, 8), "right": (3, 8), "left": (12, 3)}}
  for shape, sides in expected.items():
    for side, moments in sides.items():
      assert _matrix_moment_shape(galore(0.01, rank=3, proj_side=side), {"k": jnp.ones(shape)}) == moments, side


def test_moments_are_not_reset_at_refresh():
  params = {"mlp": {"kernel": jnp.ones((6, 10))}}
  tx = galore(0.01, rank=2, update_gap=2)
  st = tx.init(params)
  for k in range(3):
    _, st = tx.update({"mlp": {"kernel": jnp.full((6, 10), 1.0 + k) + jnp.eye(6, 10)}}, st, params)
  inner = st.inner_states["matrix"].inner_state[0]
  assert int(inner.inner_count) == 3 and int(inner.count) == 3
  assert float(jnp.abs(jax.tree.leaves(inner.mu)[0]).sum()) > 0


def test_state_size_closed_form():
  d, ff, r = 16, 24, 4
  params = {"q": {"kernel": jax.ShapeDtypeStruct((d, d), jnp.float32)},
            "up": {"kernel": jax.ShapeDtypeStruct((d, ff), jnp.float32)},
            "down": {"kernel": jax.ShapeDtypeStruct((ff, d), jnp.float32)},
            "norm": {"scale": jax.ShapeDtypeStruct((d,), jnp.float32)}}
  s = state_size(galore(0.01, rank=r), params)
  assert s.moment_elements == 2 * (r * d + r * ff + r * ff + d)
  projector = r * d * 3  # every reduced side is d here
  # + int32 count, inner_count, torch-adam count and a uint32[2] PRNG key
  assert s.elements == s.moment_elements + projector + 3 + 2


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(rank=2.5), dict(update_gap=0), dict(scale=-1.0),
                                    dict(proj_side="diag"), dict(b1=1.2)])
def test_bad_hyperparameters(kwargs):
  with pytest.raises(ValueError):
    galore(0.01, **kwargs)


def test_rank_too_large_raises_at_init():
  tx = galore(0.01, rank=9)
  with pytest.raises(ValueError, match="rank 9"):
    tx.init({"mlp": {"kernel": jnp.ones((8, 16))}})
  galore(0.01, rank=8, scale=0.0).init({"mlp": {"kernel": jnp.ones((8, 16))}})   # full rank and scale 0 are valid


def test_default_adam_constants_are_galore_torch_s():
  """b1 = 0.9, b2 = 0.999, eps = 1e-6 in scale_by_galore and scale_by_torch_adam used on their own; gradients of
  size ~eps so that eps shows."""
  from optim.galore import scale_by_galore, scale_by_torch_adam
  rng = np.random.default_rng(3)
  gs = [jnp.asarray(1e-6 * rng.normal(size=(6, 4)).astype(np.float32)) for _ in range(3)]
  mine = scale_by_torch_adam()
  st, m, v = mine.init(gs[0]), 0.0, 0.0
  for t, g in enumerate(gs, 1):
    u, st = jax.jit(mine.update)(g, st)
    gn = np.asarray(g, np.float64)
    m, v = 0.9 * m + 0.1 * gn, 0.999 * v + 0.001 * gn ** 2
    np.testing.assert_allclose(u, np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (np.sqrt(v) + 1e-6), rtol=1e-4)
  ref = dict(b1=0.9, b2=0.999, eps=1e-6)
  for make in (lambda **kw: scale_by_galore(rank=2, update_gap=2, **kw),
               lambda **kw: galore(1.0, rank=2, update_gap=2, **kw)):
    default, explicit = make(), make(**ref)
    sd, se = default.init({"kernel": gs[0]}), explicit.init({"kernel": gs[0]})
    for g in gs:
      ud, sd = jax.jit(default.update)({"kernel": g}, sd, {"kernel": g})
      ue, se = jax.jit(explicit.update)({"kernel": g}, se, {"kernel": g})
      np.testing.assert_array_equal(ud["kernel"], ue["kernel"])


def test_inject_hyperparams_and_chain():
  params = {"mlp": {"kernel": jnp.ones((6, 10)) + jnp.eye(6, 10)}, "norm": {"scale": jnp.ones(6)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.inject_hyperparams(galore, static_args=("rank", "update_gap"))(
                       learning_rate=0.01, rank=2, update_gap=2))
  st = tx.init(params)
  u, st = jax.jit(tx.update)(jax.tree.map(lambda p: p * 2.0, params), st, params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  with pytest.raises(ValueError, match="static"):
    optax.inject_hyperparams(galore)(learning_rate=0.01).init(params)
