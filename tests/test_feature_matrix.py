"""Feature interactions: 2 training steps of every row of a pairwise covering design over the training options.

Options that work alone can fail together (a remat policy that does not know a layer kind, an optimizer whose
decomposition deadlocks on a sharded mesh). Testing the full product (4·5·4·4·2·2·2·3 = 7680 runs) is out of
reach, so the rows form a covering design: every pair of values of two options appears in at least one row
(`pairwise_rows`, a deterministic greedy construction). Each row trains 2 steps with finite losses, or, if listed
in `REFUSED`, is refused before anything runs with one error line that names the conflicting fields. Every run is a
subprocess with a time limit, so that a hang fails its row instead of blocking the suite. The design and its
outcome are recorded in docs/testing.md. (`optim/normalized_gd.py` is not a training optimizer: it needs
per-sample margins.) Rows train on synthetic data, except SAF rows: SAF's store is keyed by example id, so they
read a small generated text file (SAF on synthetic data is refused by the config check, tested in
tests/test_objectives_saf.py).
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPTIONS = {
    "layer": ("dense", "lowrank", "lost", "moe"),
    "optimizer": ("adamw", "frugal", "galore", "trp", "lift"),
    "objective": ("none", "mesa", "saf", "reweight"),
    "mesh": ("1", "fsdp2", "tensor2", "expert2"),
    "remat": (False, True),
    "bf16": (False, True),
    "grad_accum": (1, 2),
    "sparse_impl": ("auto", "gather_onehot_grad", "fused_concat"),
}


def pairwise_rows(options: dict) -> list[dict]:
  """A covering design of strength 2: rows (one value per option) such that every pair of values of two different
  options occurs in some row. Greedy and deterministic: each new row starts from the first uncovered pair and
  fills the other options, in order, with the value that covers the most still-uncovered pairs (first on ties)."""
  names = list(options)
  uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
               for va in options[a] for vb in options[b]}
  rows = []
  while uncovered:
    a, va, b, vb = min(uncovered, key=lambda p: (names.index(p[0]), names.index(p[2]), options[p[0]].index(p[1]),
                                                 options[p[2]].index(p[3])))
    row = {a: va, b: vb}
    for name in names:
      if name in row:
        continue
      def gain(v):
        return sum(((m, row[m], name, v) if names.index(m) < names.index(name) else (name, v, m, row[m]))
                   in uncovered for m in row)
      row[name] = max(options[name], key=gain)
    rows.append({n: row[n] for n in names})
    for x, y in itertools.combinations(names, 2):
      uncovered.discard((x, row[x], y, row[y]))
  return rows


ROWS = pairwise_rows(OPTIONS)

# One subprocess per row: builds the config, trains 2 steps, prints one JSON line; a ValueError is one line
# `error: ...` on stderr and exit status 2 (as `python -m train.main` reports it).
SCRIPT = r"""
import json, math, os, sys, tempfile
from train import trainer
from train.configs.base import base_config, model_config

row = json.loads(sys.argv[1])
c = base_config()
layer = row["layer"]
c.model = model_config("tiny", "dense" if layer == "moe" else layer)
c.model.update(dict(d_model=32, d_ff=64, n_heads=2, n_layers=1, attn_rank=4, mlp_rank=4, sparsity=0.25,
                    max_seq_len=16, remat=row["remat"], sparse_impl=row["sparse_impl"]))
if layer == "moe":
  c.model.moe_experts = 2
if row["bf16"]:
  c.model.dtype = "bfloat16"
c.data.update(dict(source="synthetic", eval_max_tokens=0, cache_dir="none"))
if row["objective"] == "saf":   # SAF keys its store by example id: a finite corpus (synthetic data is refused)
  text = os.path.join(tempfile.mkdtemp(), "corpus.txt")
  with open(text, "w") as f:
    f.write("".join(f"line {i}: the quick brown fox jumps over {i * 7 % 13} lazy dogs\n" for i in range(200)))
  c.data.update(dict(source="files", paths=text, val_fraction=0.0))
mesh = row["mesh"]
n = 1 if mesh == "1" else 2
c.mesh.update(dict(num_devices=n, fsdp=2 if mesh == "fsdp2" else 1, tensor=2 if mesh == "tensor2" else 1,
                   expert=2 if mesh == "expert2" else 1))
c.optim.name = row["optimizer"]
c.optim.frugal.update(dict(update_gap=1, proj_type="svd"))
c.optim.galore.update(dict(rank=2, update_gap=1))
c.optim.trp.period = 2
c.optim.lift.update(dict(lora_rank=2, filter_rank=2, update_gap=2))
obj = row["objective"]
if obj != "none":
  c.objectives[obj].enabled = True
  if "start_step" in c.objectives[obj]:
    c.objectives[obj].start_step = 0 if obj == "saf" else 1
  if "warmup_steps" in c.objectives[obj]:
    c.objectives[obj].warmup_steps = 1
c.train.update(dict(steps=2, global_batch=4, seq_len=16, grad_accum=row["grad_accum"], log_every=1, eval_every=0,
                    ckpt_every=0, progress=False, plot=False))
try:
  out = trainer.train(c, tempfile.mkdtemp())
except ValueError as e:
  print(f"error: {e}", file=sys.stderr)
  sys.exit(2)
print(json.dumps({"final_step": out["final_step"], "loss": out["train_loss"]}), flush=True)
"""

LIMIT_S = 600

# Rows expected to be refused at config time, by label, with a word the error line must contain. Every other row
# must train (a row that starts refusing is a regression, not an accepted outcome). Empty: every row trains.
REFUSED: dict[str, str] = {}


def _label(row):
  return "-".join(f"{v}" if not isinstance(v, bool) else (k if v else f"no{k}") for k, v in row.items())


def _params():
  out = []
  for row in ROWS:
    out.append(pytest.param(row, marks=[pytest.mark.slow], id=_label(row)))
  return out


def test_design_covers_every_pair():
  names = list(OPTIONS)
  for a, b in itertools.combinations(names, 2):
    seen = {(r[a], r[b]) for r in ROWS}
    assert seen == set(itertools.product(OPTIONS[a], OPTIONS[b])), (a, b)
  assert len(ROWS) <= 30 and pairwise_rows(OPTIONS) == ROWS     # small and deterministic


@pytest.mark.parametrize("row", _params())
def test_feature_pair_trains_or_refuses_clearly(row):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  try:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(row)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=LIMIT_S)
  except subprocess.TimeoutExpired:
    pytest.fail(f"no result within {LIMIT_S} s (a hang): {row}")
  if _label(row) in REFUSED:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "\n" not in lines[0], proc.stderr[-2000:]
    assert "." in lines[0].split("error: ", 1)[1], f"the refusal must name the config fields: {lines[0]}"
    assert REFUSED[_label(row)] in lines[0], lines[0]
    return
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["final_step"] == 2 and out["loss"] == out["loss"] and abs(out["loss"]) < 1e6, out
