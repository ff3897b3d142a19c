"""Metric output of a run: metrics.jsonl (one JSON object per log event), TensorBoard events, loss.png."""

from __future__ import annotations

import json
import os


class MetricWriter:
  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a")
    self._tb = None
    try:
      from tensorboardX import SummaryWriter  # optional extra: pip install -e .[tensorboard]
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      pass

  def write(self, row: dict) -> None:
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, row["step"])

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()

  def plot(self, out_png: str) -> None:
    """Train and eval loss against step (the last value per step wins when a resumed run re-logged a step)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, evals = {}, {}
    with open(self.path) as f:
      for line in f:
        row = json.loads(line)
        if "train_loss" in row:
          train[row["step"]] = row["train_loss"]
        if "eval_loss" in row:
          evals[row["step"]] = row["eval_loss"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
      ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train loss")
    if evals:
      ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
