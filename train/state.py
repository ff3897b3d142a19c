"""Everything a run is built from: the validated config, the mesh, the model and the train state.

Used by the training loop (`trainer.py`), checkpoint loading (`checkpoint.load_model`), `--summary_only`
(`summary.py`) and the benchmark scripts, so that all of them build exactly the same thing:

    mesh = make_mesh(cfg)
    validate_config(cfg, mesh)                      # every section; raises ValueError naming the bad field
    run = create_train_state(cfg, mesh=mesh, vocab_size=..., num_train_examples=...)
    run.state   # {'params', 'opt', 'obj', 'step', 'bad_step'}: the donated train state, placed on the mesh
    run.rest    # the model's non-trainable variables (LOST channel indices)

The train state is a plain dict of pytrees: `params` (the model's nnx.Param state), `opt` (the optax state),
`obj` (the objectives' state, train/objectives), `step` (int32, optimizer steps done) and `bad_step` (int32, the
first step whose loss or gradient was non-finite, -1 if none).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lostjax import sharding
from lostjax.models import Llama, LlamaConfig
from lostjax.pytree import path_names
from train import objectives
from train import optimizer as optim_lib
from train.data import resolve_pipeline

TRAIN_INTS = ("steps", "global_batch", "seq_len", "grad_accum", "log_every", "keep_ckpts")
TRAIN_NONNEG_INTS = ("eval_every", "ckpt_every", "stop_at")


def llama_config(cfg, vocab_size: int | None = None) -> LlamaConfig:
  """The LlamaConfig of a run config; `model.vocab_size=0` takes `vocab_size` (the tokenizer's)."""
  fields = {k: v for k, v in cfg.model.to_dict().items() if k != "preset"}
  unknown = set(fields) - {f.name for f in dataclasses.fields(LlamaConfig)}
  if unknown:
    raise ValueError(f"unknown model config field(s) {sorted(unknown)}")
  if fields.get("vocab_size", 0) == 0:
    if vocab_size is None:
      raise ValueError("model.vocab_size=0 (take it from the tokenizer) needs the data to be loaded")
    fields["vocab_size"] = vocab_size
  if fields.get("max_seq_len", 0) < cfg.train.seq_len:
    fields["max_seq_len"] = cfg.train.seq_len
  return LlamaConfig(**fields)


def make_mesh(cfg):
  """The device mesh of `cfg.mesh` (data × fsdp × tensor × expert; data=-1 takes the remaining devices)."""
  if not isinstance(cfg.mesh.sharded_init, bool):
    raise ValueError(f"mesh.sharded_init must be a bool, got {cfg.mesh.sharded_init!r}")
  n = cfg.mesh.num_devices
  if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > jax.device_count():
    raise ValueError(f"mesh.num_devices={n!r} must be 0 (all) or at most the {jax.device_count()} available devices")
  devices = jax.devices()[:n] if n else None
  return sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices,
                            expert=cfg.mesh.get("expert", 1))


