"""Grids of the reproduction study: `python -m train.study --config=train/configs/study.py:<grid> --workdir=DIR`.

A grid is the shared training config of all its runs (every field overridable for all runs at once, e.g.
`--config.train.steps=30`) plus `runs`: one entry per model method × optimizer, each with its learning-rate sweep
(`lrs`) and the config fields it changes (`set`: 'section.field=value' pairs separated by spaces, values read as
Python literals). `seeds` are the seeds of the learning-rate sweep; `confirm_seeds` more seeds then train each run
at its best learning rate (the intervals and verdicts are over all seeds at that rate); `group_mults` (optional)
sweeps the learning-rate multiplier of the embedding, head and norms together with `lrs`; `min_steps` (default: the
grid's own length) is the shortest run that gets verdicts; `only='dense,lost'` keeps the runs of those names.
Each (run, lr, multiplier, seed) trains in `DIR/<run>_lr<lr>[_m<mult>][_s<seed>]`. Notes: docs/study.md.

Grids:
* `cpu`: byte-level LLaMA on the Python standard library's source (2 CPU cores, ≤ 30 min for the whole grid).
* `tuned`: the `cpu` grid's dense, low-rank, LOST, FRUGAL and GaLore runs with the learning rate of the embedding,
  head and norms swept too (`group_mults`); run it in the `cpu` grid's directory.
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

GRIDS = ("cpu", "tuned", "ablate", "capacity", "gpu60m", "paper")

# LOST's ablations (LOST paper §5 ablation tables), each a variant of the `cpu` grid's LOST run (γ 0.5, s 0.05,
# rank 32, L2 channel score on the residual, sparse values from W0, σ = identity): name -> 'set' fields. Names
# carry percentages: lost_gamma25 is γ = 0.25, lost_s03 is s = 0.03, lost_r16_s25 is rank 16 with s = 0.25.
# The rank-vs-sparsity variants keep the linear parameter count within 1 % of rank 32 / s 0.05 (87,456).
ABLATIONS = {
    "gamma": {f"lost_gamma{round(100 * g)}": f"model.gamma={g}" for g in (0.25, 0.75, 0.9)},
    "sparsity": {f"lost_s{round(100 * s):02d}": f"model.sparsity={s}" for s in (0.01, 0.03, 0.1)},
    "budget": {f"lost_r{r}_s{round(100 * s)}": f"model.attn_rank={r} model.mlp_rank={r} model.sparsity={s}"
               for r, s in ((24, 0.15), (16, 0.25), (8, 0.34))},
    "score": {f"lost_score_{k}": f"model.lost_score={k}" for k in ("l1", "random")},
    "values": {"lost_values_residual": "model.lost_sparse_values=residual"},
    "act": {"lost_silu": "model.lowrank_act=silu"},
}
ABLATE_LR = 3e-3   # LOST's best learning rate in the `cpu` grid's sweep (4 values, 1 seed)

# name -> (method, optimizer, lr kind, extra 'set' fields). The lr kind picks the sweep of the grid.
RUNS = {
    "dense": ("dense", "adamw", "adamw", ""),
    "lowrank": ("lowrank", "adamw", "adamw", ""),
    "lost": ("lost", "adamw", "adamw", ""),
    "dense_galore": ("dense", "galore", "galore", ""),
    "dense_frugal": ("dense", "frugal", "adamw", "optim.frugal.rho=0.25"),
    "dense_frugal_rho0": ("dense", "frugal", "adamw", "optim.frugal.rho=0.0"),
    "lost_frugal": ("lost", "frugal", "adamw", "optim.frugal.rho=0.25"),
    # Baselines of LOST's comparison table (presets of train/configs/base.py: PRESET_METHODS).
    "cola": ("lowrank", "adamw", "adamw", "model.lowrank_act=silu model.lowrank_init=normal"),
    "sltrain": ("sltrain", "adamw", "adamw", "model.sparsity=0.03"),
}

# The `cpu` grid's per-group learning-rate sweep (`group_mults`: the embedding, head and norms at m × the learning
# rate, swept together with it): AdamW-based runs try those groups at 1-30× their matrices' rate, GaLore (whose
# best rate is ~30× AdamW's) at 0.1-3×, so both reach embedding rates of 1e-3 … 0.1. (A first sweep, 1-10× and
# 0.1-1×, put dense, FRUGAL and GaLore at its top multiplier and LOST at its top learning rate, hence one more
# multiplier and the AdamW runs' extra 3e-2.) A verdict then compares each
# method at its own best pair, not one method's lucky group rate.
GROUP_MULTS = {"dense": (1.0, 3.0, 10.0, 30.0), "lowrank": (1.0, 3.0, 10.0, 30.0), "lost": (1.0, 3.0, 10.0, 30.0),
               "dense_frugal": (1.0, 3.0, 10.0, 30.0), "dense_galore": (0.1, 0.3, 1.0, 3.0)}


def _runs(sweeps: dict, galore_rank: int, update_gap: int) -> ml_collections.ConfigDict:
  runs = ml_collections.ConfigDict()
  for name, (method, opt, kind, extra) in RUNS.items():
    s = extra
    if opt == "galore":
      s = f"optim.galore.rank={galore_rank} optim.galore.update_gap={update_gap} {extra}".strip()
    if opt == "frugal":
      s = f"{s} optim.frugal.update_gap={update_gap}".strip()
    runs[name] = ml_collections.ConfigDict(dict(method=method, optimizer=opt, lrs=tuple(sweeps[kind]), set=s))
  return runs


def _study_fields(c, grid: str, sweeps: dict, galore_rank: int, update_gap: int, confirm_seeds: int = 2):
  c.grid = grid
  c.reference = "dense"  # the run every other run is compared with (paired differences)
  c.only = ""          # comma-separated run names to keep ('' = all)
  c.seeds = (0,)       # the learning-rate sweep's seeds
  c.confirm_seeds = confirm_seeds  # more seeds at each run's best learning rate (the intervals need >= 1)
  c.min_steps = c.train.steps      # shorter runs (e.g. --config.train.steps=30) get no verdict: too short
  c.runs = _runs(sweeps, galore_rank, update_gap)
  return c


def cpu_config():
  """Byte-level model (d 128, 2 layers, rank 32) on the stdlib corpus; sized to the ≤ 30 min CPU budget.

  36 sweep runs (9 × 4 learning rates) and 18 confirmation runs (2 seeds × 9) of 240 steps × 16 × 128 tokens
  (0.49M tokens each, the same tokens for all runs of one seed).
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


