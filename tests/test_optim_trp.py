"""TRP against a numpy transcription of the reference training loop (cifar-TRP.py / decompose.py), torch layout."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim import trp, trp_factorize, trp_project_params


def np_energy_rank(s, e):
  total = (s ** 2).sum()
  acc = 0.0
  for i, v in enumerate(s):
    acc += v ** 2
    if acc / total >= e:
      return i + 1
  return len(s)


def torch_matrix(k_jax, scheme):
  """JAX kernel -> torch weight -> the reference's matricisation, and the inverse map."""
  if k_jax.ndim == 2:
    return k_jax.T, lambda m: m.T
  wt = k_jax.transpose(3, 2, 0, 1)  # [kh, kw, C, N] -> torch [N, C, kh, kw]
  n, c, kh, kw = wt.shape
  if scheme == "channel":
    return wt.reshape(n, c * kh * kw), lambda m: m.reshape(n, c, kh, kw).transpose(2, 3, 1, 0)
  mat = wt.transpose(1, 2, 0, 3).reshape(c * kh, n * kw)
  return mat, lambda m: m.reshape(c, kh, n, kw).transpose(2, 0, 1, 3).transpose(2, 3, 1, 0)


def np_low_rank(w, scheme, energy):
  """(T, U_k V_k^T, ranks) of low_rank_approx for one kernel; 'decouple' (ND) loops over the output filters."""
  if scheme != "decouple" or w.ndim == 2:
    mat, back = torch_matrix(w, scheme)
    u, s, vh = np.linalg.svd(mat, full_matrices=False)
    k = np_energy_rank(s, energy)
    return back((u[:, :k] * s[:k]) @ vh[:k]), back(u[:, :k] @ vh[:k]), k
  wt = w.transpose(3, 2, 0, 1)  # torch [N, C, kh, kw]
  t_w, sub, ks = np.zeros_like(wt), np.zeros_like(wt), []
  for i in range(wt.shape[0]):
    u, s, vh = np.linalg.svd(wt[i].reshape(wt.shape[1], -1), full_matrices=False)  # W_i [C, kh*kw]
    k = np_energy_rank(s, energy)
    t_w[i] = ((u[:, :k] * s[:k]) @ vh[:k]).reshape(wt.shape[1:])
    sub[i] = (u[:, :k] @ vh[:k]).reshape(wt.shape[1:])
    ks.append(k)
  return t_w.transpose(2, 3, 1, 0), sub.transpose(2, 3, 1, 0), np.array(ks)


def np_trp(w0, grad_fn, steps, period, energy, lam, lr, mom, scheme, every_step):
  w = w0.astype(np.float64).copy()
  buf = None
  for t in range(steps):
    t_w, sub, _ = np_low_rank(w, scheme, energy)
    if t % period == 0:  # low_rank_approx: replace W by its energy-truncated SVD before the forward pass
      w = t_w
    g = grad_fn(w, t)
    if t % period == 0 or every_step:
      g = g + lam * sub
    buf = g if buf is None else mom * buf + g
    w = w - lr * buf
  return w


@pytest.mark.parametrize("shape,scheme", [((12, 9), "channel"), ((3, 3, 4, 6), "channel"), ((3, 3, 4, 6), "spatial"),
                                          ((3, 3, 4, 6), "decouple"), ((3, 2, 5, 4), "decouple"),
                                          ((12, 9), "decouple")])
@pytest.mark.parametrize("every_step", [False, True])
def test_matches_reference_loop(shape, scheme, every_step):
  steps, period, energy, lam, lr, mom = 8, 3, 0.9, 0.05, 0.05, 0.9
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=shape).astype(np.float32)
  target = rng.normal(size=shape).astype(np.float32)
  grad = lambda w, t: (w - target) * (1.0 + 0.1 * t)
  params = {"conv": {"kernel": jnp.asarray(w0)}}
  tx = trp(optax.sgd(lr, momentum=mom), energy=energy, period=period, nuclear_weight=lam, scheme=scheme,
           nuclear_every_step=every_step)
  state = tx.init(params)
  p = trp_project_params(params, energy, scheme)
  upd = jax.jit(tx.update)
  for t in range(steps):
    u, state = upd({"conv": {"kernel": grad(p["conv"]["kernel"], t)}}, state, p)
    p = optax.apply_updates(p, u)
  ref = np_trp(w0, grad, steps, period, energy, lam, lr, mom, scheme, every_step)
  np.testing.assert_allclose(np.asarray(p["conv"]["kernel"]), ref, rtol=2e-4, atol=2e-5)


