"""Metric output of a run: metrics.jsonl (one JSON object per log event), TensorBoard events, loss.png.

The workdir may be local or remote (`etils.epath`: gs://, s3://, ...). Locally metrics.jsonl is appended to and
flushed after every row; object stores cannot append, so there the file is rewritten whole at every row (a few
thousand short lines per run). Only process 0 of a multi-process run creates a writer (train/trainer.py).
"""

from __future__ import annotations

import io
import json

from etils import epath


class MetricWriter:
  def __init__(self, workdir):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self._remote = "://" in str(workdir)
    self._lines: list[str] = []
    if self._remote:
      self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
      self._file = None
    else:
      self._file = open(self.path, "a")
    self._tb = None
    try:
      from tensorboardX import SummaryWriter  # optional extra: pip install -e .[tensorboard]
      self._tb = SummaryWriter(str(self.workdir / "tb"))
    except ImportError:
      pass

  def write(self, row: dict) -> None:
    line = json.dumps(row) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, row["step"])

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()

  def plot(self, name: str = "loss.png") -> None:
    """Train and eval loss against step (the last value per step wins when a resumed run re-logged a step)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, evals = {}, {}
    for line in self.path.read_text().splitlines():
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    (self.workdir / name).write_bytes(buf.getvalue())
