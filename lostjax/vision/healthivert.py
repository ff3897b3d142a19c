"""HealthiVert-GAN: two-stage inpainting generator, PatchGAN discriminators and the height-restoring composition.

Paper: "HealthiVert-GAN: A Novel Framework of Pseudo-Healthy Vertebral Image Synthesis for Interpretable
Compression Fracture Grading", arXiv:2503.05990 (IEEE JBHI 2025). The target vertebra's rows of a straightened
sagittal CT slice are cut out and replaced by a fixed `band`-row hole (40 px at 256^2); a generator trained on
healthy vertebrae only fills the hole with a *pseudo-healthy* vertebra, predicts its healthy height, and the
height loss between the synthesised and the real mask (RHLV, `lostjax.metrics.healthivert`) grades fractures.

Layout: images are NHWC, `[B, S, S, 1]`, CT normalised to [-1, 1], masks and attention maps in [0, 1].

* `context_shift` (data preparation): the rows above the vertebra are moved down and the rows below it moved
  up so that they border a `band`-row hole centred on the vertebra, `min_x = clip((x1+x2)//2 - band//2, 0,
  S - band)`; rows [min_x, min_x + band) are zero. Applied to the CT slice, the HGAM map and the neighbour masks.
* `Generator` (DeepFill-v1 style, every convolution spectrally normalised, ELU):
    coarse:  x_1, seg_1, p_1 = G_c([A_masked, slice_ratio, mask], 1 - CAM)
    fine:    x_2, seg_2, p_2 = G_f([A_masked, seg_1, mask, slice_ratio], x_1)
  The coarse decoder receives `1 - CAM` (HGAM, the Grad-CAM++ map of a fracture classifier, see
  `lostjax.metrics.grad_cam`) at 1/2 and full resolution. The fine stage has a dilated-convolution branch and a
  contextual-attention branch (`contextual_attention`, Yu et al. 2018). Each stage has a height head
  p_s = sigmoid(Linear(GAP(features))); the predicted healthy height is band * p_s (SHRM).
* `shrm_compose` (SHRM, eq. of the crop-and-shift composition): with h_s = max(ceil(band * p_s), H), d = h_s - H,
  u = x1 - d//2, b = u + h_s the composite takes real rows [d//2, x1) into rows [0, u), generated rows [u, b) and
  real rows [x2, x2 + S - b) into rows [b, S). Non-differentiable in p_s (p_s is trained by the height loss only).
* `PatchDiscriminator`: the 70x70 PatchGAN of pix2pix (C64-C128-C256-C512, BatchNorm, LeakyReLU 0.2); three of
  them judge the composite CT, the segmentation and the central crop of the hole (`local_crop`).
* `healthivert_forward` runs the generator and builds every tensor the losses (`losses.healthivert`) need.

Spectral normalisation (`SNConv`) follows the reference (PyTorch `spectral_norm`): the raw kernel is the trained
parameter, the left/right singular-vector estimates u, v live in NNX state (`SpectralVector`, a `BatchStat`), one
power iteration per training call (`use_running_average=False`, set by `model.train()`), none in eval mode
(`model.eval()`), sigma = u^T W v with u, v treated as constants. `nnx.SpectralNorm` is not used because it
writes W / sigma back into the wrapped kernel parameter.

Deliberate deviations from the reference code (each a keyword argument, reference behaviour available):
* `mask_mode` (`healthivert_forward`): the reference feeds D2 and the edge loss with the thresholded mask
  1[seg_2 > 0.5], whose gradient is zero, so the edge loss and D2's generator term never train the generator.
  Default "soft" feeds seg_2 itself; "hard" reproduces the reference. (A straight-through variant would not
  help the edge loss: the Sobel magnitude of a binary mask is clipped at 1 or flat almost everywhere.)
* `ca_mask` (`contextual_attention`): the reference decides which background patches are valid from the first
  sample's mask for the whole batch; default "sample" uses each sample's own mask, "first" reproduces it.
* Spatial size S (256 in the reference) and the band (40) are arguments; S must be a multiple of 8.
The flow visualisation of contextual attention is not computed.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

BAND = 40  # rows of the hole at 256^2 (40 mm at 1 mm spacing) in the reference
LOCAL_HALF_WIDTH = 35  # half-width of the central column window judged by the local discriminator at 256^2
MASK_MODES = ("soft", "hard")
CA_MASKS = ("sample", "first")


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _torch_uniform(fan_in: int):
  """PyTorch's default Conv2d/Linear initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and bias."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _l2_normalize(x, eps):
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