def test_projection_steps_give_low_rank_and_non_targets_untouched():
  rng = np.random.default_rng(1)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(16, 16)).astype(np.float32))},
            "norm": {"scale": jnp.ones(16)}}
  tx = trp(optax.sgd(0.01), energy=0.5, period=2, nuclear_weight=0.0)
  st = tx.init(params)
  p = params
  for t in range(2):
    u, st = tx.update(jax.tree.map(jnp.ones_like, p), st, p)
    p = optax.apply_updates(p, u)
  s = np.linalg.svd(np.asarray(p["dense"]["kernel"]), compute_uv=False)
  k = int(st.ranks[0])
  assert 1 <= k < 16 and s[k] < 1e-4 * s[0]
  np.testing.assert_allclose(p["norm"]["scale"], 1.0 - 0.02, rtol=1e-6)


def _conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_factorize_conv_matches_truncated_kernel(scheme):
  rng = np.random.default_rng(2)
  a = rng.normal(size=(3 * 3 * 5 if scheme == "channel" else 5 * 3, 3)).astype(np.float32)
  b = rng.normal(size=(3, 8 if scheme == "channel" else 8 * 3)).astype(np.float32)
  mat = a @ b  # rank 3
  if scheme == "channel":
    kernel = mat.reshape(3, 3, 5, 8)
  else:
    kernel = mat.reshape(5, 3, 8, 3).transpose(1, 3, 0, 2)
  out = trp_factorize(kernel, scheme=scheme, value_threshold=1e-3)
  assert out["rank"] == 3
  k1, k2 = out["factors"]
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 5)).astype(np.float32))
  np.testing.assert_allclose(_conv(_conv(x, k1), k2), _conv(x, jnp.asarray(kernel)), rtol=1e-4, atol=1e-3)
  dense = 3 * 3 * 5 * 8
  fact = 3 * 3 * 5 * 3 + 3 * 8 if scheme == "channel" else 3 * 5 * 3 + 3 * 3 * 8
  assert out["macs_dense"] == dense and out["macs_factored"] == fact
  assert out["flop_reduction"] == pytest.approx(dense / fact)


def test_factorize_dense_energy():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(20, 30)).astype(np.float32)
  out = trp_factorize(w, energy=0.9)
  s = np.linalg.svd(w, compute_uv=False)
  assert out["rank"] == np_energy_rank(s, 0.9)
  a, b = out["factors"]
  k = out["rank"]
  u, s, vh = np.linalg.svd(w, full_matrices=False)
  np.testing.assert_allclose(a @ b, (u[:, :k] * s[:k]) @ vh[:k], rtol=1e-4, atol=1e-4)
  assert out["flop_reduction"] == pytest.approx(20 * 30 / (k * 50))


@pytest.mark.parametrize("kwargs", [dict(energy=0.0), dict(energy=1.5), dict(period=0), dict(nuclear_weight=-1.0),
                                    dict(scheme="ND"), dict(scheme="depthwise")])
def test_bad_hyperparameters(kwargs):
  with pytest.raises(ValueError):
    trp(optax.sgd(0.1), **kwargs)


def test_bad_kernel_rank():
  with pytest.raises(ValueError):
    trp_factorize(np.ones((2, 3, 4)))


@pytest.mark.parametrize("kwargs", [dict(scheme="ND"), dict(scheme="decouple", energy=0.0),
                                    dict(scheme="decouple", value_threshold=-1.0)])
def test_factorize_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    trp_factorize(np.ones((3, 3, 2, 4)), **kwargs)


# ----------------------------------------------------------------------------------------------------------
# ND (network decoupling): per-filter SVDs
# ----------------------------------------------------------------------------------------------------------

def np_filter_svds(kernel):
  """Per-filter SVDs of an HWIO kernel, as the reference loops: W_i = weight[i].view(C, kh*kw)."""
  wt = np.asarray(kernel, np.float64).transpose(3, 2, 0, 1)
  return [np.linalg.svd(wt[i].reshape(wt.shape[1], -1), full_matrices=False) for i in range(wt.shape[0])]


