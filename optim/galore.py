"""GaLore (Gradient Low-Rank Projection), faithful to the PyTorch reference, as an optax transform.

Paper: Zhao, Zhang, Chen, Wang, Anandkumar, Tian, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv 2403.03507 (Alg. 2). Reference code: `jiaweizzhao/GaLore` (galore_torch/adamw.py,
galore_torch/galore_projector.py).

For each projectable matrix with gradient G_t (t = steps done, before the increment):
  if t % T == 0:  P ← top-`rank` singular vectors of G_t (fp32 SVD) on the reduced side (first refresh at t = 0)
  R_t = down(G_t);  m ← β1 m + (1−β1) R_t;  v ← β2 v + (1−β2) R_t²          (moments are NEVER reset/re-projected)
  W ← W − lr · α · √(1−β2^{t+1})/(1−β1^{t+1}) · up(m / (√v + ε))           (α = `scale`, ε = 1e-6 class default)
Side ('std'): torch reduces the smaller dimension of G_t[out, in] (right projection when out >= in), so the state
is rank × max(d_in, d_out). On the JAX kernel [d_in, d_out] this is: reduce axis 0 (d_in) if d_out >= d_in, else
axis 1 — see `projection.reduced_axis`; pinned against a torch-layout numpy transcription in the tests.
Non-matrix leaves get the same (galore_torch) Adam form without projection, as in the reference, where they live in
the same optimizer.

How `optax.contrib.galore` (optax 0.2.7/0.2.8) differs:
  1. side rule: it projects on the left when m >= n of the leaf as stored, i.e. it reduces the LARGER dimension
     (state rank × min(m, n)); GaLore reduces the smaller one. At the same `rank` optax keeps less state and uses a
     different subspace;
  2. by default it projects every 2-D leaf, including embeddings and the LM head (the reference only projects
     attention/MLP linears; here a label function decides);
  3. ε placement follows optax.scale_by_adam (m̂/(√v̂+ε)) instead of √(bc2)/bc1 · m/(√v+ε); no α `scale` default.
Deviations here: weight decay (0 in every reference script) is applied to the pre-update weight (optax
add_decayed_weights) instead of after the update; moments are fp32; SVD signs are canonicalised.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optim import projection as pj


def galore_leaf_spec(rank: int, proj_side: str = "std"):
  def spec_fn(shape, name=""):
    axis = pj.reduced_axis(shape, proj_side)
    if rank > shape[axis]:
      raise ValueError(f"GaLore rank {rank} is larger than the reduced dimension {shape[axis]} of {name or 'a'} "
                       f"matrix of shape {shape}")
    return pj.LeafSpec("basis", axis, rank, shape)
  return spec_fn


def scale_by_galore(rank: int = 128, update_gap: int = 200, scale: float = 0.25, proj_side: str = "std",
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
  """GaLore direction for a tree of 2-D matrices (update = −lr·direction)."""
  pj.validate_static_int("rank", rank, method="GaLore")
  pj.validate_gap(update_gap)
  if pj.is_static_number(scale) and scale < 0:
    raise ValueError(f"GaLore scale must be >= 0, got {scale}")
  if proj_side not in pj.PROJ_SIDES:
    raise ValueError(f"unknown proj_side {proj_side!r}; expected one of {pj.PROJ_SIDES}")
  pj.validate_adam(b1, b2, eps)
  return pj.scale_by_projected_adam(
      spec_fn=galore_leaf_spec(int(rank), proj_side), proj_type="svd", update_gap=update_gap, b1=b1, b2=b2,
      eps=eps, adam_form="galore", reset_statistics=False, active_scale=scale, inactive_rule="no", inactive_scale=0.0)


class TorchAdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def scale_by_torch_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
  """galore_torch's Adam form √(1−β2^t)/(1−β1^t) · m/(√v+ε) on full-size leaves (fp32 moments)."""
  pj.validate_adam(b1, b2, eps)

  def init_fn(params):
    z = lambda p: jnp.zeros(p.shape, jnp.float32)
    return TorchAdamState(jnp.zeros([], jnp.int32), jax.tree.map(z, params), jax.tree.map(z, params))

  def update_fn(updates, state, params=None):
    del params
    t = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates)
    out = jax.tree.map(lambda m, v, g: pj.adam_direction(m, v, t, b1, b2, eps, "galore").astype(g.dtype),
                       mu, nu, updates)
    return out, TorchAdamState(t, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def galore(learning_rate: Union[float, optax.Schedule], rank: int = 128, update_gap: int = 200,
           scale: float = 0.25, proj_side: str = "std", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
           weight_decay: float = 0.0,
           label_fn: Optional[Callable[[Any], Any]] = None) -> optax.GradientTransformation:
  """GaLore-AdamW: projected Adam on 'matrix'-labelled leaves, galore_torch Adam on the others."""
  def tx(inner):
    return optax.chain(inner, optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))
  return optax.partition(
      {pj.MATRIX: tx(scale_by_galore(rank, update_gap, scale, proj_side, b1, b2, eps)),
       pj.OTHER: tx(scale_by_torch_adam(b1, b2, eps))},
      label_fn or pj.default_label_fn)
