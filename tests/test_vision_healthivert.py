"""HealthiVert-GAN model pieces: exact parameter counts, PatchGAN output size, contextual attention vs a float64
numpy loop transcription, spectral-norm power iteration, SHRM crop-and-shift, the context shift, the mask switch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from losses import healthivert as LH
from lostjax.vision import healthivert as H


def _n_params(module):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.fixture(scope="module")
def abstract_generator():
  return nnx.eval_shape(lambda: H.Generator(rngs=nnx.Rngs(0)))


def test_parameter_counts_match_the_reference(abstract_generator):
  g = abstract_generator
  assert _n_params(g.coarse) == 409_771
  assert _n_params(g.fine) == 577_117
  assert _n_params(g) == 986_888
  d = nnx.eval_shape(lambda: H.PatchDiscriminator(rngs=nnx.Rngs(0)))
  assert _n_params(d) == 2_763_585
  # spectral-norm vectors are state, not parameters: one (u, v) pair per convolution
  n_sn = len(jax.tree.leaves(nnx.state(g, H.SpectralVector)))
  assert n_sn == 2 * (20 + 27)  # 20 coarse, 27 fine convolutions


def test_patchgan_and_generator_output_shapes(abstract_generator):
  x = jax.ShapeDtypeStruct((2, 256, 256, 1), jnp.float32)
  assert jax.eval_shape(lambda x: H.PatchDiscriminator(rngs=nnx.Rngs(0))(x), x).shape == (2, 30, 30, 1)
  x64 = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)
  r = jax.ShapeDtypeStruct((2,), jnp.float32)
  # the forward pass traced from the abstract generator's state (no second initialisation)
  gdef, state = nnx.split(abstract_generator)
  out = jax.eval_shape(lambda st, a, m, c, s: nnx.merge(gdef, st)(a, m, c, s), state, x64, x64, x64, r)
  assert {k: v.shape for k, v in out.items()} == {
      "x_stage1": (2, 64, 64, 1), "coarse_seg": (2, 64, 64, 1), "p1": (2,),
      "x_stage2": (2, 64, 64, 1), "fine_seg": (2, 64, 64, 1), "p2": (2,)}
  with pytest.raises(ValueError, match="multiple of 8"):  # checked before any computation
    abstract_generator(*[np.zeros((2, 60, 60, 1), np.float32)] * 3, np.zeros(2, np.float32))


# ------------------------------------------------------------------------------------------ contextual attention

def np_contextual_attention(f, b, mask, rate=2, k=3, scale=10., fuse=True, eps=1e-4):
  """One sample, float64 loops: f, b [h, w, C]; mask [h/rate, w/rate]."""
  h, w, c = f.shape
  hb, wb = h // rate, w // rate
  bp = np.pad(b, ((1, 1), (1, 1), (0, 0)))  # 'same' padding of the 4x4 / stride-2 raw patches
  raw = np.array([[bp[rate * i:rate * i + 2 * rate, rate * j:rate * j + 2 * rate] for j in range(wb)]
                  for i in range(hb)])
  fd, bd = f[::rate, ::rate], b[::rate, ::rate]
  fdp, bdp = np.pad(fd, ((1, 1), (1, 1), (0, 0))), np.pad(bd, ((1, 1), (1, 1), (0, 0)))
  s = np.zeros((hb, wb, hb, wb))
  for bi in range(hb):
    for bj in range(wb):
      patch = bdp[bi:bi + k, bj:bj + k]
      patch = patch / max(np.sqrt(np.sum(patch ** 2)), eps)
      for fi in range(hb):
        for fj in range(wb):
          s[bi, bj, fi, fj] = np.sum(fdp[fi:fi + k, fj:fj + k] * patch)
  n = hb * wb

  def diag(m):
    out = np.zeros_like(m)
    for i in range(n):
      for j in range(n):
        out[i, j] = sum(m[i + d, j + d] for d in range(-(k // 2), k // 2 + 1) if 0 <= i + d < n and 0 <= j + d < n)
    return out
  if fuse:
    m = diag(s.reshape(n, n))
    m = diag(m.reshape(hb, wb, hb, wb).transpose(1, 0, 3, 2).reshape(n, n))
    s = m.reshape(wb, hb, wb, hb).transpose(1, 0, 3, 2)
  mp = np.pad(mask, 1)
  valid = np.array([[float(np.mean(mp[i:i + k, j:j + k]) == 0) for j in range(wb)] for i in range(hb)])
  z = scale * s * valid[:, :, None, None]
  z = z - z.max(axis=(0, 1), keepdims=True)
  y = np.exp(z) / np.exp(z).sum(axis=(0, 1), keepdims=True) * valid[:, :, None, None]
  out = np.zeros((h, w, c))
  for bi in range(hb):
    for bj in range(wb):
      for fi in range(hb):
        for fj in range(wb):
          for kh in range(2 * rate):
            for kw in range(2 * rate):
              oy, ox = rate * fi - 1 + kh, rate * fj - 1 + kw
              if 0 <= oy < h and 0 <= ox < w:
                out[oy, ox] += y[bi, bj, fi, fj] * raw[bi, bj, kh, kw]
  return out / 4., y


def test_contextual_attention_matches_numpy_loops():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(2, 8, 8, 3))
  mask = np.zeros((2, 4, 4, 1))
  mask[0, 0, :, 0] = 1  # sample 0: hole in row 0 (at 1/8 of the image): patches of rows 0, 1 are invalid
  mask[1, 3, 1, 0] = 1  # sample 1: one hole pixel: patches around it are invalid
  ca = jax.jit(H.contextual_attention, static_argnames=("ca_mask",))
  got = np.asarray(ca(jnp.asarray(f, jnp.float32), jnp.asarray(f, jnp.float32), jnp.asarray(mask, jnp.float32)))
  for i in range(2):
    want, y = np_contextual_attention(f[i], f[i], mask[i, :, :, 0])
    np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(y.sum(axis=(0, 1)), 1., rtol=1e-6)  # the softmax sums to 1 over valid patches
    used = y.sum(axis=(2, 3)) > 0
    want_valid = np.ones((4, 4), bool)
    if i == 0:
      want_valid[:2] = False
    else:
      want_valid[2:, 0:3] = False
    np.testing.assert_array_equal(used, want_valid)  # invalid background patches get 0
  # the reference's batch quirk: sample 0's mask for every sample
  first = np.asarray(ca(jnp.asarray(f, jnp.float32), jnp.asarray(f, jnp.float32), jnp.asarray(mask, jnp.float32),
                        ca_mask="first"))
  np.testing.assert_allclose(first[1], np_contextual_attention(f[1], f[1], mask[0, :, :, 0])[0], rtol=2e-4,
                             atol=2e-5)
  assert np.abs(first[1] - got[1]).max() > 1e-3
  with pytest.raises(ValueError, match="ca_mask"):
    H.contextual_attention(f, f, mask, ca_mask="all")
  with pytest.raises(ValueError, match="mask must have spatial size"):
    H.contextual_attention(f, f, mask[:, :2])


# ------------------------------------------------------------------------------------------ spectral norm

def test_spectral_norm_power_iteration_state():
  conv = H.SNConv(3, 4, 3, padding=1, rngs=nnx.Rngs(1))
  w = np.asarray(conv.kernel[...], np.float64).reshape(-1, 4)
  u0 = np.asarray(conv.u[...])
  gdef, state = nnx.split(conv)

  @jax.jit
  def step(state):
    m = nnx.merge(gdef, state)
    k = m.normalized_kernel()
    g = nnx.grad(lambda mm: jnp.sum(mm.normalized_kernel()))(nnx.merge(gdef, state))
    return k, nnx.state(m), jax.grad(lambda kern: jnp.sum(kern / jnp.dot(
        m.u[...], kern.reshape(-1, 4).T @ m.v[...])))(m.kernel[...]), g.kernel[...]

  k, new_state, grad_fixed_uv, g = step(state)
  # the kernel gradient goes through sigma(W) with u, v held constant
  np.testing.assert_allclose(np.asarray(g), np.asarray(grad_fixed_uv), rtol=1e-5, atol=1e-6)
  nnx.update(conv, new_state)
  assert not np.allclose(np.asarray(conv.u[...]), u0)  # training call: one power iteration stored in the state
  # one iteration from the stored vectors, as the reference's spectral_norm does
  v = w @ u0.astype(np.float64)
  v /= np.linalg.norm(v)
  u = w.T @ v
  u /= np.linalg.norm(u)
  np.testing.assert_allclose(np.asarray(k).reshape(-1, 4), w / (u @ w.T @ v), rtol=1e-5)
  # enough iterations converge to the largest singular value; eval mode leaves the vectors alone
  many = H.SNConv(3, 4, 3, padding=1, rngs=nnx.Rngs(1), n_power_iterations=50)
  k = np.asarray(many.normalized_kernel(), np.float64).reshape(-1, 4)
  np.testing.assert_allclose(np.linalg.svd(k, compute_uv=False)[0], 1., rtol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(w.T @ np.asarray(many.v[...])), np.linalg.svd(w, compute_uv=False)[0],
                             rtol=1e-4)
  many.eval()
  u_eval = np.asarray(many.u[...])
  many.normalized_kernel()
  np.testing.assert_array_equal(np.asarray(many.u[...]), u_eval)


# ------------------------------------------------------------------------------------------ SHRM and data shifts

def test_shrm_composition_rows():
  compose = jax.jit(H.shrm_compose, static_argnames="band")
  s = 16
  real = np.arange(s, dtype=np.float32)[None, :, None, None] * np.ones((1, s, 3, 1), np.float32)
  fake = 100 + real
  # h = ceil(8 * 0.75) = 6 > H = 4: d = 2, u = 5, b = 11
  out = np.asarray(compose(real, fake, jnp.array([0.75]), jnp.array([4]), jnp.array([6]), jnp.array([10]),
                           band=8))[0, :, 0, 0]
  np.testing.assert_array_equal(out[0:5], np.arange(1, 6))
  np.testing.assert_array_equal(out[5:11], 100 + np.arange(5, 11))
  np.testing.assert_array_equal(out[11:16], np.arange(10, 15))
  # a predicted height below H keeps H: the real rows [0, x1) and [x2, S) stay in place
  out = np.asarray(compose(real, fake, jnp.array([0.1]), jnp.array([4]), jnp.array([6]), jnp.array([10]),
                           band=8))[0, :, 0, 0]
  np.testing.assert_array_equal(out, np.r_[np.arange(6), 100 + np.arange(6, 10), np.arange(10, 16)])
  # no gradient reaches p through the composition; the generated rows carry theirs
  gp = jax.grad(lambda p: jnp.sum(compose(real, fake, p, jnp.array([4]), jnp.array([6]), jnp.array([10]),
                                          band=8)))(jnp.array([0.75]))
  assert float(gp[0]) == 0.
  gf = jax.grad(lambda g: jnp.sum(compose(real, g, jnp.array([0.75]), jnp.array([4]), jnp.array([6]),
                                          jnp.array([10]), band=8)))(jnp.asarray(fake))
  np.testing.assert_array_equal(np.asarray(gf)[0, :, 0, 0], (np.arange(s) >= 5) & (np.arange(s) < 11))


def np_context_shift(x, x1, x2, band):
  s = x.shape[0]
  m = (x1 + x2) // 2
  min_x = 0 if m <= band // 2 else (s - band if s - m <= band / 2 else m - band // 2)
  out = np.zeros_like(x)
  out[:min_x] = x[x1 - min_x:x1]
  out[min_x + band:] = x[x2:x2 + s - min_x - band]
  hole = np.zeros((s,) + x.shape[1:2] + (1,))
  hole[min_x:min_x + band] = 1
  return out, hole


def test_context_shift_matches_reference_slicing():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 32, 5, 2)).astype(np.float32)
  x1, x2 = np.array([10, 2, 24]), np.array([16, 6, 29])  # middle, near the top, near the bottom
  got, hole, _ = jax.jit(H.context_shift, static_argnames="band")(jnp.asarray(x), x1, x2, band=8)
  for i in range(3):
    want, want_hole = np_context_shift(x[i], x1[i], x2[i], 8)
    np.testing.assert_array_equal(np.asarray(got[i]), want)
    np.testing.assert_array_equal(np.asarray(hole[i]), want_hole)
  with pytest.raises(ValueError, match="band"):
    H.context_shift(x, x1, x2, band=32)


def test_local_crop_window():
  img = np.ones((1, 4, 10, 1), np.float32)
  mask = np.zeros_like(img)
  mask[:, 1:3] = 1
  out = np.asarray(H.local_crop(img, mask, half_width=2))[0, :, :, 0]
  want = np.zeros((4, 10))
  want[1:3, 3:7] = 1
  np.testing.assert_array_equal(out, want)


def test_mask_switch_reproduces_the_gradient_killing_hard_mask():
  rng = np.random.default_rng(4)
  seg = jnp.asarray(rng.uniform(0.05, 0.95, (2, 12, 12, 1)), jnp.float32)
  real = jnp.asarray(rng.uniform(size=(2, 12, 12, 1)) > 0.5, jnp.float32)
  edge_grad = jax.jit(jax.grad(lambda s, m: LH.edge_loss(H.mask_switch(s, m), real)), static_argnums=1)
  grads = {m: np.asarray(edge_grad(seg, m)) for m in H.MASK_MODES}
  assert np.all(grads["hard"] == 0)  # the reference: the edge loss never reaches the generator
  assert np.abs(grads["soft"]).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(H.mask_switch(seg, "hard")), np.asarray(seg > 0.5, np.float32))
  np.testing.assert_array_equal(np.asarray(H.mask_switch(seg)), np.asarray(seg))  # default: soft
  with pytest.raises(ValueError, match="mask_mode"):
    H.mask_switch(seg, "binary")


class _Record(nnx.Module):
  def __init__(self, inner, box):
    self.inner, self.box = inner, box

  def __call__(self, x):
    self.box.append(x)
    return self.inner(x)


@pytest.mark.slow
def test_coarse_decoder_receives_one_minus_cam_at_two_scales():
  """HGAM wiring: the decoder's extra channels are 1 - CAM at S/2 (nearest) and at S (cnum=4, 16^2)."""
  rng = np.random.default_rng(5)
  cam = jnp.asarray(rng.uniform(size=(1, 16, 16, 1)), jnp.float32)
  x = jnp.asarray(rng.uniform(-1, 1, (1, 16, 16, 1)), jnp.float32)
  coarse = H.CoarseGenerator(4, rngs=nnx.Rngs(0))
  gdef, state = nnx.split(coarse)

  @jax.jit
  def run(state, x, cam):
    m = nnx.merge(gdef, state)
    box = []
    m.conv20, m.conv19 = _Record(m.conv20, box), _Record(m.conv19, box)
    m(x, jnp.zeros_like(x), 1. - cam, jnp.array([0.3]))
    return box[0][..., -1], box[1][..., -1]

  half, full = run(state, x, cam)
  np.testing.assert_array_equal(np.asarray(half), 1. - np.asarray(cam)[0:1, ::2, ::2, 0])
  np.testing.assert_array_equal(np.asarray(full), 1. - np.asarray(cam)[..., 0])


class _Stop(Exception):
  pass


class _Capture(nnx.Module):
  def __call__(self, *args):
    raise _Stop(args)


def test_generator_hands_one_minus_cam_to_the_coarse_stage(abstract_generator):
  g = nnx.clone(abstract_generator)  # abstract: nothing is computed but the inputs
  g.coarse = _Capture()
  cam = np.random.default_rng(6).uniform(size=(2, 16, 16, 1)).astype(np.float32)
  x = np.zeros_like(cam)
  with pytest.raises(_Stop) as e:
    g(x, x + 1, cam, np.array([0.1, 0.2], np.float32))
  masked, mask, attention, ratio = e.value.args[0]
  np.testing.assert_array_equal(np.asarray(attention), 1. - cam)
  np.testing.assert_array_equal(np.asarray(mask), x + 1)