def test_decouple_ranks_are_per_filter_and_projection_truncates_each_filter():
  rng = np.random.default_rng(4)
  # filters of different effective ranks: filter i is (i % 3 + 1)-rank plus a little noise
  c, kh, kw, n = 6, 3, 3, 5
  wt = np.stack([rng.normal(size=(c, i % 3 + 1)) @ rng.normal(size=(i % 3 + 1, kh * kw)) for i in range(n)])
  wt = wt + 1e-3 * rng.normal(size=wt.shape)
  kernel = wt.reshape(n, c, kh, kw).transpose(2, 3, 1, 0).astype(np.float32)
  params = {"conv": {"kernel": jnp.asarray(kernel)}}
  tx = trp(optax.sgd(0.0), energy=0.99, period=1, nuclear_weight=0.0, scheme="decouple")
  st = tx.init(params)
  ref_ranks = [np_energy_rank(s, 0.99) for _, s, _ in np_filter_svds(kernel)]
  assert st.ranks[0].shape == (n,) and st.ranks[0].dtype == jnp.int32
  assert list(np.asarray(st.ranks[0])) == ref_ranks == [1, 2, 3, 1, 2]
  u, st = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), st, params)
  out = kernel + np.asarray(u["conv"]["kernel"])
  for (_, s_out, _), (uu, s, vh), k in zip(np_filter_svds(out), np_filter_svds(kernel), ref_ranks):
    np.testing.assert_allclose(s_out[:k], s[:k], rtol=1e-4)
    assert np.all(s_out[k:] < 1e-5)


def test_decouple_1x1_kernel_and_zero_filter():
  # 1x1: every filter is a [C, 1] matrix of rank <= 1, so the projection is the identity and the nuclear
  # sub-gradient of filter i is w_i / ||w_i|| (0 for a zero filter: minimum-norm choice).
  rng = np.random.default_rng(5)
  kernel = rng.normal(size=(1, 1, 4, 3)).astype(np.float32)
  kernel[..., 1] = 0.0
  params = {"conv": {"kernel": jnp.asarray(kernel)}}
  lr, lam = 0.1, 0.5
  tx = trp(optax.sgd(lr), energy=0.9, period=1, nuclear_weight=lam, scheme="decouple")
  st = tx.init(params)
  assert list(np.asarray(st.ranks[0])) == [1, 1, 1]
  g = rng.normal(size=kernel.shape).astype(np.float32)
  g[..., 1] = 0.0
  u, st = jax.jit(tx.update)({"conv": {"kernel": jnp.asarray(g)}}, st, params)
  norms = np.sqrt((kernel.astype(np.float64) ** 2).sum(axis=(0, 1, 2), keepdims=True))
  sub = np.where(norms > 0, kernel / np.where(norms > 0, norms, 1.0), 0.0)
  np.testing.assert_allclose(np.asarray(u["conv"]["kernel"]), -lr * (g + lam * sub), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(u["conv"]["kernel"][..., 1]).max()) == 0.0


def test_decouple_bf16_params_under_jit():
  rng = np.random.default_rng(6)
  kernel = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  g = rng.normal(size=kernel.shape).astype(np.float32)
  outs = {}
  for dt in (jnp.float32, jnp.bfloat16):
    params = {"conv": {"kernel": jnp.asarray(kernel, dt)}}
    tx = trp(optax.sgd(0.05), energy=0.9, period=2, nuclear_weight=0.1, scheme="decouple",
             nuclear_every_step=True)
    st = tx.init(params)
    p = trp_project_params(params, 0.9, "decouple")
    assert p["conv"]["kernel"].dtype == dt
    step = jax.jit(tx.update)
    for _ in range(3):
      u, st = step({"conv": {"kernel": jnp.asarray(g, dt)}}, st, p)
      assert u["conv"]["kernel"].dtype == dt
      p = optax.apply_updates(p, u)
    outs[dt] = np.asarray(p["conv"]["kernel"].astype(jnp.float32))
  assert np.all(np.isfinite(outs[jnp.bfloat16]))
  np.testing.assert_allclose(outs[jnp.bfloat16], outs[jnp.float32], rtol=0.05, atol=0.05)


def _decoupled_conv(x, pw, dw):
  n = pw.shape[-1]
  return sum(jax.lax.conv_general_dilated(_conv(x, jnp.asarray(pw[j])), jnp.asarray(dw[j]), (1, 1), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=n)
             for j in range(pw.shape[0]))


