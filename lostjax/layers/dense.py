"""Dense linear layer, y = x @ W with W of layout [d_in, d_out] (no bias, as in LLaMA)."""

from __future__ import annotations

import jax
from flax import nnx

from lostjax import sharding
from lostjax.layers import common


class Dense(nnx.Module):
  """y = x @ kernel; parameters in `param_dtype`, compute in `dtype`."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=(None, None),
               init_std: float = 0.02, dtype="float32", param_dtype="float32"):
    common.check_dims(d_in, d_out)
    self.d_in, self.d_out = d_in, d_out
    self.out_axis = sharding.activation_axis(axes[1])
    self.dtype = common.resolve_dtype(dtype)
    pdt = common.resolve_dtype(param_dtype)
    w = common.dense_init(rngs.params(), d_in, d_out, init_std)
    self.kernel = common.param(w.astype(pdt), tuple(axes))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    y = sharding.gathered_call(lambda w, x: common.matmul(x.astype(dt), w.astype(dt)), (self.kernel,), x)
    return sharding.constrain_tokens(y, self.out_axis)
