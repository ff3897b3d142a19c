"""Pytree path helpers shared by the library, the optimizers and the metrics."""
from __future__ import annotations

# Entries that nnx adds below a Variable when its state is flattened; they are not part of a parameter's name.
_SKIP_KEYS = ("value", "raw_value")


def key_to_str(k) -> str:
  """One path entry (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey, ...) as a string."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_names(path) -> tuple[str, ...]:
  """('layers', '0', 'attn', 'q', 'kernel') from a jax.tree_util key path (nnx Variable 'value' entries dropped)."""
  return tuple(s for s in map(key_to_str, path) if s not in _SKIP_KEYS)


def path_to_str(path) -> str:
  """'layers/0/attn/q/kernel' from a jax.tree_util key path (nnx Variable 'value' entries dropped)."""
  return "/".join(path_names(path))