def check_train_config(cfg, mesh=None) -> None:
  """The `train` section: positive step counts, a batch the mesh and the microbatching divide."""
  t = cfg.train
  for name in TRAIN_INTS:
    v = t[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"train.{name} must be a positive int, got {v!r}")
  for name in TRAIN_NONNEG_INTS:
    if isinstance(t[name], bool) or not isinstance(t[name], int) or t[name] < 0:
      raise ValueError(f"train.{name} must be an int >= 0, got {t[name]!r}")
  if t.nan_policy not in ("stop", "skip"):
    raise ValueError(f"train.nan_policy must be 'stop' or 'skip', got {t.nan_policy!r}")
  if t.global_batch % t.grad_accum:
    raise ValueError(f"train.grad_accum={t.grad_accum} does not divide train.global_batch={t.global_batch}")
  if mesh is not None:
    div = sharding.batch_divisor(mesh)
    if (t.global_batch // t.grad_accum) % div:
      raise ValueError(f"microbatch {t.global_batch // t.grad_accum} (train.global_batch / train.grad_accum) is "
                       f"not divisible by the {div} batch-sharded devices of the mesh")


def validate_config(cfg, mesh=None, vocab_size: int | None = None) -> None:
  """Validates every section that can be checked without reading data: train, model, optimizer, objectives.

  Raises ValueError naming the first bad field. The trainer calls it (and builds the data, which checks the data
  section) before anything is written to the workdir.
  """
  check_train_config(cfg, mesh)
  llama_config(cfg, vocab_size=vocab_size if vocab_size is not None else 1)
  optim_lib.build_optimizer(cfg.optim, optim_lib.lr_schedule(cfg.optim, cfg.train.steps))
  objectives.check_config(cfg.objectives)
  check_saf_ids(cfg)


def check_saf_ids(cfg) -> None:
  """SAF's store is keyed by example id: synthetic data has no finite set of examples, and the streaming pipeline
  gives an example one id only with aligned epochs."""
  d = cfg.data
  if not cfg.objectives.saf.enabled:
    return
  if d.source == "synthetic":
    raise ValueError("objectives.saf.enabled=True needs a finite training set with example ids, and "
                     "data.source='synthetic' has none; use objectives.mesa.enabled=True or a corpus source")
  if resolve_pipeline(d) == "stream" and not d.get("stream_aligned_epochs", False):
    raise ValueError("objectives.saf.enabled=True with data.pipeline='stream' needs data.stream_aligned_epochs=True "
                     "(otherwise a re-read shard is packed into new windows with new ids and the store never hits); "
                     "or use data.pipeline='cached'")


def init_model(model_cfg: LlamaConfig, seed: int, mesh=None, sharded: bool = False):
  """(graphdef, params, rest), placed by the logical-axis rules when a mesh is given (see sharding.init_module)."""
  return sharding.init_module(lambda: Llama(model_cfg, rngs=nnx.Rngs(seed)), mesh, sharded=sharded)


@dataclasses.dataclass
class TrainState:
  """A run's model and train state, and the functions the step is built from."""
  model_cfg: LlamaConfig
  mesh: Any
  graphdef: Any
  state: dict            # {'params', 'opt', 'obj', 'step', 'bad_step'} (donated by the step)
  rest: Any              # the model's non-trainable variables
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def _on_mesh(x, mesh):
  """Leaves created outside the mesh (scalars, objective state) are replicated over it."""
  sh = getattr(x, "sharding", None)
  if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == mesh:
    return x
  return jax.device_put(x, sharding.replicated(mesh))


def optimizer_shardings(opt_shapes, params, mesh):
  """Shardings for the optimizer state `opt_shapes` (`jax.eval_shape(tx.init, params)`), following the parameters.

  A leaf is matched to the parameter whose path is the longest suffix of the leaf's path (optax nests the
  parameter tree inside its states, e.g. `.../mu/layers/0/attn/q/kernel`). A leaf laid out like its parameter
  (Adam moments, FRUGAL/GaLore moments of full-size matrices) gets the parameter's sharding. A leaf of another
  shape (a GaLore/FRUGAL projection [d_in, r] or [r, d_out], moments in the projected space) keeps the parameter's
  split on each dimension of the same position and size, or else of the same size when only one parameter
  dimension has it (the d_in or d_out side, a transposed [d_out, r] projection too), replicated on the others,
  and then split over fsdp on its largest dimension if no dimension took fsdp (`sharding.complete_fsdp`), so no
  per-matrix state is replicated whole on every device. Leaves no parameter path matches are replicated
  (counters, keys, and FRUGAL's moments stacked over the parameters of one shape: split over fsdp, they are
  gathered per parameter with "Involuntary full rematerialization" on data × fsdp × tensor)."""
  by_path = {path_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  replicated = sharding.replicated(mesh)

  def pick(path, leaf):
    names = path_names(path)
    for i in range(len(names)):
      p = by_path.get(names[i:])
      if p is None:
        continue
      sh = getattr(p, "sharding", None)
      if not isinstance(sh, jax.sharding.NamedSharding) or not getattr(leaf, "shape", None):
        break
      if tuple(p.shape) == tuple(leaf.shape):
        return sh
      spec = tuple(sh.spec) + (None,) * (len(p.shape) - len(sh.spec))
      dims, used = [], set()
      for d, n in enumerate(leaf.shape):
        # the parameter's dimension of the same position and size; else the only one of that size (a GaLore
        # projection of the d_out side is stored [d_out, r])
        same = [d] if d < len(p.shape) and n == p.shape[d] else [e for e, m in enumerate(p.shape) if m == n]
        axes = sharding.spec_axes(spec[same[0]]) if len(same) == 1 else ()
        dims.append(sharding.spec_entry(axes) if axes and not used & set(axes) else None)
        used |= set(axes) if dims[-1] is not None else set()
      # spread over fsdp like every parameter (ZeRO-3), e.g. projected moments [r, d_out] of a weight whose d_out
      # is not the fsdp-split side
      return jax.sharding.NamedSharding(mesh, sharding.complete_fsdp(jax.P(*dims), leaf.shape, mesh))
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def create_train_state(cfg, *, mesh, vocab_size: int | None = None, num_train_examples: int = 0,
                       model_cfg: LlamaConfig | None = None) -> TrainState:
  """Builds the model (seed `train.seed`), the optimizer and objective state, all placed on `mesh`."""
  model_cfg = model_cfg or llama_config(cfg, vocab_size=vocab_size)
  graphdef, params, rest = init_model(model_cfg, cfg.train.seed, mesh, sharded=cfg.mesh.sharded_init)
  schedule = optim_lib.lr_schedule(cfg.optim, cfg.train.steps)
  tx = optim_lib.build_optimizer(cfg.optim, schedule)
  with jax.set_mesh(mesh):
    opt_shardings = optimizer_shardings(jax.eval_shape(tx.init, params), params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    if cfg.optim.name == "trp":
      # TRP's step-0 projection, after tx.init (optim/trp.py); a resumed run's restored parameters replace it.
      import optim
      project = lambda p: optim.trp_project_params(p, cfg.optim.trp.energy, cfg.optim.trp.scheme)
      params = jax.jit(project, out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)
    obj_state = objectives.init_state(cfg.objectives, params, num_train_examples=num_train_examples,
                                      seq_len=cfg.train.seq_len, vocab_size=model_cfg.vocab_size)
  state = {"params": params, "opt": opt_state, "obj": obj_state,
           "step": jnp.zeros((), jnp.int32), "bad_step": jnp.full((), -1, jnp.int32)}
  state = jax.tree.map(lambda x: _on_mesh(x, mesh), state)
  return TrainState(model_cfg, mesh, graphdef, state, rest, tx, schedule)


def abstract_params(model_cfg: LlamaConfig):
  """The model's parameters as jax.ShapeDtypeStruct leaves (nothing allocated), e.g. for optimizer-state sizes."""
  return nnx.state(nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)


def abstract_train_state(cfg, *, mesh, model_cfg: LlamaConfig, num_train_examples: int = 0) -> TrainState:
  """`create_train_state` without allocating anything: every leaf of `state` and `rest` is a jax.ShapeDtypeStruct
  carrying the sharding the real state gets on `mesh` (for compiling the step ahead of time, e.g. its memory)."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
  place = lambda tree, shardings: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  params = place(params, sharding.state_shardings(params, mesh))
  rest = place(rest, sharding.state_shardings(rest, mesh))
  schedule = optim_lib.lr_schedule(cfg.optim, cfg.train.steps)
  tx = optim_lib.build_optimizer(cfg.optim, schedule)
  opt_shapes = jax.eval_shape(tx.init, params)
  opt = place(opt_shapes, optimizer_shardings(opt_shapes, params, mesh))
  with jax.set_mesh(mesh):
    obj = jax.eval_shape(lambda p: objectives.init_state(
        cfg.objectives, p, num_train_examples=num_train_examples, seq_len=cfg.train.seq_len,
        vocab_size=model_cfg.vocab_size), params)
  replicated = sharding.replicated(mesh)
  # the objectives place their own large state (the SAF store is sharded over the batch axes); the rest replicated
  keep = lambda x: isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
  obj = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, x.sharding.spec) if keep(x) else replicated), obj)
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  state = {"params": params, "opt": opt, "obj": obj, "step": scalar, "bad_step": scalar}
  return TrainState(model_cfg, mesh, graphdef, state, rest, tx, schedule)


def compiled_memory(cfg, *, mesh=None, vocab_size: int | None = None, num_train_examples: int = 0) -> dict:
  """XLA's memory analysis of the train step compiled exactly as the loop jits it (state shardings, donation, the
  batch over the batch axes), from abstract inputs: nothing is allocated. Bytes per device: argument, output,
  temp, alias and total = argument + output + temp − alias (the donated state's outputs reuse its buffers).
  `mesh=None`: one device. Compiles the step: seconds for small models, minutes for big ones."""
  from train.step import make_train_step
  if mesh is None:
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model_cfg = llama_config(cfg, vocab_size=vocab_size)
  run = abstract_train_state(cfg, mesh=mesh, model_cfg=model_cfg, num_train_examples=num_train_examples)
  state_sh = jax.tree.map(lambda x: x.sharding, run.state)
  rest_sh = jax.tree.map(lambda x: x.sharding, run.rest)
  b, s = cfg.train.global_batch, cfg.train.seq_len
  lead = sharding.batch_sharding(mesh).spec[:1]
  on_batch = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=jax.sharding.NamedSharding(mesh, jax.P(*lead, *([None] * (len(shape) - 1)))))
  batch = {"tokens": on_batch((b, s + 1), jnp.int32), "ids": on_batch((b,), jnp.int32),
           "mask": on_batch((b, s), jnp.float32)}
  step = jax.jit(make_train_step(run.graphdef, run.tx, run.schedule, cfg), donate_argnums=(0,),
                 in_shardings=(state_sh, rest_sh, None), out_shardings=(state_sh, None))
  with jax.set_mesh(mesh), _captured_stderr() as log:
    m = step.lower(run.state, run.rest, batch).compile().memory_analysis()
  out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
         "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  # The SPMD partitioner's warning when it had to replicate a whole tensor to reshard it (a sharding mismatch
  # that costs memory and communication).
  out["involuntary_remat"] = log.getvalue().count("Involuntary full rematerialization")
  return out


class _captured_stderr:
  """Copies what XLA writes to the process's stderr (file descriptor 2) while compiling, and writes it back."""

  def __enter__(self):
    import io
    import sys
    import tempfile
    sys.stderr.flush()
    self._tmp = tempfile.TemporaryFile()
    self._saved = os.dup(2)
    os.dup2(self._tmp.fileno(), 2)
    self._buf = io.StringIO()
    return self._buf

  def __exit__(self, *exc):
    import sys
    sys.stderr.flush()
    os.dup2(self._saved, 2)
    os.close(self._saved)
    self._tmp.seek(0)
    text = self._tmp.read().decode("utf-8", "replace")
    self._tmp.close()
    self._buf.write(text)
    if text:
      sys.stderr.write(text)
    return False
