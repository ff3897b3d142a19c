"""The training loop: mesh, init or resume, jitted step, eval, logging, checkpoints, signals.

Flat on purpose (nanodo/big_vision style): `train(cfg, workdir)` reads top to bottom.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lostjax import sharding
from lostjax.models import Llama, LlamaConfig, count_params
from train import checkpoint as ckpt_lib
from train import objectives
from train import optimizer as optim_lib
from train.data import make_data
from train.step import make_eval_step, make_train_step
from train.writer import MetricWriter

# Config sections whose change makes an existing workdir incompatible (train.steps may change: extend a run).
FINGERPRINT = ("model", "optim", "objectives", "data", "train.seed", "train.global_batch", "train.seq_len",
               "train.grad_accum")
# Config fields added after runs were already written, each with the value that reproduces those runs: a stored
# config.json without the field is compared as if it held this value (so an old run resumes with that setting).
ADDED_FIELDS = {"model.fuse_projections": False}


class NonFiniteLossError(RuntimeError):
  pass


def llama_config(cfg, vocab_size: int | None = None) -> LlamaConfig:
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


def init_model(model_cfg: LlamaConfig, seed: int, mesh=None, sharded: bool = False):
  """(graphdef, params, rest), placed by the logical-axis rules when a mesh is given (see sharding.init_module)."""
  return sharding.init_module(lambda: Llama(model_cfg, rngs=nnx.Rngs(seed)), mesh, sharded=sharded)


def make_mesh(cfg):
  if not isinstance(cfg.mesh.sharded_init, bool):
    raise ValueError(f"mesh.sharded_init must be a bool, got {cfg.mesh.sharded_init!r}")
  n = cfg.mesh.num_devices
  if not isinstance(n, int) or n < 0 or n > jax.device_count():
    raise ValueError(f"mesh.num_devices={n!r} must be 0 (all) or at most the {jax.device_count()} available devices")
  devices = jax.devices()[:n] if n else None
  return sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)


def _check_train_config(cfg, mesh):
  t = cfg.train
  for name in ("steps", "global_batch", "seq_len", "grad_accum", "log_every"):
    v = t[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"train.{name} must be a positive int, got {v!r}")
  for name in ("eval_every", "ckpt_every", "stop_at"):
    if not isinstance(t[name], int) or t[name] < 0:
      raise ValueError(f"train.{name} must be an int >= 0, got {t[name]!r}")
  if t.nan_policy not in ("stop", "skip"):
    raise ValueError(f"train.nan_policy must be 'stop' or 'skip', got {t.nan_policy!r}")
  if t.global_batch % t.grad_accum:
    raise ValueError(f"train.grad_accum={t.grad_accum} does not divide train.global_batch={t.global_batch}")
  div = sharding.batch_divisor(mesh)
  if (t.global_batch // t.grad_accum) % div:
    raise ValueError(f"microbatch {t.global_batch // t.grad_accum} (train.global_batch / train.grad_accum) is not "
                     f"divisible by the {div} batch-sharded devices of the mesh")


def _fingerprint(cfg) -> dict:
  d = cfg.to_dict()
  out = {}
  for key in FINGERPRINT:
    node = d
    for part in key.split("."):
      node = node.get(part) if isinstance(node, dict) else None
    out[key] = node
  return json.loads(json.dumps(out, default=str))


def _diff(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def prepare_workdir(cfg, workdir: str) -> bool:
  """Writes config.json for a new run; for an existing one, checks compatibility. Returns True when resuming."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  fp = _fingerprint(cfg)
  if os.path.exists(path):
    with open(path) as f:
      try:
        old = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); refusing to reuse this workdir") from e
    old_fp = _fingerprint(ml_collections.ConfigDict(old))
    for key, legacy in ADDED_FIELDS.items():
      section, _, field = key.rpartition(".")
      if isinstance(old_fp.get(section), dict):
        old_fp[section].setdefault(field, legacy)
    diffs = _diff(old_fp, fp)
    if diffs:
      raise ValueError(f"workdir {workdir!r} holds a run with a different config; refusing to resume or overwrite "
                       f"it. Differences: {'; '.join(diffs[:8])}. Use a new --workdir.")
    return True
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(cfg.to_dict(), f, indent=2, default=str)
  os.replace(tmp, path)
  return False


def _put_batch(batch: dict, data_sharding):
  """Global numpy batch -> a global jax.Array sharded over the batch axes (each process feeds its rows)."""
  def one(x):
    x = np.asarray(x)
    n, pid = jax.process_count(), jax.process_index()
    rows = x.shape[0] // n
    local = x[pid * rows:(pid + 1) * rows]
    spec = jax.sharding.NamedSharding(data_sharding.mesh, jax.P(*data_sharding.spec[:1], *([None] * (x.ndim - 1))))
    return jax.make_array_from_process_local_data(spec, local, x.shape)
  return {k: one(v) for k, v in batch.items() if k in ("tokens", "ids", "mask")}


def evaluate(eval_fn, params, rest, bundle, data_sharding) -> dict:
  nats, count = 0.0, 0.0
  for batch in bundle.eval_batches():
    s, c = eval_fn(params, rest, _put_batch(batch, data_sharding))
    nats, count = nats + float(s), count + float(c)
  if count == 0:
    return {}
  loss = nats / count
  out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}
  if bundle.eval_num_bytes:
    out["eval_bpb"] = nats / bundle.eval_num_bytes / math.log(2)
  return out