def tuned_config():
  """The `cpu` grid's dense, low-rank, LOST, FRUGAL and GaLore runs with the embedding, head and norms' learning
  rate tuned together with the learning rate (GROUP_MULTS), so that a verdict compares methods at their own best
  group rates. Meant to share the `cpu` grid's directory: its multiplier-1 runs are the `cpu` grid's runs and are
  skipped when finished. 96 sweep runs (4 AdamW-based runs × 5 learning rates × 4 multipliers, GaLore 4 × 4), then
  2 seeds × 5."""
  c = cpu_config()
  c.grid = "tuned"
  runs = ml_collections.ConfigDict()
  for name, mults in GROUP_MULTS.items():
    runs[name] = c.runs[name]
    runs[name].group_mults = mults
    if runs[name].optimizer != "galore":
      runs[name].lrs = tuple(runs[name].lrs) + (3e-2,)
  c.runs = runs
  return c


def ablate_config(question: str = ""):
  """LOST's ablations on the `cpu` grid's model and tokens: the LOST run and its variants (ABLATIONS), each at the
  `cpu` grid's best LOST learning rate (ABLATE_LR) with three seeds (0, 1, 2), compared with the LOST run seed by
  seed. `ablate:<question>` keeps the LOST run and that question's variants (gamma, sparsity, budget, score,
  values, act)."""
  if question and question not in ABLATIONS:
    raise ValueError(f"unknown ablation {question!r} in ablate:{question}; expected one of {', '.join(ABLATIONS)}"
                     f"{did_you_mean(question, ABLATIONS)}")
  c = cpu_config()
  c.grid = "ablate" + (f":{question}" if question else "")
  c.seeds = (0, 1, 2)
  c.confirm_seeds = 0
  c.reference = "lost"
  runs = ml_collections.ConfigDict()
  runs.lost = ml_collections.ConfigDict(dict(method="lost", optimizer="adamw", lrs=(ABLATE_LR,), set=""))
  for q, variants in ABLATIONS.items():
    for name, s in variants.items():
      runs[name] = ml_collections.ConfigDict(dict(method="lost", optimizer="adamw", lrs=(ABLATE_LR,), set=s))
  c.runs = runs
  c.only = ",".join(["lost", *ABLATIONS[question]]) if question else ""
  return c


def capacity_config():
  """A capacity-bound CPU grid: a small model (d 64, 2 layers, d_ff 172, rank 16 = d/4, 99k non-embedding
  parameters in the dense model) trained on 12.6M tokens (6,144 steps × 16 × 128), about 127 tokens per
  non-embedding parameter of the dense model, read from 20 MB of the corpus so that no byte is seen twice. At
  2,048 steps (42 tokens per parameter) the dense eval loss still fell 1.7 % over the last eighth of training
  and the best dense learning rate was the largest swept (1e-2), so the sweep is 3e-3 … 3e-2 and the budget 3×.
  Runs: dense (four learning rates), lowrank, lost (three each), then 2 confirmation seeds (16 runs)."""
  c = cpu_config()
  c.grid = "capacity"
  c.model.d_model = 64
  c.model.d_ff = 172
  c.model.n_heads = 2
  c.model.attn_rank = 16
  c.model.mlp_rank = 16
  c.data.max_bytes = 20_000_000
  c.train.steps = 6144
  c.train.eval_every = 768
  c.train.ckpt_every = 1536
  c.train.log_every = 128
  c.min_steps = c.train.steps
  keep = ("dense", "lowrank", "lost")
  runs = ml_collections.ConfigDict()
  for name in keep:
    runs[name] = c.runs[name]
    runs[name].lrs = (3e-3, 1e-2, 3e-2)
  # Dense was best at 3e-3, the bottom of that sweep (1e-2 within 0.1 %): one value lower settles the edge.
  runs.dense.lrs = (1e-3, 3e-3, 1e-2, 3e-2)
  c.runs = runs
  return c


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
  if grid == "tuned":
    return tuned_config()
  if grid == "capacity":
    return capacity_config()
  if grid == "ablate" or grid.startswith("ablate:"):
    return ablate_config(grid.partition(":")[2])
  if grid == "gpu60m":
    return gpu60m_config()
  if grid.startswith("paper:"):
    size = grid.split(":", 1)[1]
    if size not in llama.STEPS:
      raise ValueError(f"unknown preset size {size!r} in study.py:paper:{size} (sizes: {', '.join(llama.STEPS)})"
                       f"{did_you_mean(size, llama.STEPS, prefix='paper:')}")
    return paper_config(size)
  names = ["cpu", "tuned", "capacity", "ablate", "gpu60m"] + [f"paper:{s}" for s in llama.STEPS]
  raise ValueError(f"unknown study grid {grid!r} (grids: cpu, tuned, capacity, ablate[:<question>], gpu60m, "
                   f"paper:<size>){did_you_mean(grid, names)}")
