"""lostjax.layers.group.grouped_call: which layer groups share work, and equality with separate calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lostjax import kernels
from lostjax.layers import Dense, LowRank, Lost
from lostjax.layers import group


def _layers(kind, n=3, **kw):
  rngs = nnx.Rngs(0)
  if kind == "dense":
    return [Dense(24, 16, rngs=rngs, **kw) for _ in range(n)]
  if kind == "lowrank":
    return [LowRank(24, 16, rank=4, rngs=rngs, activation="silu", **kw) for _ in range(n)]
  return [Lost(24, 16, rank=4, sparsity=0.25, rngs=rngs, activation="silu", **kw) for _ in range(n)]


@pytest.mark.parametrize("kind,kw,shared", [
    ("dense", {}, True), ("lowrank", {}, True), ("lost", dict(sparse_impl="fused_concat"), True),
    ("lost", dict(sparse_impl="fused_onehot"), True), ("lost", dict(sparse_impl="gather_xla"), False),
    ("lost", dict(sparse_impl="fused"), True),  # legacy alias of fused_concat
])
def test_grouped_equals_separate(kind, kw, shared, monkeypatch):
  layers = _layers(kind, **kw)
  calls = []
  real = kernels.lost_group_matmul
  monkeypatch.setattr(kernels, "lost_group_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
  x = jax.random.normal(jax.random.key(1), (2, 5, 24))
  got = group.grouped_call(layers, x)
  assert len(got) == 3
  for y, layer in zip(got, layers):
    np.testing.assert_allclose(np.asarray(y), np.asarray(layer(x)), rtol=1e-5, atol=1e-6)
  assert bool(calls) == (kind == "lost" and shared)


def test_mixed_or_single_layers_fall_back():
  rngs = nnx.Rngs(0)
  mixed = [Dense(24, 16, rngs=rngs), LowRank(24, 16, rank=4, rngs=rngs)]
  x = jnp.ones((3, 24))
  for y, layer in zip(group.grouped_call(mixed, x), mixed):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(layer(x)))
  (y,) = group.grouped_call(mixed[:1], x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(mixed[0](x)))
  # different output widths cannot be stacked: separate calls
  uneven = [Dense(24, 16, rngs=rngs), Dense(24, 8, rngs=rngs)]
  assert [y.shape for y in group.grouped_call(uneven, x)] == [(3, 16), (3, 8)]


def test_bf16_dense_group():
  layers = _layers("dense", dtype="bfloat16")
  x = jax.random.normal(jax.random.key(1), (4, 24))
  for y, layer in zip(group.grouped_call(layers, x), layers):
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(layer(x), np.float32), rtol=1e-2, atol=1e-2)
