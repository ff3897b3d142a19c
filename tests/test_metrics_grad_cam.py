"""Grad-CAM++ of an NNX classifier vs a float64 numpy transcription with closed-form gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lostjax.metrics import grad_cam as G


class TinyNet(nnx.Module):
  """conv (the explained layer) -> ReLU -> global mean -> linear: dS/dA = 1[A > 0] W[:, k] / (h w)."""

  def __init__(self, rngs):
    self.body = nnx.List([nnx.Conv(2, 3, (3, 3), padding="VALID", rngs=rngs)])
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    a = jax.nn.relu(self.body[0](x))
    return self.head(jnp.mean(a, axis=(1, 2)))


def np_reference(net, x, k):
  w = np.asarray(net.body[0].kernel[...], np.float64)  # [3, 3, 2, 3]
  b = np.asarray(net.body[0].bias[...], np.float64)
  wl, bl = np.asarray(net.head.kernel[...], np.float64), np.asarray(net.head.bias[...], np.float64)
  x = np.asarray(x, np.float64)
  bsz, h, wd, _ = x.shape
  oh, ow = h - 2, wd - 2
  a = np.zeros((bsz, oh, ow, 3))
  for i in range(oh):
    for j in range(ow):
      a[:, i, j] = np.einsum("bhwc,hwco->bo", x[:, i:i + 3, j:j + 3], w) + b
  score = np.maximum(a, 0).mean(axis=(1, 2)) @ wl[:, k] + bl[k]
  g = (a > 0) * wl[None, None, None, :, k] / (oh * ow)
  cams = []
  for n in range(bsz):
    g2, g3 = g[n] ** 2, g[n] ** 3
    den = 2 * g2 + a[n].sum(axis=(0, 1)) * g3 + 1e-7
    alpha = np.where(den != 0, g2 / np.where(den != 0, den, 1), 0)
    weights = (alpha * np.maximum(np.exp(score[n]) * g[n], 0)).sum(axis=(0, 1))
    cams.append(np.maximum((a[n] * weights).sum(-1), 0))
  return np.array(cams)


def test_grad_cam_plus_plus_matches_numpy():
  net = TinyNet(nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(3, 7, 6, 2)).astype(np.float32)
  raw = np_reference(net, x, 1)
  got = G.grad_cam_plus_plus(net, jnp.asarray(x), jnp.array([1, 1, 1]), layer="body.0", normalize="none")
  np.testing.assert_allclose(np.asarray(got), raw, rtol=1e-4, atol=1e-7)
  norm = (raw - raw.min()) / (raw - raw.min()).max()
  got = G.grad_cam_plus_plus(net, jnp.asarray(x), 1, layer=("body", 0))  # default: batch normalisation
  np.testing.assert_allclose(np.asarray(got), norm, rtol=1e-4, atol=1e-6)
  per = G.grad_cam_plus_plus(net, jnp.asarray(x), 1, layer="body.0", normalize="sample")
  np.testing.assert_allclose(np.asarray(per), (raw - raw.min((1, 2), keepdims=True))
                             / (raw - raw.min((1, 2), keepdims=True)).max((1, 2), keepdims=True), rtol=1e-4, atol=1e-6)
  assert G._cam_from(jnp.asarray(got)[..., None], jnp.ones((3, 5, 4, 1)), jnp.zeros(3), "none",
                    (7, 6)).shape == (3, 7, 6)  # resize_to
  # the classifier is untouched
  assert isinstance(net.body[0], nnx.Conv)
  with pytest.raises(ValueError, match="no submodule 'conv9'"):
    G.grad_cam_plus_plus(net, jnp.asarray(x), 1, layer="conv9")
  with pytest.raises(ValueError, match="normalize"):
    G.grad_cam_plus_plus(net, jnp.asarray(x), 1, layer="body.0", normalize="max")