class _Signals:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next step boundary."""

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train(cfg, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics."""
  mesh = make_mesh(cfg)
  _check_train_config(cfg, mesh)
  t = cfg.train
  bundle = make_data(cfg.data, seq_len=t.seq_len, global_batch=t.global_batch, seed=t.seed)
  model_cfg = llama_config(cfg, vocab_size=bundle.vocab_size)
  if bundle.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer vocabulary {bundle.vocab_size} exceeds model.vocab_size={model_cfg.vocab_size}")
  resuming = prepare_workdir(cfg, workdir)

  graphdef, params, rest = init_model(model_cfg, t.seed, mesh, sharded=cfg.mesh.sharded_init)
  schedule = optim_lib.lr_schedule(cfg.optim, t.steps)
  tx = optim_lib.build_optimizer(cfg.optim, schedule)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init)(params)
    obj_state = objectives.init_state(cfg.objectives, params, num_train_examples=_num_examples(bundle),
                                      seq_len=t.seq_len, vocab_size=model_cfg.vocab_size)
  state = {"params": params, "opt": opt_state, "obj": obj_state,
           "step": jnp.zeros((), jnp.int32), "bad_step": jnp.full((), -1, jnp.int32)}
  state = jax.tree.map(lambda x: _on_mesh(x, mesh), state)

  ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_ckpts)
  start = 0
  if resuming and ckpt.latest_step() is not None:
    start = ckpt.latest_step()
    state, rest, data_state = ckpt.restore(start, state, rest)
    bundle.train.set_state(data_state)
    print(f"resumed from {ckpt.directory}/{start}", flush=True)

  state_sh = jax.tree.map(lambda x: x.sharding, state)
  rest_sh = jax.tree.map(lambda x: x.sharding, rest)
  data_sh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(make_train_step(graphdef, tx, schedule, cfg), donate_argnums=(0,),
                    in_shardings=(state_sh, rest_sh, None), out_shardings=(state_sh, None))
  eval_fn = jax.jit(make_eval_step(graphdef))

  counts = count_params(nnx.merge(graphdef, state["params"], rest))
  summary = {"params": counts, "tokens_per_step": t.global_batch * t.seq_len, "model": dataclasses.asdict(model_cfg),
             "devices": jax.device_count(), "mesh": dict(mesh.shape), "data": bundle.info or {}}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)

  writer = MetricWriter(workdir)
  last: dict = {}
  pbar = _progress(t, start)
  tokens_per_step = t.global_batch * t.seq_len
  timer_step, timer = start, time.perf_counter()
  with jax.set_mesh(mesh), _Signals() as signals:
    step = start
    end = min(t.steps, t.stop_at) if t.stop_at else t.steps
    while step < end:
      batch = _put_batch(next(bundle.train), data_sh)
      state, metrics = step_fn(state, rest, batch)
      step += 1
      if pbar is not None:
        pbar.update(1)
      if step % t.log_every == 0 or step == t.steps:
        metrics = jax.device_get(metrics)
        _check_finite(state, step, t.nan_policy)
        now = time.perf_counter()
        row = {"step": step, "tokens": step * tokens_per_step, "train_loss": float(metrics["loss"]),
               "train_ce": float(metrics["ce"]), "lr": float(metrics["lr"]),
               "grad_norm": float(metrics["grad_norm"]),
               "tokens_per_s": (step - timer_step) * tokens_per_step / max(now - timer, 1e-9)}
        row.update({k: float(v) for k, v in metrics.items() if k not in ("loss", "ce", "lr", "grad_norm")})
        writer.write(row)
        last = row
        if pbar is not None:
          pbar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        timer_step, timer = step, time.perf_counter()
      if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
        ev = evaluate(eval_fn, state["params"], rest, bundle, data_sh)
        if ev:
          writer.write({"step": step, "tokens": step * tokens_per_step, **ev})
          last.update(ev)
          if pbar is not None:
            pbar.write(f"step {step}: eval loss {ev['eval_loss']:.4f} ppl {ev['eval_ppl']:.2f}"
                       + (f" bpb {ev['eval_bpb']:.4f}" if "eval_bpb" in ev else ""))
        timer_step, timer = step, time.perf_counter()
      if (t.ckpt_every and step % t.ckpt_every == 0) or step == end or signals.received:
        _check_finite(state, step, t.nan_policy)
        ckpt.save(step, state, rest, bundle.train.get_state())
      if signals.received:
        print(f"received {signals.received}: saved checkpoint at step {step} in {ckpt.directory}; exiting",
              flush=True)
        break
  if pbar is not None:
    pbar.close()
  writer.close()
  ckpt.close()
  if t.plot:
    writer.plot(os.path.join(workdir, "loss.png"))
  last["final_step"] = step
  last["state"] = state
  return last


def _on_mesh(x, mesh):
  """Leaves created outside the mesh (scalars, objective state) are replicated over it."""
  sh = getattr(x, "sharding", None)
  if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == mesh:
    return x
  return jax.device_put(x, sharding.replicated(mesh))


def _check_finite(state, step, policy):
  bad = int(jax.device_get(state["bad_step"]))
  if bad >= 0 and policy == "stop":
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {bad + 1} (0-based update {bad}); stopped before applying it. "
        f"Lower optim.lr, raise optim.grad_clip, or set train.nan_policy='skip' to skip such updates.")


def _num_examples(bundle) -> int:
  info = bundle.info or {}
  return int(info.get("num_train_sequences", 0) or 0)


def _progress(t, start):
  if not t.progress:
    return None
  try:
    from tqdm import tqdm
  except ImportError:
    return None
  return tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True)
