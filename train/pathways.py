"""Grokking pathway metrics of a mixture-of-experts run over its checkpoints (arXiv 2506.21551).

    python -m train.pathways --workdir=RUN [--num_samples 32 --seq_len 128 | --tokens_npy samples.npy]
    python -m train.analyze pathways --workdir=RUN ...          (the same command)

For every checkpoint step (or `--steps`), the model is loaded and run on one fixed set of training samples (the
first training batch of the run's data and seed, or the [N, seq] int array of `--tokens_npy`); it writes
`pathways.json` (per step: mean pairwise pathway edit distance, its length-normalised value, mean and std of the
pathway consistency, the samples' mean next-token loss) and `pathways.png` (the metrics against step). The metrics
are `lostjax.metrics.pathways` (definitions and choices in docs/moe_pathways.md).
"""
from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np

from train import cli


def _steps(workdir: str) -> list[int]:
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    raise ValueError(f"no checkpoints/ directory in workdir {workdir!r}")
  manager = ocp.CheckpointManager(os.path.abspath(path))
  try:
    return sorted(int(s) for s in manager.all_steps())
  finally:
    manager.close()


def _samples(cfg, args) -> tuple[np.ndarray, str]:
  """The fixed samples [N, seq_len] and a description of where they come from."""
  if args.tokens_npy:
    tokens = np.load(args.tokens_npy)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"--tokens_npy must hold a 2-D int array [samples, seq], got {tokens.dtype} {tokens.shape}")
    return tokens.astype(np.int32), os.path.abspath(args.tokens_npy)
  from train.data import make_data
  seq_len = args.seq_len or cfg.train.seq_len
  bundle = make_data(cfg.data, seq_len=seq_len, global_batch=args.num_samples, seed=cfg.train.seed)
  tokens = np.asarray(next(bundle.train)["tokens"], np.int32)  # [N, seq_len + 1]: the run's first training batch
  return tokens, f"first training batch of the run's data (seed {cfg.train.seed}, seq_len {seq_len})"


@functools.lru_cache(maxsize=None)
def _jitted():
  import jax
  import jax.numpy as jnp
  from flax import nnx

  def run(graphdef, state, x, y):
    """Router probabilities [L, b, s, E] and the mean next-token loss per sample [b]."""
    model = nnx.merge(graphdef, state)
    probs = model.route(x).probs
    logp = jax.nn.log_softmax(model(x), -1)
    return probs, -jnp.take_along_axis(logp, y[..., None], -1)[..., 0].mean(-1)

  return jax.jit(run, static_argnums=0)   # one compilation for all checkpoints of a run (same graphdef)


def _route_and_loss(graphdef, state, x, y):
  return _jitted()(graphdef, state, x, y)


def evaluate(model, tokens: np.ndarray, *, top_k: int | None = None, batch_size: int = 16) -> dict:
  """Pathway metrics of `model` on `tokens` [N, seq+1]: routing of the inputs tokens[:, :-1], and the mean
  next-token loss against tokens[:, 1:]."""
  import jax.numpy as jnp
  from flax import nnx

  from lostjax.metrics import pathways as pw

  if not model.cfg.moe_experts:
    raise ValueError("pathway metrics need a mixture-of-experts model (model.moe_experts > 0), got moe_experts=0")
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  if inputs.shape[1] < 1:
    raise ValueError(f"samples need at least 2 tokens (inputs and next-token targets), got shape {tokens.shape}")
  if inputs.shape[1] > model.cfg.max_seq_len:
    raise ValueError(f"samples of {inputs.shape[1]} input tokens exceed model.max_seq_len={model.cfg.max_seq_len}")
  graphdef, state = nnx.split(model)
  probs, nll = [], []
  for i in range(0, inputs.shape[0], batch_size):
    p, l = _route_and_loss(graphdef, state, jnp.asarray(inputs[i:i + batch_size]),
                           jnp.asarray(targets[i:i + batch_size]))
    probs.append(np.asarray(p))
    nll.append(np.asarray(l))
  probs = np.concatenate(probs, axis=1)                        # [L, N, S, E]
  ids, weights = pw.sample_pathways(probs, top_k or model.cfg.moe_top_k)
  consistency = pw.pathway_consistency(ids, weights, pw.router_embeddings(model)) if ids.shape[1] > 1 else None
  return {
      "mean_distance": pw.mean_pathway_distance(ids),
      "mean_distance_normalized": pw.mean_pathway_distance(ids, normalize=True),
      "consistency_mean": None if consistency is None else float(consistency.mean()),
      "consistency_std": None if consistency is None else float(consistency.std()),
      "sample_loss": float(np.concatenate(nll).mean()),
  }


def _plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [r["step"] for r in rows]
  keys = [("mean_distance", "mean pathway edit distance"), ("consistency_mean", "pathway consistency"),
          ("sample_loss", "loss on the samples")]
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
  for ax, (key, title) in zip(axes, keys):
    vals = [np.nan if r[key] is None else r[key] for r in rows]
    ax.plot(steps, vals, marker="o")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str]) -> int:
  parser = cli.ArgumentParser(prog="python -m train.pathways", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="training run directory (config.json + checkpoints/)")
  parser.add_argument("--steps", default="", help="comma-separated checkpoint steps (default: all)")
  parser.add_argument("--tokens_npy", default="", help="[samples, seq+1] int .npy of samples: inputs = all but the "
                      "last column, next-token targets = all but the first (default: the run's data)")
  parser.add_argument("--num_samples", type=int, default=32, help="samples drawn from the run's data")
  parser.add_argument("--seq_len", type=int, default=0, help="sample length from the run's data (0: train.seq_len)")
  parser.add_argument("--top_k", type=int, default=0, help="experts per layer in a pathway (0: model.moe_top_k)")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--out", default="", help="JSON output (default: WORKDIR/pathways.json)")
  parser.add_argument("--plot", default="", help="plot output (default: WORKDIR/pathways.png; 'none' to skip)")
  args = parser.parse_args(argv)
  for name in ("num_samples", "batch_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be positive, got {getattr(args, name)}")
  if args.num_samples < 2 and not args.tokens_npy:
    parser.error(f"--num_samples must be at least 2 (distances are over sample pairs), got {args.num_samples}")

  from train.checkpoint import load_model

  available = _steps(args.workdir)
  if not available:
    raise ValueError(f"no checkpoint in {os.path.join(args.workdir, 'checkpoints')}")
  steps = [int(s) for s in args.steps.split(",") if s.strip()] if args.steps else available
  missing = sorted(set(steps) - set(available))
  if missing:
    raise ValueError(f"--steps {missing} have no checkpoint in {args.workdir!r}; available: {available}")
  rows, tokens, source = [], None, ""
  for step in steps:
    model, cfg = load_model(args.workdir, step=step)
    if tokens is None:
      tokens, source = _samples(cfg, args)
      if tokens.shape[0] < 2:
        raise ValueError(f"pathway distances need at least 2 samples, got {tokens.shape[0]}")
    row = {"step": step, **evaluate(model, tokens, top_k=args.top_k or None, batch_size=args.batch_size)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  out = args.out or os.path.join(args.workdir, "pathways.json")
  result = {"workdir": os.path.abspath(args.workdir), "samples": int(tokens.shape[0]),
            "seq_len": int(tokens.shape[1] - 1), "top_k": args.top_k or int(model.cfg.moe_top_k),
            "experts": int(model.cfg.moe_experts), "layers": int(model.cfg.n_layers), "tokens": source,
            "steps": rows}
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  if args.plot != "none":
    _plot(rows, args.plot or os.path.join(args.workdir, "pathways.png"))
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
