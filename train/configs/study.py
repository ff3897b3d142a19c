"""Grids of the reproduction study: `python -m train.study --config=train/configs/study.py:<grid> --workdir=DIR`.

A grid is the shared training config of all its runs (every field overridable for all runs at once, e.g.
`--config.train.steps=30`) plus `runs`: one entry per model method × optimizer, each with its learning-rate sweep
(`lrs`) and the config fields it changes (`set`: 'section.field=value' pairs separated by spaces, values read as
Python literals). `seeds` are the seeds of the learning-rate sweep; `confirm_seeds` more seeds then train each run
at its best learning rate (the intervals and verdicts are over all seeds at that rate); `min_steps` (default: the
grid's own length) is the shortest run that gets verdicts; `only='dense,lost'` keeps the runs of those names.
Each (run, lr, seed) trains in `DIR/<run>_lr<lr>[_s<seed>]`. Notes: docs/study.md.

Grids:
* `cpu`: byte-level LLaMA on the Python standard library's source (2 CPU cores, ≤ 30 min for the whole grid).
* `gpu60m`: the 60M presets on C4 (Hugging Face `allenai/c4`, streamed, T5 tokenizer), about 5 minutes of
  training on one H200 for all runs together (an estimate from the 60M throughput, not measured).
* `paper:<size>`: the GaLore/LOST C4 protocol at that preset size (`train/configs/llama.py`), full length.

Learning rates: every run sweeps at least 3 values (4 in `cpu`) a factor ~3 apart that contain the papers' own (dense AdamW
1e-3, GaLore 1e-2; FRUGAL's scripts use 1e-3). The optimizer settings of the runs follow the papers: GaLore rank =
the preset's rank, scale 0.25, T 200; FRUGAL blockwise ρ 0.25 (and ρ 0: sign-SGD only on the matrices), T 200.
"""

from __future__ import annotations

import ml_collections

from train.cli import did_you_mean
from train.configs import llama
from train.configs.base import base_config, model_config

GRIDS = ("cpu", "gpu60m", "paper")

# name -> (method, optimizer, lr kind, extra 'set' fields). The lr kind picks the sweep of the grid.
RUNS = {
    "dense": ("dense", "adamw", "adamw", ""),
    "lowrank": ("lowrank", "adamw", "adamw", ""),
    "lost": ("lost", "adamw", "adamw", ""),
    "dense_galore": ("dense", "galore", "galore", ""),
    "dense_frugal": ("dense", "frugal", "adamw", "optim.frugal.rho=0.25"),
    "dense_frugal_rho0": ("dense", "frugal", "adamw", "optim.frugal.rho=0.0"),
    "lost_frugal": ("lost", "frugal", "adamw", "optim.frugal.rho=0.25"),
}


def _runs(sweeps: dict, galore_rank: int, update_gap: int) -> ml_collections.ConfigDict:
  runs = ml_collections.ConfigDict()
  for name, (method, opt, kind, extra) in RUNS.items():
    s = extra
    if opt == "galore":
      s = f"optim.galore.rank={galore_rank} optim.galore.update_gap={update_gap}"
    if opt == "frugal":
      s = f"{s} optim.frugal.update_gap={update_gap}".strip()
    runs[name] = ml_collections.ConfigDict(dict(method=method, optimizer=opt, lrs=tuple(sweeps[kind]), set=s))
  return runs


def _study_fields(c, grid: str, sweeps: dict, galore_rank: int, update_gap: int, confirm_seeds: int = 2):
  c.grid = grid
  c.only = ""          # comma-separated run names to keep ('' = all)
  c.seeds = (0,)       # the learning-rate sweep's seeds
  c.confirm_seeds = confirm_seeds  # more seeds at each run's best learning rate (the intervals need >= 1)
  c.min_steps = c.train.steps      # shorter runs (e.g. --config.train.steps=30) get no verdict: too short
  c.runs = _runs(sweeps, galore_rank, update_gap)
  return c


