"""`--summary_only`: exact parameter counts, optimizer-state size, FLOPs per token, a device-memory estimate and
whether it fits.

Nothing is allocated: the model and the optimizer state are built with `nnx.eval_shape`/`jax.eval_shape`.

Memory estimate per device (bytes), for the chosen config and mesh (data × fsdp × tensor × expert; rows = microbatch
rows per device = global_batch / grad_accum / (data·fsdp·expert), tokens = rows · seq_len, t = tensor):
  params      = the bytes of every parameter one device holds, placed exactly as `lostjax.sharding.state_shardings`
                places it on that mesh (param_dtype; a dimension a mesh axis does not divide stays whole)
  grads       = params (float32 gradients of float32 parameters; under fsdp each is reduce-scattered onto the
                parameter's shards as its layer's backward produces it)
  optimizer   = the bytes of every optimizer-state leaf one device holds, placed as the trainer places it
                (`train.state.optimizer_shardings`: moments like their parameter; FRUGAL's stacked moments replicated)
  activations = tokens · n_layers · v_layer · act_bytes  +  n_layers · scores  +  experts  +  head
  update      = max(0, 2.2 · params − activations): the step peaks in the backward pass or in the optimizer update,
                whose float32 temporaries take about 2.2 times the parameter bytes a device holds (measured at 60M
                on data 8, where the parameters outweigh the activations)
with, per token and layer, the values the backward pass keeps (no rematerialisation):
  v_layer = 4·d (two norm inputs and outputs; never split: activations keep whole feature vectors)
          + (3·d + 2·d_kv)/t (q, k, v after RoPE, attention output, o input; d_kv = n_kv_heads·head_dim, = d
            without grouped-query attention; heads split over `tensor`)
          + 4·d_ff/t (gate, up, their product and one more d_ff-wide buffer: XLA:CPU's step kept 3 of them on 8
            devices at 2 rows each, about 4 on one device at 8 rows; the MLP hidden features split over `tensor`)
          + LOST/low-rank intermediates (rank r per projection, and the k gathered input channels of LOST; whole;
            under fsdp without tensor parallelism none: `gathered_call`'s checkpoint recomputes them)
          + for experts, instead of the MLP terms: E router probabilities and top_k ids and gates;
  scores  = 3 · rows · heads/t · T² · 4 bytes with `model.attention_impl='xla'` (the float32 attention logits,
            probabilities and their gradient live at once); 0 for fused attention kernels;
  experts = the routed experts (`moe_bytes`: dropless, 5 · E·tokens slots of d + d_ff values and 1.16 times the
            expert weights on the device, fitted to the compiled step; capacity mode keeps E·C slots per layer);
  head    = tokens · (3·V·4/t + 2·d·act_bytes): the float32 logits (vocabulary split over `tensor`), their softmax
            gradient and a third buffer of that size (two on data × tensor meshes without fsdp, as measured at 60M),
            and the final norm's input/output. A dimension that t does not divide is counted whole.
With model.remat=True each block keeps what `model.remat_policy` saves (`saved_values_per_token_layer`: its input
for 'nothing_saveable'; the matmul outputs for the dots policies) plus one block's worth during its recomputation.
The coefficients were counted from the dataflow and the buffers of XLA's memory-usage report, and checked against
XLA's memory analysis of the compiled train step (`compiled_memory`): 0.95–1.08 of it over the 44 cases of
`bench/memory_estimate.py --mesh_table` (small and 60M; dense, LOST, FRUGAL, GaLore on data 8, fsdp 8, data 4 ×
tensor 2, fsdp 4 × tensor 2, data 2 × fsdp 2 × tensor 2; the mixture of experts on data 8 and data 4 × expert 2),
within ±10 % on one device (tests/test_summary.py, tests/test_sharding.py, docs/benchmarks/sharding.md);
with remat, small, one device: see docs/benchmarks/memory.md.

`fits`: the total against the device memory (`system.device_memory_gib`, else the device's reported limit, else a
table of common accelerators in train/flops.py); when it does not fit, `suggestions` lists the first settings of
`mesh.fsdp`, `model.remat` and `train.grad_accum` (alone, then combined) whose estimate fits.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
from flax import nnx

from lostjax.layers.common import resolve_dtype
from lostjax.layers.lost import num_sparse_channels
from lostjax.models import Llama, count_params

GIB = 2.0 ** 30
# The optimizer update's temporaries, in units of the parameter bytes one device holds (memory_estimate).
UPDATE_TEMPORARIES = 2.2
# Share of the device memory the estimate may use: XLA and the runtime need some headroom (fragmentation,
# collectives' buffers, the input batch).
FIT_FRACTION = 0.9


def _vocab(cfg) -> int | None:
  if cfg.model.vocab_size:
    return None
  from train.data.tokenizers import make_tokenizer
  return make_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path).vocab_size


def _tensor_split(mc, t: int) -> tuple[int, int, int]:
  """How many ways tensor parallelism splits (heads, the MLP hidden features, the vocabulary): t where it divides
  that dimension (lostjax.sharding replicates a dimension the mesh axis does not divide), else 1."""
  if t <= 1:
    return 1, 1, 1
  return (t if mc.n_heads % t == 0 and mc.kv_heads % t == 0 else 1, t if mc.d_ff % t == 0 else 1,
          t if mc.vocab_size % t == 0 else 1)


def _factor_values(mc) -> tuple[int, int]:
  """Per token and layer: (low-rank/LOST rank intermediates, LOST gathered input channels); never split."""
  d, ff = mc.d_model, mc.d_ff
  m = 0 if mc.moe_experts else 1   # the experts' own intermediates are counted per slot (moe_bytes)
  ranks = gathered = 0
  for kind, rank, shapes, copies in ((mc.attn_kind, mc.attn_rank, [(d, d)] * 4, 1),  # every d_in is d
                                     (mc.mlp_kind, mc.mlp_rank, [(d, ff), (d, ff), (ff, d)], m)):
    if kind in ("lowrank", "lost"):
      ranks += copies * len(shapes) * rank
    if kind == "lost":
      gathered += copies * sum(num_sparse_channels(din, mc.sparsity) for din, _ in shapes)
  return ranks, gathered


def activation_values_per_token_layer(mc, tensor: int = 1) -> float:
  """Values per token and decoder layer that the backward pass keeps on one device (no remat; attention scores
  excluded), with the heads and MLP hidden features split `tensor` ways (module docstring)."""
  d, ff = mc.d_model, mc.d_ff
  th, tf, _ = _tensor_split(mc, tensor)
  ranks, gathered = _factor_values(mc)
  if mc.moe_experts:   # the routed experts are counted per slot (moe_bytes); kept here: router probabilities, ids
    return 4 * d + (3 * d + 2 * mc.kv_dim) / th + mc.moe_experts + 2 * mc.moe_top_k + ranks + gathered   # and gates
  return 4 * d + (3 * d + 2 * mc.kv_dim) / th + 4 * ff / tf + ranks + gathered


def saved_values_per_token_layer(mc, tensor: int = 1) -> float:
  """Values per token and layer a rematerialised block keeps for the backward pass under `model.remat_policy`:
  its input (d) for 'nothing_saveable'; plus the matmul outputs the dots policies save (q, k, v, o, gate, up, down
  and the low-rank/LOST intermediates; 'dots_saveable' also the attention's P·V product); everything otherwise."""
  d, ff = mc.d_model, mc.d_ff
  th, tf, _ = _tensor_split(mc, tensor)
  m = mc.moe_top_k if mc.moe_experts else 1
  policy = mc.remat_policy
  if policy == "nothing_saveable":
    return d
  if policy == "everything_saveable":
    return activation_values_per_token_layer(mc, tensor)
  ranks, _ = _factor_values(mc)
  dots = d + (d + 2 * mc.kv_dim) / th + d + m * (2 * ff / tf + d) + ranks
  if policy in ("dots_saveable", "checkpoint_dots"):
    dots += d / th
  return dots


def attention_score_bytes(mc, rows: float, seq_len: int, tensor: int = 1) -> float:
  """Bytes of one layer's attention scores that are live at once ([rows, heads, T, T] float32 buffers)."""
  if mc.attention_impl != "xla":
    return 0.0
  th = _tensor_split(mc, tensor)[0]
  return 3.0 * rows * mc.n_heads / th * seq_len * seq_len * 4


def mesh_axes(cfg, n_dev: int) -> dict:
  """The mesh axis sizes of the config on `n_dev` devices (data=-1 takes the rest)."""
  expert = cfg.mesh.get("expert", 1)
  data = cfg.mesh.data if cfg.mesh.data > 0 else max(n_dev // (cfg.mesh.fsdp * cfg.mesh.tensor * expert), 1)
  return {"data": data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor, "expert": expert}


def _shards(cfg, n_dev: int) -> tuple[int, int]:
  """(model shards, batch shards)."""
  axes = mesh_axes(cfg, n_dev)
  return axes["fsdp"] * axes["tensor"], max(axes["data"] * axes["fsdp"] * axes["expert"], 1)


def _abstract_mesh(axes: dict):
  from lostjax import sharding
  return jax.sharding.AbstractMesh(tuple(axes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


def _ways(spec, axes: dict) -> int:
  """How many pieces a PartitionSpec cuts an array into on a mesh of these axis sizes."""
  from lostjax import sharding
  return int(np.prod([axes[a] for e in spec for a in sharding.spec_axes(e)] or [1]))


def param_bytes_per_device(params, axes: dict) -> float:
  """Bytes of `params` (abstract nnx.State) one device holds on a mesh of these axis sizes, placed exactly as
  `lostjax.sharding.state_shardings` places them (a dimension an axis does not divide stays whole)."""
  from flax import nnx as _nnx
  from lostjax import sharding
  mesh = _abstract_mesh(axes)
  total = 0.0
  for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, _nnx.Variable)):
    spec = sharding.param_spec(v.get_metadata().get("out_sharding"), v.shape, mesh)
    total += int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize / _ways(spec, axes)
  return total



def optimizer_bytes_per_device(opt_shapes, params, axes: dict) -> float:
  """Bytes of the optimizer state `opt_shapes` (`jax.eval_shape(tx.init, params)`) one device holds, placed
  exactly as the trainer places it (`train.state.optimizer_shardings`: moments like their parameter, projections
  split on the side they share with it, FRUGAL's stacked moments and counters replicated)."""
  from lostjax import sharding
  from train.state import optimizer_shardings
  mesh = _abstract_mesh(axes)
  placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                        sharding.state_shardings(params, mesh))
  total = 0.0
  for leaf, sh in zip(jax.tree.leaves(opt_shapes), jax.tree.leaves(optimizer_shardings(opt_shapes, placed, mesh))):
    if hasattr(leaf, "shape"):
      total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize / _ways(sh.spec, axes)
  return total


def memory_estimate(cfg, mc, param_bytes: int, opt_bytes: int, n_dev: int, params=None, opt_shapes=None) -> dict:
  """Per-device bytes: params, grads, optimizer, activations, total (see the module docstring). `params` (the
  abstract parameter state) places every parameter by the sharding rules, and with `opt_shapes` (the abstract
  optimizer state) every optimizer leaf as the trainer places it; without them, bytes / (fsdp·tensor)."""
  t = cfg.train
  axes = mesh_axes(cfg, n_dev)
  model_shards, batch_shards = _shards(cfg, n_dev)
  tensor = axes["tensor"]
  local = param_bytes_per_device(params, axes) if params is not None else param_bytes / model_shards
  # Under fsdp each weight is gathered for its layer only (lostjax.sharding.gathered_call) and its gradient
  # reduce-scattered onto the weight's shards: gradients take the parameters' per-device bytes.
  grads = local
  act_bytes = np.dtype(resolve_dtype(mc.dtype)).itemsize
  rows = t.global_batch / t.grad_accum / batch_shards
  tokens = rows * t.seq_len
  values = activation_values_per_token_layer(mc, tensor)
  if axes["fsdp"] > 1 and tensor == 1 and not mc.remat and not mc.moe_experts:
    # each projection runs inside gathered_call's checkpoint, which keeps only its input: the low-rank / LOST
    # intermediates are recomputed in the backward instead of kept (measured: with tensor parallelism as well
    # they are kept, split over `tensor` by sharding.constrain_saved)
    values -= sum(_factor_values(mc))
  per_layer = values * tokens * act_bytes
  scores = attention_score_bytes(mc, rows, t.seq_len, tensor)
  if mc.remat:
    saved = saved_values_per_token_layer(mc, tensor) * tokens * act_bytes
    if mc.remat_policy in ("dots_saveable", "checkpoint_dots", "everything_saveable"):
      saved += scores / 3 if mc.remat_policy != "everything_saveable" else scores
    act = mc.n_layers * saved + per_layer + scores
  else:
    act = mc.n_layers * (per_layer + scores)
  if mc.moe_experts:
    act += moe_bytes(cfg, mc, axes, tokens, act_bytes, params)
  tv = _tensor_split(mc, tensor)[2]
  # float32 logits [tokens, V/t], their gradient and a third buffer of that size (two on data × tensor meshes
  # without fsdp: measured at 60M, where the vocabulary dominates), and the final norm's input and output
  logit_buffers = 2 if tv > 1 and axes["fsdp"] == 1 else 3
  head = tokens * (logit_buffers * mc.vocab_size * 4 / tv + 2 * mc.d_model * act_bytes)
  opt = (optimizer_bytes_per_device(opt_shapes, params, axes) if params is not None and opt_shapes is not None
         else opt_bytes * local / max(param_bytes, 1))
  mem = {"params": local, "grads": grads, "optimizer": opt, "activations": act + head}
  # The step peaks in the backward pass (activations) or in the optimizer update, whichever holds more: the
  # update's float32 temporaries (all-reduced gradients, moments and updates in flight) take about
  # UPDATE_TEMPORARIES times the parameter bytes one device holds (measured at 60M and the 60M mixture of experts
  # on data 8, where the parameters outweigh the activations).
  mem["update"] = max(0.0, UPDATE_TEMPORARIES * local - mem["activations"])
  mem["total"] = sum(mem.values())
  return mem


def _expert_bytes_per_device(params, axes: dict) -> float:
  """Bytes of the stacked expert weights (all layers) one device holds."""
  from flax import nnx as _nnx
  flat = [(path, v) for path, v in _nnx.to_flat_state(params) if "experts" in path]
  return param_bytes_per_device(_nnx.from_flat_state(flat), axes) if flat else 0.0


def moe_bytes(cfg, mc, axes: dict, tokens: float, act_bytes: int, params=None) -> float:
  """Bytes of the routed experts on one device (`lostjax.models.moe`), beyond what the decoder keeps per token.

  Dropless (capacity_factor 0): each device dispatches its own rows (one group per batch shard) and the compiled
  layer is sized for its largest capacity, T tokens per expert: S = E·tokens slots of d + d_ff values each (the
  gathered input and the hidden features). The backward recomputes the chosen capacity (`lostjax.remat.switch`),
  so nothing of a layer's slots is kept for it; the compiled step holds about 5·S·(d + d_ff) values plus 1.16
  times the expert weights on the device (their gradients leave each layer's conditional in buffers of their
  own). Both coefficients are fitted to XLA's memory analysis of the small mixture (8 experts, top 2) on data 8,
  data 4 × expert 2 and one device, and checked on the tiny test mixture (4 experts) on data 8 and data 4 ×
  expert 2. Capacity mode keeps E·C slots of 3·d + 6·d_ff values per layer (C from the whole microbatch, one
  group; not measured)."""
  t = cfg.train
  e, k, cf = mc.moe_experts, mc.moe_top_k, float(mc.moe_capacity_factor)
  if cf > 0:
    from lostjax.models.moe import capacity
    group = int(t.global_batch // t.grad_accum * t.seq_len)
    slots = e * capacity(group, k, e, cf) / axes["expert"]
    return mc.n_layers * slots * (3 * mc.d_model + 6 * mc.d_ff) * act_bytes
  weights = _expert_bytes_per_device(params, axes) if params is not None else 0.0
  return 5 * e * tokens * (mc.d_model + mc.d_ff) * act_bytes + 1.16 * weights


UNKNOWN_HINT = ("pass --device=<name> (v5e, v5p, h100, h200, ...: train/flops.py DEVICES) or "
               "--config.system.device_memory_gib=<GiB per device>")


def device_memory(cfg, device: str | None = None) -> tuple[float | None, str]:
  """(bytes per device to plan against, where that figure comes from), in this order: `--device=<name>` (the table
  train/flops.py DEVICES), system.device_memory_gib, the device's own memory_stats(), its device kind in
  train/flops.py DEVICE_MEMORY. When none applies: (None, why it is unknown and which flag supplies it)."""
  from train import flops
  gib = float(cfg.get("system", {}).get("device_memory_gib", 0.0) or 0.0)
  if gib < 0:
    raise ValueError(f"system.device_memory_gib must be >= 0 (0 = ask the device), got {gib!r}")
  if device:
    if gib:
      raise ValueError(f"--device={device} and system.device_memory_gib={gib:g} both set the device memory; "
                       "give one")
    limit, what = flops.named_device_memory(device)
    return limit, f"--device={device.strip().lower()}: {what}"
  if gib:
    return gib * GIB, f"system.device_memory_gib={gib:g}"
  dev = jax.devices()[0]
  stats = None
  try:
    stats = dev.memory_stats()
  except Exception:  # CPU and some backends do not report
    stats = None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"]), f"detected by memory_stats() of {dev.platform}:{dev.id} ({dev.device_kind})"
  table = flops.device_memory(dev.device_kind)
  if table is not None:
    return table, f"table entry for device kind {dev.device_kind!r} (train/flops.py DEVICE_MEMORY)"
  return None, f"unknown: the {dev.platform} device ({dev.device_kind}) reports no memory limit; {UNKNOWN_HINT}"


def device_memory_bytes(cfg, device: str | None = None) -> float | None:
  """The per-device memory to plan against (`device_memory`), or None when unknown."""
  return device_memory(cfg, device)[0]


def _variants(cfg, n_dev: int):
  """Candidate (label, cfg) settings, single changes first, then combinations."""
  t = cfg.train
  fsdps = [f for f in (2, 4, 8, 16, 32, 64, 128, 256) if f > cfg.mesh.fsdp and n_dev % (f * cfg.mesh.tensor * cfg.mesh.get("expert", 1)) == 0]
  accums = [a for a in (2, 4, 8, 16, 32, 64) if a > t.grad_accum and t.global_batch % a == 0]
  remats = [True] if not cfg.model.remat else []
  singles = [{"mesh.fsdp": f} for f in fsdps] + [{"model.remat": True} for _ in remats] + \
            [{"train.grad_accum": a} for a in accums]
  combos = [{"mesh.fsdp": f, "model.remat": True} for f in fsdps for _ in remats] + \
           [{"model.remat": True, "train.grad_accum": a} for a in accums for _ in remats] + \
           [{"mesh.fsdp": f, "model.remat": True, "train.grad_accum": a} for f in fsdps for a in accums for _ in remats]
  for change in singles + combos:
    c = copy.deepcopy(cfg)
    with c.unlocked():
      for key, v in change.items():
        sec, field = key.split(".")
        c[sec][field] = v
      if "mesh.fsdp" in change and c.mesh.data > 0:
        c.mesh.data = -1
    _, batch_shards = _shards(c, n_dev)
    if (c.train.global_batch // c.train.grad_accum) % batch_shards:
      continue
    yield change, c


def summarize(cfg, device: str | None = None) -> dict:
  """The `--summary_only` report as a dict (`--json` prints it; `format_summary` renders it for people).
  `device`: a `--device` name whose memory the fit check plans against (train/flops.py DEVICES)."""
  import optim
  from train import flops
  from train import optimizer as optim_lib
  from train.state import llama_config

  mc = llama_config(cfg, vocab_size=_vocab(cfg))
  abstract = nnx.eval_shape(lambda: Llama(mc, rngs=nnx.Rngs(0)))
  counts = count_params(abstract)
  params = nnx.state(abstract, nnx.Param)
  tx = optim_lib.build_optimizer(cfg.optim, optim_lib.lr_schedule(cfg.optim, cfg.train.steps))
  size = optim.state_size(tx, params)
  n_dev = cfg.mesh.num_devices or jax.device_count()
  t = cfg.train
  pbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
  opt_shapes = jax.eval_shape(tx.init, params)
  mem = memory_estimate(cfg, mc, pbytes, size.bytes, n_dev, params=params, opt_shapes=opt_shapes)
  limit, source = device_memory(cfg, device)
  fit = {"device_memory_bytes": None if limit is None else int(limit), "fits": None, "suggestions": [],
         "device_memory_source": source}
  if limit is not None:
    budget = FIT_FRACTION * limit
    fit["fits"] = bool(mem["total"] <= budget)
    if not fit["fits"]:
      for change, c in _variants(cfg, n_dev):
        total = memory_estimate(c, llama_config(c, vocab_size=mc.vocab_size), pbytes, size.bytes, n_dev,
                                params=params, opt_shapes=opt_shapes)["total"]
        if total <= budget:
          fit["suggestions"].append({**change, "total_gib": round(total / GIB, 3)})
          if len(fit["suggestions"]) == 3:
            break
  return {
      "model": {"preset": cfg.model.get("preset", ""), "attn_kind": mc.attn_kind, "mlp_kind": mc.mlp_kind,
                "d_model": mc.d_model, "n_layers": mc.n_layers, "vocab_size": mc.vocab_size,
                "n_heads": mc.n_heads, "n_kv_heads": mc.kv_heads, "tie_embeddings": mc.tie_embeddings,
                "rope_scaling": mc.rope_scaling.rope_type},
      "params": counts,
      "optimizer": {"name": cfg.optim.name, "state_elements": size.elements, "state_bytes": size.bytes,
                    "moment_elements": size.moment_elements, "moment_bytes": size.moment_bytes},
      "memory_estimate_per_device_bytes": {k: int(v) for k, v in mem.items()},
      "memory_estimate_per_device_gib": {k: round(v / GIB, 4) for k, v in mem.items()},
      "memory_fit": fit,
      "flops_per_token": flops.flops_per_token(mc, t.seq_len),
      "devices": n_dev,
      "batch": {"global_batch": t.global_batch, "seq_len": t.seq_len, "grad_accum": t.grad_accum,
                "tokens_per_step": t.global_batch * t.seq_len},
  }


def compiled_memory(cfg, vocab_size: int | None = None, mesh=None) -> dict:
  """XLA's memory analysis of the compiled train step (`train.state.compiled_memory`; one device by default)."""
  from train.state import compiled_memory as compiled
  return compiled(cfg, mesh=mesh, vocab_size=vocab_size if vocab_size is not None else _vocab(cfg))


# ----------------------------------------------------------------------------------------- report for people


def _count(n: float) -> str:
  for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= div:
      return f"{n / div:.2f}{unit}"
  return f"{n:g}"


def _gib(b: float) -> str:
  return f"{b / GIB:.2f} GiB"


def format_summary(s: dict) -> str:
  """`--summary_only`'s default output: the `summarize` dict as an aligned table (`--json` prints the dict)."""
  m, p, o, b = s["model"], s["params"], s["optimizer"], s["batch"]
  kinds = m["attn_kind"] if m["attn_kind"] == m["mlp_kind"] else f"{m['attn_kind']} attention, {m['mlp_kind']} MLP"
  rows = [
      ("model", f"{m['preset'] or 'custom'} LLaMA, {kinds}: d_model {m['d_model']}, {m['n_layers']} layers, "
                f"vocab {m['vocab_size']}"),
      ("parameters", f"{_count(p['total'])} total, {_count(p['non_embedding'])} non-embedding"
                     + (f", {_count(p['active'])} active per token" if p.get("expert") else "")
                     + (f" (dense equivalent {_count(p['dense_equivalent'])})"
                        if p.get("dense_equivalent", p["total"]) != p["total"] else "")),
      ("optimizer", f"{o['name']}: state {_count(o['state_elements'])} values, {_gib(o['state_bytes'])}"),
      ("batch", f"{b['global_batch']} × {b['seq_len']} = {b['tokens_per_step']:,} tokens per step, "
                f"grad_accum {b['grad_accum']}, {s['devices']} device(s)"),
      ("FLOPs/token", f"{s['flops_per_token']:.3g} (forward + backward)"),
  ]
  mem = s["memory_estimate_per_device_bytes"]
  rows.append(("memory/device", "estimate: " + ", ".join(f"{k} {_gib(mem[k])}" for k in mem if k != "total")))
  rows.append(("", f"total {_gib(mem['total'])}"))
  fit = s["memory_fit"]
  limit = fit["device_memory_bytes"]
  source = fit.get("device_memory_source", "")
  if limit is None:
    rows.append(("device memory", source))
    rows.append(("fits", "unknown (no device memory to compare with)"))
  else:
    rows.append(("device memory", f"{_gib(limit)} ({source})"))
    budget = FIT_FRACTION * limit
    if fit["fits"]:
      rows.append(("fits", f"yes: {_gib(mem['total'])} ≤ {_gib(budget)} ({FIT_FRACTION:.0%} of the device)"))
    else:
      rows.append(("fits", f"no: {_gib(mem['total'])} > {_gib(budget)} ({FIT_FRACTION:.0%} of the device)"))
      if not fit["suggestions"]:
        rows.append(("", "no setting of mesh.fsdp, model.remat, train.grad_accum tried fits"))
      for i, sug in enumerate(fit["suggestions"]):
        flags = " ".join(f"--config.{k}={v}" for k, v in sug.items() if k != "total_gib")
        rows.append(("would fit" if i == 0 else "", f"{flags}  ({sug['total_gib']:.2f} GiB)"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)
