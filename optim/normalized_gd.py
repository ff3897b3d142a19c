"""Normalized LR+GD (logistic regression with adaptively normalised gradient descent) as an optax transform.

Paper: Tyurin, "From Logistic Regression to the Perceptron Algorithm: Exploring Gradient Descent with Large Step
Sizes", arXiv 2412.08424, §6 (Normalized LR+GD):
    θ_{t+1} = θ_t − γ · β_t · ∇f(θ_t),    β_t = ( (1/n) Σ_i (1 + exp(y_i a_iᵀθ_t))^{-1} )^{-1},
with f the mean logistic loss. β_t is the inverse mean per-sample "error weight" σ(−margin_i); it mimics the
Normalized Batch Perceptron (step 1/|S_t|). Plain LR+GD is θ_{t+1} = θ_t − γ∇f(θ_t).

β needs the per-sample margins y_i a_iᵀθ_t, so this is a GradientTransformationExtraArgs: pass
`margins=` (shape [n]) to update(). β is computed in log space (logsumexp of −softplus(margin)) and clamped to
1/finfo.tiny and γ·β to finfo.max, so that well-separated data (σ(−margin) underflowing) gives a finite step.
"""
from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
import optax


def logistic_margins(theta, features, labels):
  """y_i a_iᵀθ for features [n, d], labels in {−1, +1} [n]."""
  return labels * (features @ theta)


def normalization(margins):
  """β = 1 / mean_i σ(−margin_i), computed stably."""
  margins = jnp.asarray(margins, jnp.float32)
  n = margins.shape[0]
  log_mean = jax.nn.logsumexp(-jax.nn.softplus(margins)) - jnp.log(n)
  return jnp.minimum(jnp.exp(-log_mean), 1.0 / jnp.finfo(jnp.float32).tiny)


def normalized_gd(learning_rate: Union[float, optax.Schedule]) -> optax.GradientTransformationExtraArgs:
  """−γ·β_t·g with γ = learning_rate (float or schedule); update(..., margins=[n]) is required."""
  if isinstance(learning_rate, (int, float)) and learning_rate <= 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, margins=None, **extra_args):
    del params, extra_args
    if margins is None:
      raise ValueError("normalized_gd needs the per-sample margins: update(..., margins=y * (A @ theta))")
    if jnp.ndim(margins) != 1 or jnp.shape(margins)[0] == 0:
      raise ValueError(f"margins must be a non-empty 1-D array, got shape {jnp.shape(margins)}")
    gamma = learning_rate(state.count) if callable(learning_rate) else learning_rate
    step = -jnp.minimum(gamma * normalization(margins), jnp.finfo(jnp.float32).max)
    out = jax.tree.map(lambda g: (step * g.astype(jnp.float32)).astype(g.dtype), updates)
    return out, optax.ScaleByScheduleState(count=state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