def cpu_config():
  """Byte-level model (d 128, 2 layers, rank 32) on the stdlib corpus; sized to the ≤ 30 min CPU budget.

  28 runs (7 × 4 learning rates) of 240 steps × 16 × 128 tokens (0.49M tokens each, the same tokens for all).
  """
  c = base_config()
  c.model = model_config("tiny", "dense")
  c.model.preset = "tiny"
  c.model.d_model = 128
  c.model.d_ff = 344
  c.model.n_layers = 2
  c.model.attn_rank = 32
  c.model.mlp_rank = 32
  c.model.max_seq_len = 128
  c.data.source = "stdlib"
  c.data.tokenizer = "byte"
  c.data.max_bytes = 4_000_000
  c.data.eval_max_tokens = 32_768
  c.optim.name = "adamw"
  c.optim.warmup_frac = 0.1
  c.optim.min_lr_ratio = 0.1
  c.optim.grad_clip = 0.0
  c.train.steps = 240
  c.train.global_batch = 16
  c.train.seq_len = 128
  c.train.log_every = 10
  c.train.eval_every = 60
  c.train.ckpt_every = 120
  c.train.keep_ckpts = 1
  c.train.progress = False
  c.train.plot = False
  # Four values each: with three (1e-3..1e-2 and 3e-3..3e-2) dense AdamW and GaLore were best at an edge.
  sweeps = {"adamw": (3e-4, 1e-3, 3e-3, 1e-2), "galore": (3e-3, 1e-2, 3e-2, 1e-1)}
  return _study_fields(c, "cpu", sweeps, galore_rank=32, update_gap=50)


def gpu60m_config():
  """60M presets on C4, 300 steps of 64 × 256 tokens per run (4.9M tokens), bf16 compute."""
  c = llama.get_config("60m,dense")
  c.model.dtype = "bfloat16"
  c.optim.grad_clip = 0.0
  c.train.steps = 300
  c.train.global_batch = 64
  c.train.eval_every = 100
  c.train.ckpt_every = 300
  c.train.keep_ckpts = 1
  c.train.log_every = 20
  c.train.progress = False
  c.train.plot = False
  c.data.eval_max_tokens = 262_144
  sweeps = {"adamw": (1e-3, 3e-3, 1e-2), "galore": (3e-3, 1e-2, 3e-2)}
  return _study_fields(c, "gpu60m", sweeps, galore_rank=128, update_gap=50)


def paper_config(size: str):
  """The GaLore/LOST C4 protocol at `size` (steps, batch 512 × 256, warmup 10 %, cosine to 10 %)."""
  c = llama.get_config(f"{size},dense")
  c.optim.grad_clip = 0.0
  c.train.progress = False
  c.train.plot = False
  sweeps = {"adamw": (3e-4, 1e-3, 3e-3), "galore": (3e-3, 1e-2, 3e-2)}
  rank = c.model.attn_rank
  return _study_fields(c, f"paper:{size}", sweeps, galore_rank=rank, update_gap=200, confirm_seeds=0)


def run_config(path: str):
  """One study run's full training config, written by train/study.py to `<run dir>/study_config.json`."""
  import json
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def get_config(arg: str = "cpu"):
  grid = (arg or "cpu").strip()
  if grid.startswith("run="):
    return run_config(grid[len("run="):])
  if grid == "cpu":
    return cpu_config()
  if grid == "gpu60m":
    return gpu60m_config()
  if grid.startswith("paper:"):
    size = grid.split(":", 1)[1]
    if size not in llama.STEPS:
      raise ValueError(f"unknown preset size {size!r} in study.py:paper:{size} (sizes: {', '.join(llama.STEPS)})"
                       f"{did_you_mean(size, llama.STEPS, prefix='paper:')}")
    return paper_config(size)
  names = ["cpu", "gpu60m"] + [f"paper:{s}" for s in llama.STEPS]
  raise ValueError(f"unknown study grid {grid!r} (grids: cpu, gpu60m, paper:<size>){did_you_mean(grid, names)}")