def test_factorize_decouple_default_energy_matches_per_filter_loop():
  rng = np.random.default_rng(7)
  c, kh, kw, n = 5, 3, 3, 4
  kernel = rng.normal(size=(kh, kw, c, n)).astype(np.float32)
  out = trp_factorize(kernel, scheme="decouple")  # reference deploy default: EnergyThreshold(0.85)
  svds = np_filter_svds(kernel)
  ranks = [np_energy_rank(s, 0.85) for _, s, _ in svds]
  k = min(max(ranks), min(c, kh * kw))
  assert out["rank"] == k and list(out["filter_ranks"]) == ranks
  # every filter keeps the common rank k (not its own k_i), as network_decouple does
  approx = np.stack([((u[:, :k] * s[:k]) @ vh[:k]).reshape(c, kh, kw) for u, s, vh in svds]).transpose(2, 3, 1, 0)
  pw, dw = out["factors"]
  assert pw.shape == (k, 1, 1, c, n) and dw.shape == (k, kh, kw, 1, n)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, c)).astype(np.float32))
  np.testing.assert_allclose(_decoupled_conv(x, pw, dw), _conv(x, jnp.asarray(approx, jnp.float32)),
                             rtol=1e-4, atol=1e-4)
  assert out["macs_dense"] == kh * kw * c * n and out["macs_factored"] == k * (n * c + n * kh * kw)
  assert out["flop_reduction"] == pytest.approx(kh * kw * c * n / (k * (n * c + n * kh * kw)))


@pytest.mark.parametrize("shape,expected_rank", [((3, 3, 2, 4), 2),   # C < kh*kw: capped at C
                                                 ((1, 1, 4, 3), 1),   # 1x1: kh*kw = 1
                                                 ((2, 2, 6, 3), 4)])  # kh*kw < C: capped at kh*kw
def test_factorize_decouple_rank_cap_is_exact(shape, expected_rank):
  rng = np.random.default_rng(8)
  kernel = rng.normal(size=shape).astype(np.float32)
  out = trp_factorize(kernel, scheme="decouple", value_threshold=0.0)  # keep every singular value
  assert out["rank"] == expected_rank == min(shape[2], shape[0] * shape[1])
  pw, dw = out["factors"]
  x = jnp.asarray(rng.normal(size=(1, 5, 5, shape[2])).astype(np.float32))
  np.testing.assert_allclose(_decoupled_conv(x, pw, dw), _conv(x, jnp.asarray(kernel)), rtol=1e-4, atol=1e-4)


def test_factorize_decouple_low_rank_filters_bf16_input():
  rng = np.random.default_rng(9)
  c, kh, kw, n = 5, 3, 3, 6
  wt = np.stack([rng.normal(size=(c, 2)) @ rng.normal(size=(2, kh * kw)) for _ in range(n)])  # rank-2 filters
  kernel = jnp.asarray(wt.reshape(n, c, kh, kw).transpose(2, 3, 1, 0), jnp.bfloat16)
  out = trp_factorize(kernel, scheme="decouple", value_threshold=0.05)
  assert out["rank"] == 2 and list(out["filter_ranks"]) == [2] * n
  pw, dw = out["factors"]
  assert pw.dtype == np.float32
  # oracle: per-filter rank-2 truncation of the bf16-rounded kernel (bf16 rounding breaks the exact rank 2)
  k32 = np.asarray(kernel.astype(jnp.float32))
  approx = np.stack([((u[:, :2] * s[:2]) @ vh[:2]).reshape(c, kh, kw)
                     for u, s, vh in np_filter_svds(k32)]).transpose(2, 3, 1, 0)
  assert np.abs(approx - k32).max() < 0.05
  x = jnp.asarray(rng.normal(size=(1, 5, 5, c)).astype(np.float32))
  np.testing.assert_allclose(_decoupled_conv(x, pw, dw), _conv(x, jnp.asarray(approx, jnp.float32)),
                             rtol=1e-4, atol=1e-4)
  # 2-D kernels are factored as matrices whatever the scheme
  w = rng.normal(size=(8, 6)).astype(np.float32)
  a, b = trp_factorize(w, scheme="decouple")["factors"], trp_factorize(w, scheme="channel")["factors"]
  np.testing.assert_allclose(a[0] @ a[1], b[0] @ b[1], rtol=1e-5, atol=1e-5)
