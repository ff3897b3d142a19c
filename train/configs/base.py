"""Defaults shared by every training config. Config files call `base_config()` and override fields.

Every field can be overridden on the command line, e.g. `--config.train.steps=500 --config.optim.lr=3e-4`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from lostjax.models import preset
from train.cli import did_you_mean
from train.data import default_data_config
from train.objectives import default_objectives_config
from train.optimizer import default_optim_config

# A method is a linear kind of lostjax.layers, or a named preset of one: the model fields it sets.
PRESET_METHODS = {
    # CoLA ("CoLA: Compute-Efficient Pre-Training of LLMs via Low-Rank Activation", arXiv 2502.10940): low-rank
    # factors with SiLU between them, h = B σ(A x), trained from independent random factors.
    "cola": ("lowrank", {"lowrank_act": "silu", "lowrank_init": "normal"}),
    # SLTrain (arXiv 2406.02214): low-rank plus a fixed random support of density δ = 0.03 (its paper's value).
    "sltrain": ("sltrain", {"sparsity": 0.03}),
}
METHODS = ("dense", "lowrank", "lost") + tuple(PRESET_METHODS)


def model_config(size: str, method: str = "dense") -> ml_collections.ConfigDict:
  """All LlamaConfig fields for a preset size, with the projections of the chosen method."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r} (methods: {', '.join(METHODS)}){did_you_mean(method, METHODS)}")
  kind, fields = PRESET_METHODS.get(method, (method, {}))
  cfg = preset(size, attn_kind=kind, mlp_kind=kind)
  c = ml_collections.ConfigDict(dataclasses.asdict(cfg))
  c.update(fields)
  c.preset = size
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_config("tiny", "dense")
  c.data = default_data_config()
  c.optim = default_optim_config()
  c.objectives = default_objectives_config()
  # data=-1 takes the devices left after fsdp x tensor; num_devices=0 uses every device; sharded_init=True
  # initialises the parameters already sharded (for models that do not fit on one device; slower to compile).
  # expert: the mesh axis mixture-of-experts layers shard their experts over (model.moe_experts > 0).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, num_devices=0, sharded_init=False))
  c.train = ml_collections.ConfigDict(dict(
      seed=0,
      steps=1000,
      global_batch=32,        # sequences per optimizer step (all devices, all microbatches)
      seq_len=256,
      grad_accum=1,           # microbatches per step (global_batch must divide evenly)
      log_every=10,
      eval_every=200,         # 0: only at the end
      ckpt_every=500,         # 0: only at the end (and on SIGTERM/SIGINT)
      keep_ckpts=3,
      nan_policy="stop",      # 'stop': stop at the first non-finite loss/gradient; 'skip': skip that update
      progress=True,          # tqdm progress bar
      plot=True,              # loss.png at the end
      stop_at=0,              # >0: stop (with a checkpoint) after this step in this invocation; resume later
      profile_steps="",       # "start:stop": a jax.profiler trace of steps [start, stop) in <workdir>/profile
      peak_flops_per_device=0.0,  # peak FLOP/s per device for the logged MFU; 0: look up the device (train/flops.py)
  ))
  # compile_cache_dir: a persistent XLA compilation cache ("" = none); device_memory_gib: per-device memory for
  # --summary_only's fit check (0 = ask the device, else the table in train/flops.py; or name the accelerator with
  # --device=h100|v5e|...).
  c.system = ml_collections.ConfigDict(dict(compile_cache_dir="", device_memory_gib=0.0))
  return c
