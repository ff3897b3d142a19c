"""Analysis commands over training runs (the library functions live in `lostjax.metrics`):

    python -m train.analyze spectra  --workdir=RUN --text=FILE [--out table.txt --plot spectra.png]
    python -m train.analyze scaling  --runs=RUN_A,RUN_B,RUN_C [--out fit.json --plot fit.png]
    python -m train.analyze pathways --workdir=RUN [...]   (mixture-of-experts routing over checkpoints)

`python -m train.analyze <command> --help` lists a command's flags.
"""
from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from train import cli


def _read_samples(path: str, max_samples: int) -> list:
  """Samples of a text file: blank-line-separated paragraphs (or lines, if there are no blank lines)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  parts = [p.strip() for p in re.split(r"\n\s*\n", text)] if re.search(r"\n\s*\n", text) else text.splitlines()
  parts = [p for p in (q.strip() for q in parts) if p]
  if not parts:
    raise ValueError(f"--text file {path!r} has no non-empty samples")
  return parts[:max_samples]


def spectra(argv) -> int:
  """`spectra`: per-layer gradient spectra of a trained run on the samples of a text file."""
  parser = cli.ArgumentParser(prog="python -m train.analyze spectra", description=spectra.__doc__)
  parser.add_argument("--workdir", required=True, help="training run directory (config.json + checkpoints/)")
  parser.add_argument("--text", required=True, help="text file; samples are paragraphs (or lines)")
  parser.add_argument("--out", help="write the per-layer table here (default: print only)")
  parser.add_argument("--plot", help="save per-layer curves here")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--max-samples", type=int, default=200, help="the paper uses subsets of 200 samples")
  parser.add_argument("--seq-len", type=int, default=0, help="truncate/pad samples to this (default: train.seq_len)")
  parser.add_argument("--include-mlp", action="store_true")
  parser.add_argument("--chunk-size", type=int, default=8, help="samples per vmapped gradient call")
  args = parser.parse_args(argv)
  from flax import nnx

  from lostjax.metrics.gradient_spectra import gradient_spectra, plot_spectra
  from train.checkpoint import load_model
  from train.data.tokenizers import make_tokenizer

  model, cfg = load_model(args.workdir, args.step)
  tok = make_tokenizer(cfg.data.tokenizer, cfg.data.get("tokenizer_path", ""))
  seq_len = args.seq_len or int(cfg.train.seq_len)
  texts = _read_samples(args.text, args.max_samples)
  tokens = np.zeros((len(texts), seq_len), np.int32)
  mask = np.zeros((len(texts), seq_len), np.float32)
  for i, t in enumerate(texts):
    ids = np.asarray(tok.encode(t))[:seq_len]
    tokens[i, :ids.size] = ids
    mask[i, :ids.size] = 1.0
  if np.any(mask.sum(1) < 2):
    raise ValueError("every sample needs at least 2 tokens (one next-token prediction)")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, ex):
    logits = nnx.merge(graphdef, p, rest)(ex["tokens"][None, :-1])[0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ex["tokens"][1:, None], axis=-1)[:, 0]
    w = ex["mask"][1:]
    return jnp.sum(nll * w) / jnp.sum(w)   # mean token cross-entropy of the sample (HF-style)

  result = gradient_spectra(loss_fn, params, {"tokens": tokens, "mask": mask}, static=rest,
                             include_mlp=args.include_mlp, model=model,
                             chunk_size=args.chunk_size)
  table = result.table()
  print(f"{len(texts)} samples, seq_len {seq_len}, kinds {sorted(set(result.kinds))}")
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table + "\n")
  if args.plot:
    plot_spectra(result, args.plot, title=f"{args.workdir}: {len(texts)} samples")
  return 0


def scaling(argv) -> int:
  """`scaling`: fit L(N, D) = E + A/N^α + B/D^β over several run directories (lostjax.metrics.scaling_law)."""
  from lostjax.metrics.scaling_law import fit_runs, load_run, plot_fit

  parser = cli.ArgumentParser(prog="python -m train.analyze scaling", description=scaling.__doc__)
  parser.add_argument("--runs", required=True, help="comma-separated run directories (metrics.jsonl + summary.json)")
  parser.add_argument("--out", help="write the fit as JSON here")
  parser.add_argument("--plot", help="save a loss-vs-tokens plot with the fitted curves here")
  parser.add_argument("--n-key", default="total", help="params key of summary.json used as N (default: total)")
  parser.add_argument("--method", default="both", choices=["both", "huber", "least_squares"])
  parser.add_argument("--min-tokens", type=float, default=0.0,
                      help="drop checkpoints with tokens <= this (paper: 1e10 for billion-token runs)")
  parser.add_argument("--min-fraction", type=float, default=0.1,
                      help="drop each run's checkpoints with tokens <= this fraction of its final tokens")
  parser.add_argument("--no-holdout", action="store_true", help="fit all runs; report in-sample ARE")
  parser.add_argument("--target-train-fraction", type=float, default=0.0,
                      help="with holdout: also fit on the target run's checkpoints below this fraction")
  parser.add_argument("--test-fraction", type=float, default=0.7,
                      help="with holdout: ARE on the target's checkpoints >= this fraction of its tokens")
  args = parser.parse_args(argv)
  run_dirs = [r for r in args.runs.split(",") if r]
  runs = [load_run(r, args.n_key) for r in run_dirs]
  methods = ("huber", "least_squares") if args.method == "both" else (args.method,)
  result = fit_runs(runs, methods=methods, holdout=not args.no_holdout, min_tokens=args.min_tokens,
                    min_fraction=args.min_fraction, target_train_fraction=args.target_train_fraction,
                    test_fraction=args.test_fraction)
  result["n_key"] = args.n_key
  for method, e in result["fits"].items():
    are = e.get("are_heldout", e.get("are_in_sample"))
    print(f"{method:>13}: E={e['E']:.4f} A={e['A']:.4g} alpha={e['alpha']:.4f} B={e['B']:.4g} "
          f"beta={e['beta']:.4f}  points={e['num_points']}  ARE={are:.4%}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  if args.plot:
    plot_fit(runs, result, args.plot)
  if not args.out:
    print(json.dumps(result, indent=2))
  return 0


def pathways(argv) -> int:
  """`pathways`: grokking pathway metrics of a mixture-of-experts run over its checkpoints (train/pathways.py)."""
  from train import pathways as pathways_lib
  return pathways_lib.main(argv)


COMMANDS = {"spectra": spectra, "scaling": scaling, "pathways": pathways}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in COMMANDS:
    print(__doc__, file=sys.stderr)
    print(f"error: expected a command, one of {sorted(COMMANDS)}", file=sys.stderr)
    return 2
  try:
    return COMMANDS[argv[0]](argv[1:])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
