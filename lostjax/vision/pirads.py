"""PI-RADS v2 prostate zone segmentation: the 3-D U-Net baseline and the co-training dual-path multi-task model.

Paper: A. Das, S. Ghosh, S. Stober, "PI-RADS v2 Compliant Automated Segmentation of Prostate Zones Using
co-training Motivated Multi-task Dual-Path CNN", arXiv:2309.12970. T2-weighted prostate MRI is segmented into the
four PI-RADS v2 zones: peripheral zone (PZ), transition zone (TZ), distal prostatic urethra (DPU) and anterior
fibromuscular stroma (AFS). The zones are not all adjacent and not all present in every slice, so the model has two
branches, each responsible for a group of *connected* zones; training is supervised first and then fine-tuned with
an unsupervised term that penalises disagreement of the two branches on the same class (co-training), plus an
auxiliary task (multi-task learning). Losses: `losses/pirads.py`; metrics: `lostjax/metrics/segmentation.py`.

`UNet3D` (the baseline; the encoder–decoder also used by each path). Volumes are [B, z, y, x, C] (channels last);
s = `filters` (16); every 3x3x3 convolution is 'SAME', followed by ReLU and then BatchNorm:
  down1    conv s, conv 2s                → skip1 → max-pool (1, 2, 2)
  down2    conv 2s, conv 4s               → skip2 → max-pool (1, 2, 2)
  level3   conv 4s, conv 8s               → skip3 → max-pool (2, 2, 2)
  bottom   conv 16s, dropout, conv 16s
  up5      convT 16s (k 2, stride 2,2,2) + ReLU, concat skip3, conv 8s, dropout, conv 8s
  up6      convT 8s (stride 1,2,2) + ReLU, concat skip2, conv 4s, dropout, conv 4s
  up7      convT 4s (stride 1,2,2) + ReLU, concat skip1, conv 2s, dropout, conv 2s
  head     1x1x1 conv → num_classes logits (softmax in the loss)
so z must be divisible by 2 and y, x by 8. Classes are ordered [zones..., background] (background last), as in
the lab's code ([PZ, TZ, DPU, AFS, BG]).

`DualPathUNet` (ASSUMED design, the paper's body and code could not be consulted; every choice is a field of
`PiradsConfig`): two paths A and B with the baseline architecture read the same input, without weight sharing by
default (`share_encoder=True` shares the encoder). Each path predicts all classes; path A *owns* the zones of
`partition[0]` ({PZ, TZ} by default), path B those of `partition[1]` ({DPU, AFS}). Multi-task head per path: a
1x1x1 conv + tanh regressing the signed distance maps of the path's own zones (`signed_distance_maps`, negative
inside, scaled to [-1, 1] per zone and volume). The combined prediction takes each zone's probability from its
owner and averages the two background probabilities (`combine_paths`); the label is its argmax.

Deviations from the lab baseline (Keras): Glorot-uniform kernels and BatchNorm momentum 0.99 / epsilon 1e-3 are
the Keras defaults kept here; the transposed convolutions have no BatchNorm (the listing gives only ReLU); dropout
is active when `train=True` or `mc_dropout=True` (the lab keeps it on at test time for MC-dropout; here it is off
unless asked). The modules are used functionally: `nnx.split(model, nnx.Param, nnx.BatchStat)` outside, `nnx.merge`
inside a jitted step; dropout takes a `key` argument instead of holding RNG state. On CPU, initialise with an 'rbg'
key (`nnx.Rngs(jax.random.key(0, impl="rbg"))`): threefry initialisers of 3-D kernels take seconds to compile.
`recompute_batch_stats` re-estimates the BatchNorm statistics on a set of volumes after training ("precise BN"):
after a short run the momentum-0.99 running averages are far from the trained network's statistics.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_KERNEL_INIT = jax.nn.initializers.glorot_uniform()


@dataclasses.dataclass(frozen=True)
class PiradsConfig:
  """Zones, their partition between the two paths, and the network sizes.

  zones: zone names in class order (background is the extra last class). partition: two tuples of zone names,
  each zone in exactly one (the alternative {PZ} vs {TZ, DPU, AFS} follows the TZ/DPU adjacency)."""
  zones: Tuple[str, ...] = ("PZ", "TZ", "DPU", "AFS")
  partition: Tuple[Tuple[str, ...], Tuple[str, ...]] = (("PZ", "TZ"), ("DPU", "AFS"))
  filters: int = 16
  dropout: float = 0.5
  in_channels: int = 1
  share_encoder: bool = False
  sdm_head: bool = True
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3

  def __post_init__(self):
    zones = tuple(self.zones)
    if len(zones) < 2 or len(set(zones)) != len(zones):
      raise ValueError(f"zones must be at least two distinct names, got {self.zones!r}")
    if len(self.partition) != 2 or any(len(p) == 0 for p in self.partition):
      raise ValueError(f"partition must be two non-empty groups of zones, got {self.partition!r}")
    flat = [z for p in self.partition for z in p]
    if sorted(flat) != sorted(zones):
      raise ValueError(f"partition must put each of {zones} in exactly one path, got {self.partition!r}")
    if not isinstance(self.filters, int) or self.filters < 1:
      raise ValueError(f"filters must be a positive int, got {self.filters!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
    if not isinstance(self.in_channels, int) or self.in_channels < 1:
      raise ValueError(f"in_channels must be a positive int, got {self.in_channels!r}")

  @property
  def num_classes(self) -> int:
    return len(self.zones) + 1

  @property
  def background(self) -> int:
    return len(self.zones)

  def owned(self, path: int) -> Tuple[int, ...]:
    """Class indices supervised on `path` (0 = A, 1 = B): its own zones, then background."""
    return tuple(self.zones.index(z) for z in self.partition[path]) + (self.background,)

  @property
  def owner(self) -> Tuple[int, ...]:
    """The path (0 or 1) owning each zone, in class order."""
    return tuple(0 if z in self.partition[0] else 1 for z in self.zones)


class ConvBlock(nnx.Module):
  """3x3x3 'SAME' conv → ReLU → BatchNorm."""

  def __init__(self, cin: int, cout: int, *, momentum: float, epsilon: float, rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, (3, 3, 3), padding="SAME", kernel_init=_KERNEL_INIT, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, momentum=momentum, epsilon=epsilon, rngs=rngs)

  def __call__(self, x, *, train: bool):
    return self.bn(jax.nn.relu(self.conv(x)), use_running_average=not train)


def _dropout(rate, x, active: bool, key, index: int):
  if not active or rate == 0.0:
    return x
  if key is None:
    raise ValueError("dropout is active (train=True or mc_dropout=True) but no key was given")
  # The mask bits come from XLA's RngBitGenerator ('rbg'), seeded by the (threefry) key: threefry unrolled over
  # whole feature maps costs seconds of CPU compile time per dropout layer.
  seed = jax.random.key_data(jax.random.fold_in(key, index)).reshape(-1)[:2].astype(jnp.uint32)
  rbg = jax.random.wrap_key_data(jnp.concatenate([seed, seed ^ jnp.uint32(0x9E3779B9)]), impl="rbg")
  keep = jax.random.bernoulli(rbg, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _check_key(dropout: float, drop: bool, key):
  if drop and dropout > 0 and key is None:
    raise ValueError("dropout is active (train=True or mc_dropout=True) but no key was given")


def _check_volume(x, in_channels: int):
  if x.ndim != 5 or x.shape[-1] != in_channels:
    raise ValueError(f"input must be [B, z, y, x, {in_channels}], got shape {x.shape}")
  _, z, y, w, _ = x.shape
  if z % 2 or y % 8 or w % 8:
    raise ValueError(f"volume (z, y, x) = {(z, y, w)} must have z divisible by 2 and y, x by 8")


class Encoder3D(nnx.Module):
  """down1, down2, level3 and the bottleneck; returns (skip1, skip2, skip3, bottom)."""

  def __init__(self, in_channels: int, filters: int, dropout: float, *, momentum: float = 0.99,
               epsilon: float = 1e-3, rngs: nnx.Rngs):
    s = filters
    kw = dict(momentum=momentum, epsilon=epsilon, rngs=rngs)
    self.dropout = dropout
    self.d1a, self.d1b = ConvBlock(in_channels, s, **kw), ConvBlock(s, 2 * s, **kw)
    self.d2a, self.d2b = ConvBlock(2 * s, 2 * s, **kw), ConvBlock(2 * s, 4 * s, **kw)
    self.d3a, self.d3b = ConvBlock(4 * s, 4 * s, **kw), ConvBlock(4 * s, 8 * s, **kw)
    self.ba, self.bb = ConvBlock(8 * s, 16 * s, **kw), ConvBlock(16 * s, 16 * s, **kw)

  def __call__(self, x, *, train: bool, drop: bool, key=None):
    skip1 = self.d1b(self.d1a(x, train=train), train=train)
    h = nnx.max_pool(skip1, (1, 2, 2), strides=(1, 2, 2))
    skip2 = self.d2b(self.d2a(h, train=train), train=train)
    h = nnx.max_pool(skip2, (1, 2, 2), strides=(1, 2, 2))
    skip3 = self.d3b(self.d3a(h, train=train), train=train)
    h = nnx.max_pool(skip3, (2, 2, 2), strides=(2, 2, 2))
    h = _dropout(self.dropout, self.ba(h, train=train), drop, key, 0)
    return skip1, skip2, skip3, self.bb(h, train=train)


class Decoder3D(nnx.Module):
  """up5, up6, up7; returns the last 2s-channel feature map."""

  def __init__(self, filters: int, dropout: float, *, momentum: float = 0.99, epsilon: float = 1e-3,
               rngs: nnx.Rngs):
    s = filters
    kw = dict(momentum=momentum, epsilon=epsilon, rngs=rngs)
    ct = dict(padding="SAME", kernel_init=_KERNEL_INIT, rngs=rngs)
    self.dropout = dropout
    self.t5 = nnx.ConvTranspose(16 * s, 16 * s, (2, 2, 2), strides=(2, 2, 2), **ct)
    self.u5a, self.u5b = ConvBlock(24 * s, 8 * s, **kw), ConvBlock(8 * s, 8 * s, **kw)
    self.t6 = nnx.ConvTranspose(8 * s, 8 * s, (2, 2, 2), strides=(1, 2, 2), **ct)
    self.u6a, self.u6b = ConvBlock(12 * s, 4 * s, **kw), ConvBlock(4 * s, 4 * s, **kw)
    self.t7 = nnx.ConvTranspose(4 * s, 4 * s, (2, 2, 2), strides=(1, 2, 2), **ct)
    self.u7a, self.u7b = ConvBlock(6 * s, 2 * s, **kw), ConvBlock(2 * s, 2 * s, **kw)

  def __call__(self, feats, *, train: bool, drop: bool, key=None):
    skip1, skip2, skip3, h = feats
    for i, (t, a, b, skip) in enumerate(((self.t5, self.u5a, self.u5b, skip3), (self.t6, self.u6a, self.u6b, skip2),
                                         (self.t7, self.u7a, self.u7b, skip1))):
      h = jnp.concatenate([jax.nn.relu(t(h)), skip], axis=-1)
      h = b(_dropout(self.dropout, a(h, train=train), drop, key, i + 1), train=train)
    return h


class UNet3D(nnx.Module):
  """The baseline 3-D U-Net: [B, z, y, x, in_channels] → [B, z, y, x, num_classes] logits."""

  def __init__(self, num_classes: int = 5, *, filters: int = 16, dropout: float = 0.5, in_channels: int = 1,
               bn_momentum: float = 0.99, bn_epsilon: float = 1e-3, rngs: nnx.Rngs):
    if not isinstance(num_classes, int) or num_classes < 2:
      raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    kw = dict(momentum=bn_momentum, epsilon=bn_epsilon, rngs=rngs)
    self.in_channels = in_channels
    self.encoder = Encoder3D(in_channels, filters, dropout, **kw)
    self.decoder = Decoder3D(filters, dropout, **kw)
    self.head = nnx.Conv(2 * filters, num_classes, (1, 1, 1), kernel_init=_KERNEL_INIT, rngs=rngs)

  def __call__(self, x, *, train: bool = False, key: Optional[jax.Array] = None, mc_dropout: bool = False):
    _check_volume(x, self.in_channels)
    drop = train or mc_dropout
    _check_key(self.encoder.dropout, drop, key)
    k_enc, k_dec = (None, None) if key is None else tuple(jax.random.split(key))
    h = self.decoder(self.encoder(x, train=train, drop=drop, key=k_enc), train=train, drop=drop, key=k_dec)
    return self.head(h)


class DualPathUNet(nnx.Module):
  """Two U-Net paths with their own zones and signed-distance heads (see the module docstring).

  Returns {'logits_a', 'logits_b': [B, z, y, x, num_classes], 'sdm_a', 'sdm_b': [B, z, y, x, |own zones|]}
  (the SDM entries only with `cfg.sdm_head`)."""

  def __init__(self, cfg: PiradsConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(momentum=cfg.bn_momentum, epsilon=cfg.bn_epsilon, rngs=rngs)
    s = cfg.filters
    self.encoder_a = Encoder3D(cfg.in_channels, s, cfg.dropout, **kw)
    self.encoder_b = None if cfg.share_encoder else Encoder3D(cfg.in_channels, s, cfg.dropout, **kw)
    self.decoder_a = Decoder3D(s, cfg.dropout, **kw)
    self.decoder_b = Decoder3D(s, cfg.dropout, **kw)
    head = dict(kernel_init=_KERNEL_INIT, rngs=rngs)
    self.head_a = nnx.Conv(2 * s, cfg.num_classes, (1, 1, 1), **head)
    self.head_b = nnx.Conv(2 * s, cfg.num_classes, (1, 1, 1), **head)
    if cfg.sdm_head:
      self.sdm_a = nnx.Conv(2 * s, len(cfg.partition[0]), (1, 1, 1), **head)
      self.sdm_b = nnx.Conv(2 * s, len(cfg.partition[1]), (1, 1, 1), **head)

  def __call__(self, x, *, train: bool = False, key: Optional[jax.Array] = None, mc_dropout: bool = False):
    _check_volume(x, self.cfg.in_channels)
    drop = train or mc_dropout
    _check_key(self.cfg.dropout, drop, key)
    keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
    feats_a = self.encoder_a(x, train=train, drop=drop, key=keys[0])
    enc_b = self.encoder_a if self.encoder_b is None else self.encoder_b
    feats_b = feats_a if self.encoder_b is None else enc_b(x, train=train, drop=drop, key=keys[1])
    h_a = self.decoder_a(feats_a, train=train, drop=drop, key=keys[2])
    h_b = self.decoder_b(feats_b, train=train, drop=drop, key=keys[3])
    out = {"logits_a": self.head_a(h_a), "logits_b": self.head_b(h_b)}
    if self.cfg.sdm_head:
      out["sdm_a"] = jnp.tanh(self.sdm_a(h_a))
      out["sdm_b"] = jnp.tanh(self.sdm_b(h_b))
    return out


def recompute_batch_stats(model, volumes, *, key: Optional[jax.Array] = None):
  """BatchNorm statistics of `model` (UNet3D or DualPathUNet) re-estimated on `volumes`, dropout off.

  Returns the new `nnx.BatchStat` state (apply it with `nnx.update(model, stats)`); `model` is not changed. Every
  BatchNorm layer's running mean and variance become the mean and (biased) variance of its input over all of
  `volumes` [B, z, y, x, C], computed in one forward pass with the dropout rate set to 0, so evaluation mode then
  normalises exactly as training mode would on that set. This is "precise BN" (Wu & Johnson, "Rethinking 'Batch'
  in BatchNorm", arXiv:2105.07576): after a short training run the exponential running averages (momentum 0.99)
  still carry their initial values and the statistics of early weights, and the features behind a dropout layer
  have a larger variance in training than at test time; both make evaluation mode disagree with what was trained.
  Jit-compatible (call it on a merged model inside `jax.jit`). `key` is unused (dropout is off); it defaults to a
  fixed key so the dual-path model's key check passes."""
  m = nnx.clone(model)
  for _, node in nnx.iter_graph(m):
    if isinstance(node, nnx.BatchNorm):
      node.momentum = 0.0
    elif isinstance(node, (Encoder3D, Decoder3D)):
      node.dropout = 0.0
  m(volumes, train=True, key=jax.random.key(0) if key is None else key)
  return nnx.state(m, nnx.BatchStat)


def combine_paths(probs_a, probs_b, cfg: PiradsConfig):
  """Per-class scores of the dual-path model: each zone from its owning path, background = mean of both.

  probs_a, probs_b: [..., num_classes] softmax outputs. The result does not sum to 1; take its argmax for labels
  or threshold a zone at 0.5."""
  pa, pb = jnp.asarray(probs_a), jnp.asarray(probs_b)
  if pa.shape != pb.shape or pa.shape[-1] != cfg.num_classes:
    raise ValueError(f"probs_a and probs_b must both be [..., {cfg.num_classes}], got {pa.shape} and {pb.shape}")
  take_b = jnp.asarray(cfg.owner + (0,), bool)
  mixed = jnp.where(take_b, pb, pa)
  return mixed.at[..., cfg.background].set(0.5 * (pa[..., cfg.background] + pb[..., cfg.background]))


def signed_distance_maps(labels, zone_ids: Sequence[int], spacing=None) -> np.ndarray:
  """Normalised signed distance maps of zones (host-side numpy/scipy; the multi-task regression targets).

  labels: integer volume(s) [..., z, y, x] (a leading batch axis is handled per volume); zone_ids: label values.
  Per zone and volume, with d_out the distance (mm, `spacing`) of a background voxel to the zone and d_in the
  distance of a zone voxel to the background:  sdm = d_out / max d_out − d_in / max d_in  ∈ [−1, 1], negative
  inside. A zone absent from a volume gives +1 everywhere; a zone filling it, −1. Returns float32
  [..., z, y, x, len(zone_ids)]."""
  from scipy import ndimage
  lab = np.asarray(labels)
  if lab.ndim < 3 or not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f"labels must be an integer volume [..., z, y, x], got shape {lab.shape} {lab.dtype}")
  vols = lab.reshape((-1,) + lab.shape[-3:])
  s = np.ones(3) if spacing is None else np.asarray(spacing, np.float64)
  if s.shape != (3,) or np.any(s <= 0):
    raise ValueError(f"spacing must be 3 positive values (z, y, x), got {spacing!r}")
  out = np.zeros(vols.shape + (len(zone_ids),), np.float32)
  for v, vol in enumerate(vols):
    for j, zid in enumerate(zone_ids):
      m = vol == zid
      if not m.any():
        out[v, ..., j] = 1.0
      elif m.all():
        out[v, ..., j] = -1.0
      else:
        d_out = ndimage.distance_transform_edt(~m, sampling=s)
        d_in = ndimage.distance_transform_edt(m, sampling=s)
        out[v, ..., j] = d_out / d_out.max() - d_in / d_in.max()
  return out.reshape(lab.shape + (len(zone_ids),))
