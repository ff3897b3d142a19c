"""Wall time of a small study grid trained one run at a time (`--jobs 1`) against N runs at once (`--jobs N`).

The `cpu` grid's model and data, restricted to `--runs` (default dense and lowrank) at two learning rates each,
`--steps` steps per run, one seed, in fresh temporary directories. Order A B A (jobs 1, jobs N, jobs 1) so that a
drift of the machine's load shows up as a difference between the two A's. The memory-measurement subprocess is
part of every timing (it is the same for both). The load average is printed with each timing: on a shared machine
the figures are not quiet-machine figures.

  python bench/study_jobs.py                       # ~5 min on 2 cores
  python bench/study_jobs.py --jobs 2 --steps 60 --runs dense,lowrank,lost
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import study  # noqa: E402
from train.configs import study as grids  # noqa: E402


def grid(runs: str, steps: int):
  cfg = grids.get_config("cpu")
  cfg.only = runs
  cfg.confirm_seeds = 0
  cfg.train.steps = steps
  cfg.train.eval_every = steps
  cfg.train.ckpt_every = steps
  for name in runs.split(","):
    cfg.runs[name].lrs = (1e-3, 3e-3)
  return cfg


def timed(cfg, jobs: int) -> dict:
  with tempfile.TemporaryDirectory() as d:
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows = study.run_study(cfg, d, log=lambda s: None, jobs=jobs)
    wall = time.perf_counter() - t0
  return {"jobs": jobs, "wall_s": round(wall, 1), "runs": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
          "load_start": [round(x, 2) for x in load0], "load_end": [round(x, 2) for x in os.getloadavg()]}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--jobs", type=int, default=2)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--runs", default="dense,lowrank")
  a = p.parse_args()
  cfg = grid(a.runs, a.steps)
  order = [timed(cfg, 1), timed(cfg, a.jobs), timed(cfg, 1)]
  serial = 0.5 * (order[0]["wall_s"] + order[2]["wall_s"])
  print(json.dumps({"bench": "study_jobs", "cpu_count": os.cpu_count(), "steps": a.steps, "runs": a.runs,
                    "timings": order, "speedup": round(serial / order[1]["wall_s"], 3)}))


if __name__ == "__main__":
  main()