class SpectralVector(nnx.BatchStat):
  """A power-iteration vector of spectral normalisation: state updated in training calls, never trained."""


class SNConv(nnx.Module):
  """Zero-padded 2-D convolution whose kernel is divided by its largest singular value (spectral norm).

  W is the kernel reshaped to [k*k*cin, cout]; training calls (`use_running_average=False`) run
  `n_power_iterations` steps v <- normalize(W u), u <- normalize(W^T v) from the stored vectors and store them;
  sigma = u . (W^T v) with u, v held constant (stop_gradient), kernel / sigma is applied.
  """

  def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1,
               *, rngs: nnx.Rngs, n_power_iterations: int = 1, eps: float = 1e-12,
               use_running_average: bool = False):
    k = kernel_size
    fan_in = cin * k * k
    init = _torch_uniform(fan_in)
    self.kernel = nnx.Param(init(rngs.params(), (k, k, cin, cout)))
    self.bias = nnx.Param(init(rngs.params(), (cout,)))
    self.u = SpectralVector(_l2_normalize(jax.random.normal(rngs.params(), (cout,)), eps))
    self.v = SpectralVector(_l2_normalize(jax.random.normal(rngs.params(), (fan_in,)), eps))
    self.stride, self.padding, self.dilation = stride, padding, dilation
    self.n_power_iterations, self.eps = n_power_iterations, eps
    self.use_running_average = use_running_average

  def normalized_kernel(self):
    w = self.kernel[...]
    mat = w.reshape(-1, w.shape[-1])  # [k*k*cin, cout]
    u, v = self.u[...], self.v[...]
    if not self.use_running_average:
      for _ in range(self.n_power_iterations):
        v = _l2_normalize(mat @ u, self.eps)
        u = _l2_normalize(mat.T @ v, self.eps)
      u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
      self.u[...] = u
      self.v[...] = v
    sigma = jnp.dot(u, mat.T @ v)
    return w / sigma

  def __call__(self, x):
    p = self.padding
    y = jax.lax.conv_general_dilated(
        x, self.normalized_kernel().astype(x.dtype), (self.stride, self.stride), ((p, p), (p, p)),
        rhs_dilation=(self.dilation, self.dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(x.dtype)


_ACTIVATIONS = {"elu": jax.nn.elu, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "none": lambda x: x}


class GenConv(nnx.Module):
  """The generator's block: zero pad, spectrally normalised convolution with bias, activation (ELU default)."""

  def __init__(self, cin, cout, kernel_size=3, stride=1, padding=1, dilation=1, activation="elu", *, rngs):
    _check_choice("activation", activation, tuple(_ACTIVATIONS))
    self.conv = SNConv(cin, cout, kernel_size, stride, padding, dilation, rngs=rngs)
    self.activation = activation

  def __call__(self, x):
    return _ACTIVATIONS[self.activation](self.conv(x))


class HeightHead(nnx.Module):
  """SHRM height head: global average pool, Linear(C -> 1), sigmoid; returns p in (0, 1), shape [B]."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    init = _torch_uniform(channels)
    self.fc = nnx.Linear(channels, 1, kernel_init=init, bias_init=init, rngs=rngs)

  def __call__(self, x):
    return jax.nn.sigmoid(self.fc(jnp.mean(x, axis=(1, 2))))[:, 0]


def _up2(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _broadcast_ratio(slice_ratio, like):
  r = jnp.asarray(slice_ratio, like.dtype).reshape(-1, 1, 1, 1)
  return jnp.broadcast_to(r, like.shape[:3] + (1,))


class CoarseGenerator(nnx.Module):
  """Stage 1: encoder (two stride-2 convs), dilated convs r = 2, 4, 8, 16, height head 1, HGAM-guided decoder."""

  def __init__(self, cnum: int = 16, *, rngs: nnx.Rngs):
    c = cnum
    self.conv1 = GenConv(3, c, 5, 1, 2, rngs=rngs)
    self.conv2 = GenConv(c, 2 * c, 3, 2, 1, rngs=rngs)
    self.conv3 = GenConv(2 * c, 2 * c, rngs=rngs)
    self.conv4 = GenConv(2 * c, 4 * c, 3, 2, 1, rngs=rngs)
    self.conv5 = GenConv(4 * c, 4 * c, rngs=rngs)
    self.conv6 = GenConv(4 * c, 4 * c, rngs=rngs)
    self.atrous = nnx.List([GenConv(4 * c, 4 * c, 3, 1, r, r, rngs=rngs) for r in (2, 4, 8, 16)])
    self.height = HeightHead(4 * c, rngs=rngs)
    self.conv11 = GenConv(4 * c, 4 * c, rngs=rngs)
    self.conv12 = GenConv(4 * c, 4 * c, rngs=rngs)
    self.conv20 = GenConv(4 * c + 1, 4 * c, rngs=rngs)
    self.conv13 = GenConv(4 * c, 2 * c, rngs=rngs)
    self.conv14 = GenConv(2 * c, 2 * c, rngs=rngs)
    self.conv19 = GenConv(2 * c + 1, 2 * c, rngs=rngs)
    self.conv15 = GenConv(2 * c, c, rngs=rngs)
    self.conv16 = GenConv(c, c // 2, rngs=rngs)
    self.conv17 = GenConv(c // 2, 1, activation="none", rngs=rngs)
    self.conv18 = GenConv(c // 2, 1, activation="sigmoid", rngs=rngs)

  def __call__(self, masked, mask, attention, slice_ratio):
    """masked, mask, attention (= 1 - CAM): [B, S, S, 1]; slice_ratio: [B]. Returns (x_stage1, seg, p)."""
    x = self.conv1(jnp.concatenate([masked, _broadcast_ratio(slice_ratio, masked), mask], -1))
    for layer in (self.conv2, self.conv3, self.conv4, self.conv5, self.conv6, *self.atrous):
      x = layer(x)
    p = self.height(x)
    x = self.conv12(self.conv11(x))
    x = jnp.concatenate([_up2(x), attention[:, ::2, ::2]], -1)  # HGAM at 1/2 resolution (nearest)
    x = self.conv14(self.conv13(self.conv20(x)))
    x = jnp.concatenate([_up2(x), attention], -1)  # HGAM at full resolution
    x = self.conv16(self.conv15(self.conv19(x)))
    return jnp.clip(self.conv17(x), -1., 1.), self.conv18(x), p


def _same_pads(size, k, s):
  out = -(-size // s)
  total = max(0, (out - 1) * s + k - size)
  return total // 2, total - total // 2


def _patches(x, k, s):
  """[h, w, C] -> [L, k, k, C]: 'same'-padded k x k patches with stride s, row-major over positions."""
  h, w, c = x.shape
  xp = jnp.pad(x, (_same_pads(h, k, s), _same_pads(w, k, s), (0, 0)))
  ho, wo = -(-h // s), -(-w // s)
  rows = (jnp.arange(ho) * s)[:, None] + jnp.arange(k)[None, :]  # [ho, k]
  cols = (jnp.arange(wo) * s)[:, None] + jnp.arange(k)[None, :]
  p = xp[rows[:, None, :, None], cols[None, :, None, :]]  # [ho, wo, k, k, C]
  return p.reshape(ho * wo, k, k, c)


def _diag_fuse(m, k):
  """Cross-correlate the score matrix [L_b, L_f] with the k x k identity kernel (zero 'same' padding)."""
  r = k // 2
  mp = jnp.pad(m, ((r, r), (r, r)))
  lb, lf = m.shape
  return sum(mp[d:d + lb, d:d + lf] for d in range(k))


def _contextual_attention_one(f, b, mask, *, ksize, rate, fuse_k, softmax_scale, fuse, eps):
  h, w, c = f.shape
  raw = _patches(b, 2 * rate, rate)  # [L, 2r, 2r, C] background patches used for the reconstruction
  fd, bd = f[::rate, ::rate], b[::rate, ::rate]
  hb, wb = bd.shape[:2]
  hf, wf = fd.shape[:2]
  wpatch = _patches(bd, ksize, 1)  # [L, k, k, C]
  norm = jnp.maximum(jnp.sqrt(jnp.sum(wpatch ** 2, axis=(1, 2, 3), keepdims=True)), eps)
  kern = jnp.transpose(wpatch / norm, (1, 2, 3, 0))  # HWIO, O = L
  pad = _same_pads(hf, ksize, 1), _same_pads(wf, ksize, 1)
  scores = jax.lax.conv_general_dilated(fd[None], kern, (1, 1), pad,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]  # [hf, wf, L]
  m = scores.reshape(hf * wf, hb * wb).T  # [L_b, L_f], both row-major
  if fuse:
    m = _diag_fuse(m, fuse_k)
    m = m.reshape(hb, wb, hf, wf).transpose(1, 0, 3, 2).reshape(hb * wb, hf * wf)  # column-major order
    m = _diag_fuse(m, fuse_k)
    m = m.reshape(wb, hb, wf, hf).transpose(1, 0, 3, 2).reshape(hb * wb, hf * wf)
  mpatch = _patches(mask, ksize, 1)  # [L, k, k, 1]
  valid = (jnp.mean(mpatch, axis=(1, 2, 3)) == 0).astype(m.dtype)[:, None]  # [L_b, 1]
  att = jax.nn.softmax(m * valid * softmax_scale, axis=0) * valid  # [L_b, L_f]
  att = att.T.reshape(hf, wf, hb * wb)
  # Paste the raw patches: transposed convolution, stride `rate`, padding 1, as a dilated correlation.
  kt = 2 * rate
  rk = jnp.flip(jnp.transpose(raw, (1, 2, 0, 3)), axis=(0, 1))  # [kt, kt, L, C]
  out = jax.lax.conv_general_dilated(att[None], rk, (1, 1), ((kt - 2, kt - 2), (kt - 2, kt - 2)),
                                     lhs_dilation=(rate, rate), dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
  return out / 4.


def contextual_attention(f, b, mask, *, ksize: int = 3, rate: int = 2, fuse_k: int = 3,
                         softmax_scale: float = 10., fuse: bool = True, ca_mask: str = "sample",
                         eps: float = 1e-4):
  """Contextual attention (DeepFill v1, arXiv:1801.07892) as configured by HealthiVert-GAN.

  f, b: foreground / background features [B, h, w, C] (the generator passes the same tensor); mask: [B, hm, wm, 1]
  the hole mask at 1/(4 rate) of the image resolution, i.e. the resolution of b after the 1/rate downsampling.
  Scores s[l_b, l_f] = <f patch, b patch / max(|b patch|, eps)> (3x3 patches of f, b nearest-downsampled by
  `rate`), optionally fused twice with a `fuse_k` identity kernel (in row-major, then column-major position order),
  restricted to valid background patches (no hole pixel in their 3x3 mask patch):
  y = softmax(scale * s * valid) * valid; the output pastes the 2 rate x 2 rate raw patches of b weighted by y
  (transposed convolution, stride rate, padding 1) / 4 and has the shape of f.
  `ca_mask`: "sample" (each sample's own mask) or "first" (sample 0's mask for the batch, the reference's).
  """
  _check_choice("ca_mask", ca_mask, CA_MASKS)
  if f.ndim != 4 or b.shape != f.shape:
    raise ValueError(f"f and b must be equal [B, h, w, C] arrays, got {f.shape} and {b.shape}")
  if mask.shape[1:3] != (f.shape[1] // rate, f.shape[2] // rate):
    raise ValueError(f"mask must have spatial size {(f.shape[1] // rate, f.shape[2] // rate)} (features / rate), "
                     f"got {mask.shape}")
  if ca_mask == "first":
    mask = jnp.broadcast_to(mask[:1], mask.shape)
  fn = lambda fi, bi, mi: _contextual_attention_one(fi, bi, mi.astype(fi.dtype), ksize=ksize, rate=rate,
                                                    fuse_k=fuse_k, softmax_scale=softmax_scale, fuse=fuse, eps=eps)
  return jax.vmap(fn)(f, b, mask)


class FineGenerator(nnx.Module):
  """Stage 2: a dilated-convolution branch and a contextual-attention branch, merged; height head 2."""

  def __init__(self, cnum: int = 16, *, rngs: nnx.Rngs, ca_mask: str = "sample"):
    _check_choice("ca_mask", ca_mask, CA_MASKS)
    c = cnum
    self.conv = nnx.List([GenConv(4, c, 5, 1, 2, rngs=rngs), GenConv(c, c, 3, 2, 1, rngs=rngs),
                          GenConv(c, 2 * c, rngs=rngs), GenConv(2 * c, 2 * c, 3, 2, 1, rngs=rngs),
                          GenConv(2 * c, 4 * c, rngs=rngs), GenConv(4 * c, 4 * c, rngs=rngs)]
                         + [GenConv(4 * c, 4 * c, 3, 1, r, r, rngs=rngs) for r in (2, 4, 8, 16)])
    self.pm = nnx.List([GenConv(4, c, 5, 1, 2, rngs=rngs), GenConv(c, c, 3, 2, 1, rngs=rngs),
                        GenConv(c, 2 * c, rngs=rngs), GenConv(2 * c, 4 * c, 3, 2, 1, rngs=rngs),
                        GenConv(4 * c, 4 * c, rngs=rngs), GenConv(4 * c, 4 * c, activation="relu", rngs=rngs)])
    self.pm_after = nnx.List([GenConv(4 * c, 4 * c, rngs=rngs), GenConv(4 * c, 4 * c, rngs=rngs)])
    self.all11 = GenConv(8 * c, 4 * c, rngs=rngs)
    self.height = HeightHead(4 * c, rngs=rngs)
    self.all12 = GenConv(4 * c, 4 * c, rngs=rngs)
    self.all19 = GenConv(4 * c, 4 * c, rngs=rngs)
    self.all13 = GenConv(4 * c, 2 * c, rngs=rngs)
    self.all14 = GenConv(2 * c, 2 * c, rngs=rngs)
    self.all15 = GenConv(2 * c, c, rngs=rngs)
    self.all16 = GenConv(c, c // 2, rngs=rngs)
    self.all17 = GenConv(c // 2 + 1, 1, activation="none", rngs=rngs)
    self.all18 = GenConv(c // 2 + 1, 1, activation="sigmoid", rngs=rngs)
    self.ca_mask = ca_mask

  def __call__(self, masked, x_stage1, mask, coarse_seg, slice_ratio):
    xnow = jnp.concatenate([masked, coarse_seg, mask, _broadcast_ratio(slice_ratio, masked)], -1)
    x = xnow
    for layer in self.conv:
      x = layer(x)
    hallu = x
    x = xnow
    for layer in self.pm:
      x = layer(x)
    x = contextual_attention(x, x, mask[:, ::8, ::8], ca_mask=self.ca_mask)
    for layer in self.pm_after:
      x = layer(x)
    x = self.all11(jnp.concatenate([hallu, x], -1))
    p = self.height(x)
    x = _up2(self.all19(self.all12(x)))
    x = _up2(self.all14(self.all13(x)))
    x = jnp.concatenate([self.all16(self.all15(x)), x_stage1], -1)
    return jnp.clip(self.all17(x), -1., 1.), self.all18(x), p


class Generator(nnx.Module):
  """HealthiVert-GAN generator: coarse then fine stage (986,888 trainable parameters at cnum=16, any size).

  Call with masked CT [B, S, S, 1] in [-1, 1], the hole mask [B, S, S, 1], the HGAM map `cam` [B, S, S, 1] in
  [0, 1] (the Grad-CAM++ fracture attention of the context rows; the decoder sees 1 - cam) and `slice_ratio` [B].
  Returns a dict: x_stage1, coarse_seg, p1 (coarse) and x_stage2, fine_seg, p2 (fine).
  """

  def __init__(self, cnum: int = 16, *, rngs: nnx.Rngs, ca_mask: str = "sample"):
    self.coarse = CoarseGenerator(cnum, rngs=rngs)
    self.fine = FineGenerator(cnum, rngs=rngs, ca_mask=ca_mask)

  def __call__(self, masked, mask, cam, slice_ratio):
    if masked.ndim != 4 or masked.shape[-1] != 1 or masked.shape[1] % 8 or masked.shape[2] % 8:
      raise ValueError(f"masked must be [B, S, S, 1] with S a multiple of 8, got {masked.shape}")
    for name, a in (("mask", mask), ("cam", cam)):
      if a.shape != masked.shape:
        raise ValueError(f"{name} must have the shape of masked {masked.shape}, got {a.shape}")
    x1, seg1, p1 = self.coarse(masked, mask, 1. - cam, slice_ratio)
    x2, seg2, p2 = self.fine(masked, x1, mask, seg1, slice_ratio)
    return {"x_stage1": x1, "coarse_seg": seg1, "p1": p1, "x_stage2": x2, "fine_seg": seg2, "p2": p2}


def _normal(std, mean=0.):
  return lambda key, shape, dtype=jnp.float32: mean + std * jax.random.normal(key, shape, dtype)


class PatchDiscriminator(nnx.Module):
  """pix2pix 70x70 PatchGAN (n_layers=3, BatchNorm): [B, S, S, cin] -> logits [B, S/8 - 2, S/8 - 2, 1].

  Conv4x4/2 (bias) - LReLU, then (Conv4x4, no bias) - BatchNorm - LReLU with 128/2, 256/2, 512/1 channels/stride,
  Conv4x4/1 -> 1 (bias); LeakyReLU slope 0.2, padding 1; weights N(0, 0.02), BatchNorm scale N(1, 0.02), biases 0.
  2,763,585 parameters at cin=1, ndf=64. BatchNorm uses batch statistics in training mode (the reference keeps
  the discriminators in training mode throughout).
  """

  def __init__(self, cin: int = 1, ndf: int = 64, n_layers: int = 3, *, rngs: nnx.Rngs):
    conv = lambda a, b, s, bias: nnx.Conv(a, b, (4, 4), (s, s), padding=((1, 1), (1, 1)), use_bias=bias,
                                          kernel_init=_normal(0.02), rngs=rngs)
    bn = lambda ch: nnx.BatchNorm(ch, momentum=0.9, epsilon=1e-5, scale_init=_normal(0.02, 1.), rngs=rngs)
    self.first = conv(cin, ndf, 2, True)
    mids, norms, prev = [], [], ndf
    for n in range(1, n_layers + 1):
      ch = ndf * min(2 ** n, 8)
      mids.append(conv(prev, ch, 2 if n < n_layers else 1, False))
      norms.append(bn(ch))
      prev = ch
    self.mids, self.norms = nnx.List(mids), nnx.List(norms)
    self.last = conv(prev, 1, 1, True)

  def __call__(self, x):
    x = jax.nn.leaky_relu(self.first(x), 0.2)
    for c, n in zip(self.mids, self.norms):
      x = jax.nn.leaky_relu(n(c(x)), 0.2)
    return self.last(x)


def _per_sample(fn):
  return jax.vmap(fn)


def context_shift(x, x1, x2, *, band: int = BAND):
  """Move the context rows next to a `band`-row hole centred on the vertebra rows [x1, x2] (data preparation).

  x: [B, S, W, C]; x1, x2: [B] int (first and last row of the target vertebra, x2 - x1 < band). Returns
  (shifted x, hole mask [B, S, W, 1], min_x [B]): rows [0, min_x) hold original rows [x1 - min_x, x1), rows
  [min_x + band, S) hold original rows [x2, x2 + S - min_x - band), the hole rows are 0.
  """
  s = x.shape[1]
  if band >= s:
    raise ValueError(f"band must be smaller than the image height {s}, got {band}")

  def one(xi, a, b):
    min_x = jnp.clip((a + b) // 2 - band // 2, 0, s - band)
    r = jnp.arange(s)
    src = jnp.where(r < min_x, a - min_x + r, b + r - min_x - band)
    hole = (r >= min_x) & (r < min_x + band)
    out = jnp.where(hole[:, None, None], 0, xi[jnp.clip(src, 0, s - 1)])
    return out, jnp.broadcast_to(hole[:, None, None], xi.shape[:2] + (1,)).astype(xi.dtype), min_x

  return _per_sample(one)(x, jnp.asarray(x1), jnp.asarray(x2))


def shrm_compose(real, generated, p, height, x1, x2, *, band: int = BAND):
  """SHRM crop-and-shift: paste the generated rows of the predicted healthy height between the real context.

  real, generated: [B, S, W, C]; p: [B] height-head output (no gradient flows through it here); height, x1, x2:
  [B] int (H = x2 - x1 in the reference data). With h = max(ceil(band p), H), d = h - H, u = x1 - d//2, b = u + h:
  rows [0, u) <- real rows [d//2, x1); rows [u, b) <- generated rows [u, b); rows [b, S) <- real rows
  [x2, x2 + S - b). Source rows outside the image are clipped to its border.
  """
  s = real.shape[1]

  def one(ri, gi, pi, hi, a, bb):
    h = jnp.maximum(jnp.ceil(jax.lax.stop_gradient(pi) * band).astype(jnp.int32), hi)
    d = h - hi
    u = a - d // 2
    b = u + h
    r = jnp.arange(s)
    src = jnp.where(r < u, d // 2 + r, bb + r - b)
    ctx = ri[jnp.clip(src, 0, s - 1)]
    return jnp.where(((r >= u) & (r < b))[:, None, None], gi, ctx)

  return _per_sample(one)(real, generated, p, jnp.asarray(height, jnp.int32), jnp.asarray(x1, jnp.int32),
                          jnp.asarray(x2, jnp.int32))


def local_crop(image, mask, *, half_width: int = LOCAL_HALF_WIDTH):
  """The third discriminator's input: mask * image * 1[column in [W/2 - half_width, W/2 + half_width))."""
  w = image.shape[2]
  cols = jnp.arange(w)
  centre = ((cols >= w // 2 - half_width) & (cols < w // 2 + half_width)).astype(image.dtype)
  return mask * image * centre[None, None, :, None]


def mask_switch(seg, mode: str = "soft", threshold: float = 0.5):
  """The segmentation handed to D2 and to the edge loss.

  "soft": seg (differentiable, default); "hard": 1[seg > threshold] (the reference, zero gradient).
  """
  _check_choice("mask_mode", mode, MASK_MODES)
  if mode == "soft":
    return seg
  return jax.lax.stop_gradient((seg > threshold).astype(seg.dtype))


def healthivert_forward(generator: Generator, batch: dict[str, Any], *, band: int = BAND,
                        mask_mode: str = "soft", local_half_width: int = LOCAL_HALF_WIDTH) -> dict[str, Any]:
  """Generator outputs plus every tensor of the losses and discriminators.

  batch: 'masked', 'mask', 'cam' [B, S, S, 1] (generator inputs, `context_shift`ed), 'slice_ratio' [B], 'real'
  [B, S, S, 1] (the original slice), 'height', 'x1', 'x2' [B] int. Adds to the generator's dict: 'fake'
  (stage 2 composed by `shrm_compose` with p2), 'fake_coarse' (stage 1 with p1), 'fake_mask' (fine_seg through
  `mask_switch(mask_mode)`, D2's input and the edge loss's), 'fake_local' / 'real_local' (`local_crop` of the
  composites with the hole mask), 'h1', 'h2' (predicted heights band * p).
  """
  out = dict(generator(batch["masked"], batch["mask"], batch["cam"], batch["slice_ratio"]))
  hx = (batch["height"], batch["x1"], batch["x2"])
  out["fake"] = shrm_compose(batch["real"], out["x_stage2"], out["p2"], *hx, band=band)
  out["fake_coarse"] = shrm_compose(batch["real"], out["x_stage1"], out["p1"], *hx, band=band)
  out["fake_mask"] = mask_switch(out["fine_seg"], mask_mode)
  out["fake_local"] = local_crop(out["fake"], batch["mask"], half_width=local_half_width)
  out["real_local"] = local_crop(batch["real"], batch["mask"], half_width=local_half_width)
  out["h1"], out["h2"] = band * out["p1"], band * out["p2"]
  return out
