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


def np_trp(w0, grad_fn, steps, period, energy, lam, lr, mom, scheme, every_step):
  w = w0.astype(np.float64).copy()
  buf, k_proj = None, None
  for t in range(steps):
    mat, back = torch_matrix(w, scheme)
    u, s, vh = np.linalg.svd(mat, full_matrices=False)
    if t % period == 0:  # low_rank_approx: replace W by its energy-truncated SVD before the forward pass
      k_proj = np_energy_rank(s, energy)
      w = back((u[:, :k_proj] * s[:k_proj]) @ vh[:k_proj])
      k = k_proj
    else:
      k = np_energy_rank(s, energy)
    g = grad_fn(w, t)
    if t % period == 0 or every_step:
      g = g + lam * back(u[:, :k] @ vh[:k])
    buf = g if buf is None else mom * buf + g
    w = w - lr * buf
  return w


@pytest.mark.parametrize("shape,scheme", [((12, 9), "channel"), ((3, 3, 4, 6), "channel"), ((3, 3, 4, 6), "spatial")])
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
                                    dict(scheme="ND")])
def test_bad_hyperparameters(kwargs):
  with pytest.raises(ValueError):
    trp(optax.sgd(0.1), **kwargs)


def test_bad_kernel_rank():
  with pytest.raises(ValueError):
    trp_factorize(np.ones((2, 3, 4)))
