"""Grad-CAM++ class-activation maps of any Flax NNX classifier.

Paper: "Grad-CAM++: Improved Visual Explanations for Deep Convolutional Networks", Chattopadhay et al.,
arXiv:1710.11063 (WACV 2018); used as the HGAM attention of "HealthiVert-GAN", arXiv:2503.05990, in the form of
its released code. With A the target layer's activations [h, w, C] of one sample, S its class score and
g = dS/dA:

    alpha = g^2 / (2 g^2 + (sum_hw A) g^3 + 1e-7)        (0 where the denominator is 0)
    w_c   = sum_hw alpha * ReLU(exp(S) g)                 (exp(S): the paper's exponential score)
    cam   = ReLU(sum_c w_c A_c),   cam <- (cam - min) / max(cam - min)

The gradient is taken with `jax.vjp` through the classifier with a zero probe added to the target layer's
output, so the layer is named by its attribute path in the module (e.g. "layer4.2.conv1" or ("blocks", 2,
"conv")); nothing in the classifier has to change. `normalize`: "batch" divides by the min/max over the whole
batch of maps (the reference normalises the stack of a vertebra's slices together), "sample" per map, "none"
returns the raw ReLU map (an all-zero map stays zero). `resize_to` upsamples the maps bilinearly
(jax.image.resize), e.g. to the input size.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

NORMALIZE = ("batch", "sample", "none")


def grad_cam_plus_plus_weights(features, grads, score):
  """The Grad-CAM++ channel weights w_c of features / gradients [B, h, w, C] and scores [B] -> [B, C]."""
  g2, g3 = grads ** 2, grads ** 3
  total = jnp.sum(features, axis=(1, 2), keepdims=True)
  denom = 2 * g2 + total * g3 + 1e-7
  alpha = jnp.where(denom != 0, g2 / jnp.where(denom != 0, denom, 1.), 0.)
  pos = jax.nn.relu(jnp.exp(score)[:, None, None, None] * grads)
  return jnp.sum(alpha * pos, axis=(1, 2))


def _split_path(layer):
  if isinstance(layer, str):
    return [int(p) if p.isdigit() else p for p in layer.split(".")]
  return list(layer)


def _get(obj, key):
  return obj[key] if isinstance(key, int) else getattr(obj, key)


def _set(obj, key, value):
  if isinstance(key, int):
    obj[key] = value
  else:
    setattr(obj, key, value)


class _Probe(nnx.Module):
  """Wraps the target layer: its output goes through `hook` (adds the zero probe and records the features)."""

  def __init__(self, inner, hook):
    self.inner = inner
    self.hook = hook

  def __call__(self, *args, **kwargs):
    return self.hook(self.inner(*args, **kwargs))


def grad_cam_plus_plus(model: nnx.Module, x, target_class: Union[int, jax.Array], *,
                       layer: Union[str, Sequence[Union[str, int]]],
                       call: Optional[Callable] = None, normalize: str = "batch",
                       resize_to: Optional[Sequence[int]] = None):
  """Grad-CAM++ maps [B, h, w] (or `resize_to`) of `model`'s class `target_class` at the layer `layer`.

  model: an NNX classifier (put it in eval mode first if it has dropout / BatchNorm); x: its input batch;
  target_class: int or [B] ints; layer: attribute path of the submodule whose NHWC output [B, h, w, C] is
  explained; call: `call(model, x) -> logits [B, K]` (default `model(x)`). The model is not modified.
  """
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
  path = _split_path(layer)
  if not path:
    raise ValueError(f"layer must name a submodule, got {layer!r}")
  call = call or (lambda m, inp: m(inp))
  obj = model
  for k in path:
    try:
      obj = _get(obj, k)
    except (AttributeError, IndexError, KeyError, TypeError):
      raise ValueError(f"layer {layer!r}: the model has no submodule {k!r} on that path") from None
  graphdef, state = nnx.split(model)

  def forward(probe, state, x, target_class):
    m = nnx.merge(graphdef, state)
    parent = m
    for k in path[:-1]:
      parent = _get(parent, k)
    box = []

    def hook(out):
      out = out + probe
      box.append(out)
      return out
    _set(parent, path[-1], _Probe(_get(parent, path[-1]), hook))
    logits = call(m, x)
    cls = jnp.broadcast_to(jnp.asarray(target_class), logits.shape[:1])
    score = jnp.take_along_axis(logits, cls[:, None], 1)[:, 0]
    return jnp.sum(score), (box[-1], score)

  def cam(state, x, target_class):
    feat = jax.eval_shape(lambda: forward(0., state, x, target_class)[1][0])
    if len(feat.shape) != 4:
      raise ValueError(f"layer {layer!r} must output [B, h, w, C] features, got shape {feat.shape}")
    total, vjp_fn, (features, score) = jax.vjp(lambda p: forward(p, state, x, target_class),
                                               jnp.zeros(feat.shape, feat.dtype), has_aux=True)
    (grads,) = vjp_fn(jnp.ones_like(total))
    return _cam_from(features, grads, score, normalize, resize_to)

  return jax.jit(cam)(state, x, target_class)  # one compiled program instead of op-by-op dispatch


def _cam_from(features, grads, score, normalize, resize_to):
  w = grad_cam_plus_plus_weights(features, grads, score)
  cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", features, w))
  if normalize == "batch":
    cam = cam - jnp.min(cam)
    cam = cam / jnp.where(jnp.max(cam) > 0, jnp.max(cam), 1.)
  elif normalize == "sample":
    cam = cam - jnp.min(cam, axis=(1, 2), keepdims=True)
    top = jnp.max(cam, axis=(1, 2), keepdims=True)
    cam = cam / jnp.where(top > 0, top, 1.)
  if resize_to is not None:
    cam = jax.image.resize(cam, (cam.shape[0], *resize_to), "bilinear")
  return cam
