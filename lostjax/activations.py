"""The activations a low-rank/LOST layer may put between its factors (σ in y = σ(x A) B), by name."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array] | None] = {
    "identity": None,
    "none": None,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
}


def resolve_activation(act) -> Callable[[jax.Array], jax.Array] | None:
  """None / a name in ACTIVATIONS / a callable -> the function (None for the identity)."""
  if act is None or callable(act):
    return act
  if act not in ACTIVATIONS:
    raise ValueError(f"unknown activation {act!r}; expected None, a callable or one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[act]
