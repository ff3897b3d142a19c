"""CoLA (arXiv 2502.10940) as the `cola` method: low-rank projections h = σ(x A) B with σ = SiLU, checked against a
float64 numpy transcription; the preset builds exactly that layer."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lostjax.layers import LowRank, make_linear
from train.configs import base


def test_cola_layer_matches_numpy():
  mc = base.model_config("tiny", "cola")
  layer = make_linear(mc.attn_kind, 24, 16, rngs=nnx.Rngs(0), rank=4, activation=mc.lowrank_act,
                      lowrank_init=mc.lowrank_init)
  assert isinstance(layer, LowRank) and layer.rank == 4
  a, b = np.asarray(layer.a[...], np.float64), np.asarray(layer.b[...], np.float64)
  x = np.random.default_rng(0).normal(size=(3, 24))
  h = x @ a
  want = (h / (1.0 + np.exp(-h))) @ b                   # SiLU(z) = z·sigmoid(z)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))), want, rtol=1e-5, atol=1e-7)
  # Random factors (not an SVD split): A and B have independent scales, A·B has the dense init's variance 0.02².
  big = make_linear("lowrank", 96, 96, rngs=nnx.Rngs(1), rank=16, activation="silu", lowrank_init=mc.lowrank_init)
  w = np.asarray(big.a[...]) @ np.asarray(big.b[...])
  assert 0.016 < w.std() < 0.024
