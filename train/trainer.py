"""The training loop: validate, build, resume, then the jitted step, evaluation, logging and checkpoints.

Flat on purpose (nanodo/big_vision style): `train(cfg, workdir)` reads top to bottom. What a run is built from
lives in `state.py` (config → mesh, model, train state), what makes a workdir resumable in `workdir.py`, the pure
step in `step.py`. Nothing is written to the workdir before the whole config is validated and the data, model and
optimizer are built.

Multi-process runs (one process per host): every process runs this same loop on its share of the batch; only
process 0 writes config.json, summary.json, metrics.jsonl, TensorBoard events and loss.png and draws the progress
bar; checkpoints are written by all processes together (orbax); a SIGTERM/SIGINT received by any process is
agreed across processes at the next log step, so that all of them save the same step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from flax import nnx

from lostjax import sharding
from lostjax.models import count_params
from train import checkpoint as ckpt_lib
from train import flops as flops_lib
from train import observe
from train import state as state_lib
from train import workdir as workdir_lib
from train.data import make_data
from train.step import make_eval_step, make_train_step
from train.writer import MetricWriter

BATCH_KEYS = ("tokens", "ids", "mask")


class NonFiniteLossError(RuntimeError):
  pass


def _put_batch(batch: dict, data_sharding, global_rows: int):
  """This process's rows of a batch (make_data gives each process its share) -> global jax.Arrays of
  `global_rows` rows, sharded over the batch axes."""
  def one(x):
    x = np.asarray(x)
    spec = jax.sharding.NamedSharding(data_sharding.mesh, jax.P(*data_sharding.spec[:1], *([None] * (x.ndim - 1))))
    return jax.make_array_from_process_local_data(spec, x, (global_rows,) + x.shape[1:])

  return {k: one(v) for k, v in batch.items() if k in BATCH_KEYS}


def evaluate(eval_fn, params, rest, bundle, data_sharding, global_rows: int) -> dict:
  nats, count = 0.0, 0.0
  for batch in bundle.eval_batches():
    s, c = eval_fn(params, rest, _put_batch(batch, data_sharding, global_rows))
    nats, count = nats + float(s), count + float(c)
  if count == 0:
    return {}
  loss = nats / count
  out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}
  if bundle.eval_num_bytes:
    out["eval_bpb"] = nats / bundle.eval_num_bytes / math.log(2)
  return out


class _Signals:
  """SIGTERM/SIGINT: the first sets a flag, and the loop saves a checkpoint and exits at the next step boundary;
  a second one ends the process at once (exit status 128 + the signal number), without saving.

  The second signal must work while the main thread waits in a step that does not finish (a computation that
  never completes, a collective whose peer died): a Python signal handler only runs when the main thread is back
  in the interpreter, so the signals are also read by a watcher thread from `signal.set_wakeup_fd`, into which
  Python's C-level handler writes the number of every signal it catches, whatever the main thread is doing.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, message=None):
    self.received = None
    self.count = 0
    self._old = {}
    self._old_wakeup = None
    self._write_fd = None
    self._message = message or (lambda text: print(text, file=sys.stderr, flush=True))

  def __enter__(self):
    try:
      for sig in self.SIGNALS:
        self._old[sig] = signal.signal(sig, self._handle)
    except ValueError:  # not the main thread: signals stay with whoever handles them there
      self._restore_handlers()
      return self
    read_fd, self._write_fd = os.pipe()
    os.set_blocking(self._write_fd, False)
    self._old_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
    threading.Thread(target=self._watch, args=(read_fd,), name="lostjax-signal-watcher", daemon=True).start()
    return self

  def _handle(self, signum, frame):
    # The count is kept by the watcher thread (every caught signal reaches it); this only makes sure the flag is
    # set before the loop's next check even if the watcher has not run yet.
    if self.received is None:
      self.received = signal.Signals(signum).name

  def _watch(self, read_fd):
    try:
      while True:
        try:
          data = os.read(read_fd, 64)
        except InterruptedError:
          continue
        if not data:   # the write end was closed by __exit__
          return
        for signum in data:
          if signum not in self.SIGNALS:
            continue
          name = signal.Signals(signum).name
          self.count += 1
          if self.count == 1:
            self.received = self.received or name
            self._message(f"received {name}: saving a checkpoint at the end of the current step, then exiting "
                          f"(send it again to exit at once without saving)")
          else:
            self._message(f"received {name} again: exiting now without saving")
            os._exit(128 + signum)
    finally:
      os.close(read_fd)

  def _restore_handlers(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  def __exit__(self, *exc):
    if self._write_fd is not None:
      signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
      os.close(self._write_fd)   # the watcher reads EOF and ends
      self._write_fd = None
    self._restore_handlers()


def _any_process(flag: bool, allgather=None) -> bool:
  """True on every process if `flag` is True on any (a no-op with one process).

  allgather(np.ndarray [1]) -> [processes, 1]: the collective (jax's multihost all-gather by default).
  """
  if allgather is None:
    if jax.process_count() == 1:
      return flag
    from jax.experimental import multihost_utils
    allgather = multihost_utils.process_allgather
  return bool(np.any(np.asarray(allgather(np.asarray([flag], np.int32)))))


def describe_run(cfg, workdir: str, n_devices: int) -> str:
  """One line printed as a run starts: what it trains, on what, and where the outputs go."""
  m, d, t = cfg.model, cfg.data, cfg.train
  kinds = {m.attn_kind, m.mlp_kind}
  layers = (f"{m.attn_kind} layers" if len(kinds) == 1 else f"{m.attn_kind} attention, {m.mlp_kind} MLP")
  if m.get("moe_experts", 0):
    layers += f", {m.moe_experts} experts top-{m.moe_top_k}"
  preset = m.get("preset", "")
  source = {"stdlib": "the Python standard library's source", "hf": d.hf_name or "a Hugging Face dataset",
            "tfds": f"TFDS {d.tfds_name}", "files": d.paths or "local files"}.get(d.source, f"{d.source} data")
  return (f"training {preset + ' ' if preset else ''}LLaMA ({layers}, d_model {m.d_model}, {m.n_layers} layers) with "
          f"{cfg.optim.name} on {source} ({d.tokenizer} tokenizer): {t.steps} steps of {t.global_batch}×{t.seq_len} "
          f"tokens on {n_devices} device(s); outputs in {workdir}: config.json, summary.json, metrics.jsonl, checkpoints/"
          + (", loss.png" if t.get("plot", True) else ""))


def train(cfg, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics (and the final train state under 'state')."""
  t = cfg.train
  lead = jax.process_index() == 0
  mesh = state_lib.make_mesh(cfg)
  state_lib.validate_config(cfg, mesh)
  if lead:
    print(describe_run(cfg, workdir, mesh.size), flush=True)
  bundle = make_data(cfg.data, seq_len=t.seq_len, global_batch=t.global_batch, seed=t.seed,
                     process_index=jax.process_index(), process_count=jax.process_count())
  model_cfg = state_lib.llama_config(cfg, vocab_size=bundle.vocab_size)
  if bundle.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer vocabulary {bundle.vocab_size} exceeds model.vocab_size={model_cfg.vocab_size}")
  run = state_lib.create_train_state(cfg, mesh=mesh, model_cfg=model_cfg,
                                     num_train_examples=_num_examples(bundle))
  profile = observe.ProfileWindow(t.get("profile_steps", ""), workdir)
  flops_per_token = flops_lib.flops_per_token(model_cfg, t.seq_len)
  peak = flops_lib.peak_flops(mesh.devices.flat[0].device_kind, t.get("peak_flops_per_device", 0.0))
  ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_ckpts)
  try:
    resuming = workdir_lib.prepare_workdir(cfg, workdir, has_checkpoint=ckpt.latest_step() is not None,
                                           write=lead)
  except ValueError:
    ckpt.close()
    raise

  state, rest = run.state, run.rest
  start = 0
  if resuming:
    start = ckpt.latest_step()
    state, rest, data_state = ckpt.restore(start, state, rest)
    bundle.train.set_state(data_state)
    if lead:
      print(f"resumed from {ckpt.directory}/{start}", flush=True)

  state_sh = jax.tree.map(lambda x: x.sharding, state)
  rest_sh = jax.tree.map(lambda x: x.sharding, rest)
  data_sh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(make_train_step(run.graphdef, run.tx, run.schedule, cfg), donate_argnums=(0,),
                    in_shardings=(state_sh, rest_sh, None), out_shardings=(state_sh, None))
  eval_fn = jax.jit(make_eval_step(run.graphdef))

  if lead:
    counts = count_params(nnx.merge(run.graphdef, state["params"], rest))
    summary = {"params": counts, "tokens_per_step": t.global_batch * t.seq_len,
               "model": dataclasses.asdict(model_cfg), "devices": jax.device_count(),
               "processes": jax.process_count(), "mesh": dict(mesh.shape), "data": bundle.info or {}}
    (workdir_lib.as_path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

  writer = MetricWriter(workdir) if lead else None
  last: dict = {}
  pbar = _progress(t, start) if lead else None
  tokens_per_step = t.global_batch * t.seq_len
  timer_step, timer = start, time.perf_counter()
  with jax.set_mesh(mesh), _Signals() as signals:
    step = start
    end = min(t.steps, t.stop_at) if t.stop_at else t.steps
    stop = None
    while step < end:
      batch = _put_batch(next(bundle.train), data_sh, t.global_batch)
      profile.before(step)
      state, metrics = step_fn(state, rest, batch)
      step += 1
      profile.after(step, state)
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
        row_mfu = observe.mfu(row["tokens_per_s"], flops_per_token, mesh.size, peak)
        if row_mfu is not None:
          row["mfu"] = row_mfu
        row.update({k: float(v) for k, v in metrics.items() if k not in ("loss", "ce", "lr", "grad_norm")})
        if writer is not None:
          writer.write(row)
        last = row
        if pbar is not None:
          pbar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        timer_step, timer = step, time.perf_counter()
      if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
        ev = evaluate(eval_fn, state["params"], rest, bundle, data_sh, t.global_batch)
        if ev:
          if writer is not None:
            writer.write({"step": step, "tokens": step * tokens_per_step, **ev})
          last.update(ev)
          if pbar is not None:
            pbar.write(f"step {step}: eval loss {ev['eval_loss']:.4f} ppl {ev['eval_ppl']:.2f}"
                       + (f" bpb {ev['eval_bpb']:.4f}" if "eval_bpb" in ev else ""))
        timer_step, timer = step, time.perf_counter()
      # With several processes the flag is agreed by a blocking all-gather, done at log steps only (every process
      # checks at the same steps) so that it does not synchronise the host with the device at every step.
      at_check = jax.process_count() == 1 or step % t.log_every == 0 or step == end
      if at_check and _any_process(signals.received is not None):
        stop = signals.received or "a signal sent to another process"
      if (t.ckpt_every and step % t.ckpt_every == 0) or step == end or stop:
        _check_finite(state, step, t.nan_policy)
        ckpt.save(step, state, rest, bundle.train.get_state())
      if stop:
        if lead:
          print(f"received {stop}: saved checkpoint at step {step} in {ckpt.directory}; exiting", flush=True)
        break
  profile.close()
  if pbar is not None:
    pbar.close()
  ckpt.close()
  if writer is not None:
    writer.close()
    if t.plot:
      writer.plot("loss.png")
  last["final_step"] = step
  stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU; GPU/TPU: this process's peak (train.study)
  if "peak_bytes_in_use" in stats:
    last["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
  last["state"] = state
  return last


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
