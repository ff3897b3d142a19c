"""Device mesh and logical-axis sharding rules (MaxText-style), with no model code involved.

Parameters carry logical axis names (`out_sharding` metadata on each `nnx.Variable`, e.g. ("embed", "mlp")).
`logical_to_mesh` maps them onto mesh axes through a rules table; a dimension that the mapped mesh axes do not
divide evenly is replicated instead, so every preset runs on any mesh shape.

Activations have their own logical names (`activation_batch`, `activation_length`, `activation_embed`,
`activation_heads`, `activation_kv`, `activation_mlp`, `activation_rank`, `activation_sparse`,
`activation_vocab`, `activation_expert`, after MaxText's `activation_*` rules). The model pins its activations
with `constrain(x, names)` (a `jax.lax.with_sharding_constraint` on the mesh set by `jax.set_mesh`; nothing
without a mesh), so the partitioner does not have to guess where they live:

  * batch over data × fsdp × expert, embed never sharded: under `fsdp` (ZeRO-3) every device keeps the full
    feature vectors of its own rows, so each weight (sharded over `embed`) is all-gathered for its matmul and its
    gradient reduce-scattered, instead of the activations of the whole batch being gathered;
  * the embedding lookup (`sharded_lookup`) is the one exception to gathering weights: under fsdp it gathers the
    token ids instead, each device reads its fsdp slice of the features for the rows of all fsdp devices, and an
    all-to-all of the activation's own size gives every device its rows with whole features; neither the
    [vocab, d] table nor its gradient is ever whole on a device (60M on fsdp 8: 57 MB less per device);
  * heads and the MLP hidden dimension over `tensor` (Megatron): q/k/v, gate/up are column parallel (their output
    features split), o and down row parallel (their input features split; XLA all-reduces their output). A
    low-rank or LOST projection splits like its dense counterpart: the factor touching the split features is
    split, the rank-r intermediate and the gathered input channels (`activation_rank`, `activation_sparse`) are
    computed whole on every device (a row-parallel layer all-reduces their partial sums: [tokens, r + k] values
    instead of its d_out outputs) and stored for the backward split over `tensor` (`constrain_saved`), and the
    sparse rows W_s [k, d_out] of a column-parallel layer split with d_out.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lostjax import remat

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
PARAM_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
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
ACTIVATION_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),       # never over fsdp: each device keeps whole feature vectors of its rows
    ("activation_heads", "tensor"),
    ("activation_kv", None),          # the head dimension
    ("activation_mlp", "tensor"),
    ("activation_rank", None),        # low-rank / LOST intermediates x·A (r values per token)
    ("activation_sparse", None),      # the k input channels a LOST layer gathers
    ("activation_vocab", "tensor"),
    ("activation_expert", "expert"),  # the expert dimension of dispatched mixture-of-experts inputs
    ("activation_saved", "tensor"),   # features of an intermediate kept for the backward (constrain_saved)
)
DEFAULT_RULES = PARAM_RULES + ACTIVATION_RULES

# A parameter axis -> the name of the activation axis it produces (a layer's output features).
_ACTIVATION_OF = {"embed": "activation_embed", "heads": "activation_heads", "mlp": "activation_mlp",
                  "vocab": "activation_vocab", "rank": "activation_rank", "sparse": "activation_sparse",
                  "expert": "activation_expert"}


def activation_axis(param_axis: str | None) -> str | None:
  """The activation logical name for features laid out like the parameter axis `param_axis` (None stays None)."""
  return _ACTIVATION_OF.get(param_axis) if param_axis is not None else None


def constrain(x: jax.Array, logical: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """Pins activation `x` to the sharding of its logical axis names on the current mesh (`jax.set_mesh`).

  A no-op without a mesh (or on one device), and a dimension the mapped axes do not divide is left replicated
  (`logical_to_mesh`), so models run unchanged outside a mesh, e.g. in generation or tests.
  """
  if len(logical) != x.ndim:
    raise ValueError(f"{len(logical)} logical axis names {tuple(logical)} for an array of shape {x.shape}")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh(logical, x.shape, mesh, rules))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(value, full, shard):
  return jax.lax.with_sharding_constraint(value, full)


def _gather_fwd(value, full, shard):
  return _gather(value, full, shard), None


def _gather_bwd(full, shard, _, grad):
  # The weight's gradient is a sum over every device's rows: constrained straight to the weight's own sharding,
  # the partitioner reduce-scatters it (each device receives its shard) instead of all-reducing a full copy.
  if shard is None:   # gathered_call(..., scatter_grad=False): all-reduced whole, then sliced
    return (jax.lax.with_sharding_constraint(grad, full),)
  return (jax.lax.with_sharding_constraint(grad, shard),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def gathered_call(fn, weights: Sequence, *args, scatter_grad: bool = True):
  """fn(*weight values, *args) with each weight all-gathered over the axes that shard its `embed` dimension
  (fsdp) and its tensor-parallel split kept: how a layer reads its weights under ZeRO-3.

  weights: nnx.Variables carrying logical `out_sharding` names. The gathers and `fn` run inside a
  checkpoint that saves nothing, so no gathered weight lives from the forward to the backward pass: the
  backward gathers it again when the layer's cotangent arrives (`lostjax.remat.checkpoint`; with a plain
  `jax.checkpoint` XLA:CPU issued every re-gather at the start of the step, keeping a gathered copy of the whole
  model alive), and the weight's gradient is reduce-scattered onto its shards. Without a mesh, or when no weight
  is sharded over fsdp, plainly fn(*values, *args).

  scatter_grad=False: the gradient is all-reduced in the gathered layout and then sliced onto the shards. For a
  table lookup (the embedding): its gradient is a scatter-add of the batch-sharded rows, which XLA cannot write
  straight into fsdp shards of the features without replicating those rows ("Involuntary full
  rematerialization" under data × fsdp).
  """
  values = [w[...] for w in weights]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*values, *args)
  specs = []
  for w, v in zip(weights, values):
    logical = w.get_metadata().get("out_sharding")
    if logical is None or len(logical) != v.ndim:
      specs.append(None)
      continue
    shard = param_spec(logical, v.shape, mesh)
    full = _without_fsdp(shard)
    specs.append(None if shard == full else (full, shard))
  if all(s is None for s in specs):
    return fn(*values, *args)

  def run(values, args):
    return fn(*(v if s is None else _gather(v, s[0], s[1] if scatter_grad else None)
                for v, s in zip(values, specs)), *args)

  return remat.checkpoint(run)(values, args)


def _fit(spec: P, shape: Sequence[int], mesh) -> P:
  """`spec` with every entry whose axes do not divide its dimension replaced by None (replicated)."""
  return P(*[e if e is None or n % _axis_size(mesh, e) == 0 else None for e, n in zip(spec, shape)])


def sharded_lookup(table, ids: jax.Array) -> jax.Array:
  """table[ids] for an embedding `table` (an nnx.Variable [vocab, embed] with logical names), without ever
  holding the table or its gradient whole under fsdp.

  ZeRO-3's gather (`gathered_call`) would put the whole V × d table on every device, and its gradient, a
  scatter-add of the batch-sharded rows, in the same gathered layout. Here the ids (int32) are all-gathered over
  the fsdp devices instead; each device looks up the fsdp slice of the features it holds for the rows of all of
  them, and the [rows, ..., d] result is redistributed to rows over fsdp with whole features (an all-to-all of the
  activation's own size). The backward is the transpose: the cotangent is redistributed back and each device
  scatter-adds into its own feature slice of the gradient. Without a mesh, or when fsdp does not split the
  features, `gathered_call` (table gathered, gradient all-reduced in that layout and sliced).
  """
  w = table[...]
  mesh = jax.sharding.get_abstract_mesh()
  logical = table.get_metadata().get("out_sharding")
  take = lambda w, i: jnp.take(w, i, axis=0)
  if mesh.empty or mesh.size == 1 or logical is None or len(logical) != 2 or ids.ndim < 1:
    return gathered_call(take, (table,), ids, scatter_grad=False)
  spec = param_spec(logical, w.shape, mesh)
  features = spec_axes(spec[1])
  if "fsdp" not in features:
    return gathered_call(take, (table,), ids, scatter_grad=False)
  rows = spec_entry(tuple(a for a in batch_axes(mesh) if a not in features))
  rest = [None] * (ids.ndim - 1)
  ids = jax.lax.with_sharding_constraint(ids, _fit(P(rows, *rest), ids.shape, mesh))
  out = take(_gather(w, spec, spec), ids)   # _gather: identity whose gradient is pinned to the table's shards
  return jax.lax.with_sharding_constraint(out, _fit(P(rows, *rest, spec[1]), out.shape, mesh))


def constrain_saved(x: jax.Array) -> jax.Array:
  """A [batch, length, features] intermediate that a custom backward keeps (the LOST rank-r pre-activations and
  gathered channels): its features split over `tensor`. Computed whole on every tensor device (they hold the
  same rows), it is stored once across them and all-gathered where the backward reads it. Other ranks unchanged."""
  return constrain_tokens(x, "activation_saved")


def splits_features() -> bool:
  """Whether the current mesh splits features over `tensor` (then concatenating projections along their output
  features, as `lostjax.layers.group` does, would mix the devices' slices and cost a reshuffle)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.shape.get("tensor", 1) > 1


def constrain_tokens(x: jax.Array, feature: str | None) -> jax.Array:
  """`constrain` for a [batch, length, features] activation (other ranks, e.g. inside the experts, unchanged)."""
  if x.ndim != 3:
    return x
  return constrain(x, ("activation_batch", "activation_length", feature))


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


def spec_axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry (None, an axis name or a tuple of names) as a tuple of mesh axis names."""
  return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def spec_entry(axes: tuple[str, ...]):
  """A tuple of mesh axis names as a PartitionSpec entry (None, one name, or the tuple): `spec_axes`'s inverse."""
  return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _axis_size(mesh, axes) -> int:
  return int(math.prod(mesh.shape[a] for a in spec_axes(axes)))


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
      tup = tuple(a for a in spec_axes(axes) if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
      if tup and dim % _axis_size(mesh, tup) == 0:
        used.update(tup)
        out.append(spec_entry(tup))
        continue
    out.append(None)
  return P(*out)


def param_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh, rules=DEFAULT_RULES) -> P:
  """A parameter's (or its optimizer state's) PartitionSpec: `logical_to_mesh`, then ZeRO-3's completion: when
  no dimension took `fsdp` (a LOST/low-rank factor [rank, heads], sparse rows [k, mlp], a norm scale of an odd
  size, ...), the largest dimension that fsdp (times what already splits it) divides is split over fsdp too,
  so every weight is spread over the fsdp devices, not only those with an `embed` dimension."""
  spec = logical_to_mesh(logical, shape, mesh, rules)
  if logical is None:
    return spec
  return complete_fsdp(spec, shape, mesh)


def complete_fsdp(spec: P, shape: Sequence[int], mesh) -> P:
  """ZeRO-3's completion of a state array's PartitionSpec: when no dimension is split over `fsdp`, the largest
  dimension that fsdp (times what already splits it) divides is split over fsdp too; unchanged otherwise."""
  if mesh.shape.get("fsdp", 1) == 1:
    return spec
  entries = [spec_axes(e) for e in spec]
  entries += [()] * (len(shape) - len(entries))
  if any("fsdp" in e for e in entries):
    return spec
  best = None
  for d, (e, n) in enumerate(zip(entries, shape)):
    split = _axis_size(mesh, e) * mesh.shape["fsdp"]
    if n % split == 0 and (best is None or n // split > shape[best] // (_axis_size(mesh, entries[best]) *
                                                                        mesh.shape["fsdp"])):
      best = d
  if best is None:
    return spec
  entries[best] = entries[best] + ("fsdp",)
  return P(*[spec_entry(e) for e in entries])


def _without_fsdp(spec: P) -> P:
  return P(*[spec_entry(tuple(a for a in spec_axes(e) if a != "fsdp")) for e in spec])


def state_shardings(state, mesh, rules=DEFAULT_RULES):
  """NamedShardings for an nnx.State (real or abstract) from each Variable's `out_sharding` metadata
  (trainable parameters: `param_spec`, the logical rules completed so that every weight is split over fsdp;
  other variables, e.g. the LOST channel indices, by the logical rules alone)."""
  def one(v):
    if isinstance(v, nnx.Variable):
      logical = v.get_metadata().get("out_sharding")
      spec = (param_spec if isinstance(v, nnx.Param) else logical_to_mesh)(logical, v.shape, mesh, rules)
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
  return tuple(a for a in spec_axes(dict(rules)["batch"]) if mesh.shape.get(a, 1) > 1)


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


__all__ = ["complete_fsdp", "sharded_lookup", "spec_axes", "spec_entry", "constrain_saved", "splits_features", "param_spec", "gathered_call", "constrain", "constrain_tokens", "activation_axis", "PARAM_RULES", "ACTIVATION_RULES", "init_module", "make_mesh", "logical_to_mesh", "state_shardings", "batch_sharding", "replicated", "DEFAULT_RULES",
           "MESH_AXES", "batch_divisor", "batch_axes"]
