"""Device mesh and logical-axis sharding rules (MaxText-style), with no model code involved.

Parameters carry logical axis names (`out_sharding` metadata on each `nnx.Variable`, e.g. ("embed", "mlp")).
`logical_to_mesh` maps them onto mesh axes through a rules table; a dimension that the mapped mesh axes do not
divide evenly is replicated instead, so every preset runs on any mesh shape.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),   # outside the experts, the expert axis is one more data axis
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("rank", None),
    ("sparse", None),
    ("length", None),
    ("expert", "expert"),   # stacked mixture-of-experts weights (lostjax.models.moe)
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None, *,
              expert: int = 1):
  """A 4-axis ('data', 'fsdp', 'tensor', 'expert') mesh with Auto axis types; data=-1 takes the remaining devices.

  expert > 1 shards stacked mixture-of-experts weights over the experts (expert parallelism); the batch is split
  over data × fsdp × expert. expert=1 (default) gives the 3-axis meshes of before plus a trivial 'expert' axis.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  for name, v in (("fsdp", fsdp), ("tensor", tensor), ("expert", expert)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"mesh.{name} must be a positive int, got {v!r}")
  if data == -1:
    if n % (fsdp * tensor * expert):
      raise ValueError(f"mesh fsdp={fsdp} x tensor={tensor} x expert={expert} does not divide the {n} available "
                       f"devices")
    data = n // (fsdp * tensor * expert)
  if not isinstance(data, int) or data < 1 or data * fsdp * tensor * expert != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} x expert={expert} != {n} available devices")
  return jax.make_mesh((data, fsdp, tensor, expert), MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)


def _axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return int(math.prod(mesh.shape[a] for a in axes))


def logical_to_mesh(logical: Sequence[str | None] | None, shape: Sequence[int], mesh,
                    rules=DEFAULT_RULES) -> P:
  """Maps one array's logical axis names to a PartitionSpec on `mesh`."""
  if logical is None:
    return P()
  table = dict(rules)
  out, used = [], set()
  for name, dim in zip(logical, shape):
    axes = table.get(name) if name is not None else None
    if axes is not None:
      tup = (axes,) if isinstance(axes, str) else tuple(axes)
      tup = tuple(a for a in tup if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
      if tup and dim % _axis_size(mesh, tup) == 0:
        used.update(tup)
        out.append(tup[0] if len(tup) == 1 else tup)
        continue
    out.append(None)
  return P(*out)


def state_shardings(state, mesh, rules=DEFAULT_RULES):
  """NamedShardings for an nnx.State (real or abstract) from each Variable's `out_sharding` metadata."""
  def one(v):
    if isinstance(v, nnx.Variable):
      logical = v.get_metadata().get("out_sharding")
      spec = logical_to_mesh(logical, v.shape, mesh, rules)
      return v.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_module(build, mesh=None, *, sharded: bool = False, rules=DEFAULT_RULES):
  """Initialises an NNX module and splits it into (graphdef, params, rest) placed on `mesh`.

  build: a no-argument function returning the module (e.g. `lambda: Llama(cfg, rngs=nnx.Rngs(seed))`).
  sharded=False: initialise inside one single-device jit, then `device_put` every leaf to its logical-axis sharding
  (fast to compile; needs the model to fit on one device). sharded=True: initialise inside a jit with
  `out_shardings`, so no device ever holds the whole model (for models larger than one device's memory; compiling
  the SPMD-partitioned init, e.g. the LOST SVDs, takes longer).
  """
  def split():
    return nnx.split(build(), nnx.Param, ...)
  graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  if mesh is None:
    _, params, rest = jax.jit(split)()
    return graphdef, params, rest
  shardings = (state_shardings(abs_params, mesh, rules), state_shardings(abs_rest, mesh, rules))
  if sharded:
    with jax.set_mesh(mesh):
      params, rest = jax.jit(lambda: split()[1:], out_shardings=shardings)()
  else:
    params, rest = jax.device_put(jax.jit(lambda: split()[1:])(), shardings)
  return graphdef, params, rest


def batch_axes(mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes the batch dimension is sharded over: those of the 'batch' rule that the mesh (concrete or
  abstract) has with size > 1. The one place the batch placement is decided (step inputs, SAF store, kernels)."""
  rule = dict(rules)["batch"]
  rule = () if rule is None else ((rule,) if isinstance(rule, str) else tuple(rule))
  return tuple(a for a in rule if mesh.shape.get(a, 1) > 1)


def batch_sharding(mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
  """Shards the leading (batch) dimension over `batch_axes(mesh)`."""
  axes = batch_axes(mesh, rules)
  lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh, rules=DEFAULT_RULES) -> int:
  """How many ways the batch is split: the product of `batch_axes(mesh)`."""
  return _axis_size(mesh, batch_axes(mesh, rules))


__all__ = ["init_module", "make_mesh", "logical_to_mesh", "state_shardings", "batch_sharding", "replicated", "DEFAULT_RULES",
           "MESH_AXES", "batch_divisor", "batch_axes"]
