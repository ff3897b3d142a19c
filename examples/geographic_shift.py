"""Geographic shift on synthetic features: regional disparity before/after last-layer retraining, and the progress gap.

Reproduces, on a small synthetic world, the two measurements of "Does Progress on Object Recognition Benchmarks
Improve Real-World Generalization?" (Richards et al., ICLR 2024, arXiv:2307.13136):

World. C classes, d-dimensional penultimate features of a frozen backbone (4 regions: Europe, Americas, Asia,
Africa). Half of the dimensions carry the object itself (class means mu_c^core, the same everywhere); the other half
carry the context the object is photographed in (mu_c^ctx). Region r shifts the context of class c towards the
context of another class: delta_{r,c} = (s_r / s_max)(mu_{pi_r(c)}^ctx − mu_c^ctx), with s = (0, 0.5, 1.0, 1.5)
(Europe unshifted, Africa fully swapped), plus isotropic noise sigma. The "ImageNet" training data is 90 % Europe, so
a head trained on it leans on the context, which misleads it elsewhere.

1. "ImageNet head": multinomial logistic regression on ImageNet-like features; per-region top-1/top-5 accuracy and
   the disparity D (max − min and Europe − Africa) on a region-balanced test set.
2. Last-layer retraining (`lostjax.vision.last_layer_retraining`, DFR-style) on a region-imbalanced "DollarStreet
   train" split; D after and the disparity reduction (D_before − D_after) / D_before.
3. Progress gap: a zoo of nearest-class-mean classifiers fitted on 5..200 ImageNet-like samples per class (more data =
   higher ImageNet accuracy); a standard benchmark (ImageNet-like test with extra noise) and the geographic test
   are scored for every model, and `train.geographic.write_report` writes the tables, the progress rates/gaps and
   the benchmark-vs-ImageNet scatter plot.

Writes into --out: disparity.png (per-region accuracy before/after), results.json, results.md and report/ (the
harness's models.csv, regions_geo.csv, tables.md, summary.json, scatter.png). Prints the results as JSON.
Usage: python examples/geographic_shift.py --out=/tmp/geo
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lostjax.metrics import geographic as G  # noqa: E402
from lostjax.vision.last_layer_retraining import fit_linear_head, retrain_last_layer  # noqa: E402
from train.geographic import evaluate_classifier, write_report  # noqa: E402

REGIONS = ("Europe", "Americas", "Asia", "Africa")
SHIFTS = (0.0, 0.5, 1.0, 1.5)


def make_world(seed: int = 0, *, num_classes: int = 10, dim: int = 32, sigma: float = 1.5, core_scale: float = 1.0):
  """Class means (core and context halves) and the per-region, per-class context shifts delta [R, C, d]."""
  rng = np.random.default_rng(seed)
  h = dim // 2
  core, ctx = rng.normal(size=(num_classes, h)) * core_scale, rng.normal(size=(num_classes, dim - h))
  delta = np.zeros((len(REGIONS), num_classes, dim))
  for r, s in enumerate(SHIFTS):
    perm = np.roll(np.arange(num_classes), r + 1)
    delta[r, :, h:] = s / max(SHIFTS) * (ctx[perm] - ctx)
  return {"mu": np.concatenate([core, ctx], 1), "delta": delta, "sigma": sigma, "num_classes": num_classes}


def sample(world, n: int, region_probs, rng, *, extra_noise: float = 0.0):
  """(features float32 [n, d], labels [n], region names [n])."""
  r = rng.choice(len(REGIONS), n, p=np.asarray(region_probs) / np.sum(region_probs))
  y = rng.integers(0, world["num_classes"], n)
  noise = (world["sigma"] + extra_noise) * rng.normal(size=(n, world["mu"].shape[1]))
  x = world["mu"][y] + world["delta"][r, y] + noise
  return x.astype(np.float32), y, np.asarray(REGIONS)[r]


IMAGENET_MIX = (0.9, 1 / 30, 1 / 30, 1 / 30)
TRAIN_MIX = (0.4, 0.3, 0.2, 0.1)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="geographic_shift_out")
  p.add_argument("--n_imagenet", type=int, default=2000, help="ImageNet-like rows for the original head")
  p.add_argument("--n_train", type=int, default=2000, help="region-imbalanced rows for last-layer retraining")
  p.add_argument("--n_test", type=int, default=4000, help="region-balanced test rows")
  p.add_argument("--zoo", type=int, default=12, help="models in the progress-gap zoo")
  p.add_argument("--zoo_min_per_class", type=int, default=5)
  p.add_argument("--zoo_max_per_class", type=int, default=200)
  p.add_argument("--std_noise", type=float, default=0.3, help="extra noise of the standard benchmark")
  p.add_argument("--steps", type=int, default=100, help="L-BFGS iterations per head")
  p.add_argument("--num_subsamples", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def ncm_logits(x, means):
  return x @ means.T - 0.5 * np.sum(means ** 2, 1)


def main(argv=None):
  args = parse_args(argv)
  t0 = time.time()
  if os.path.exists(os.path.join(args.out, "results.json")):
    raise SystemExit(f"--out={args.out!r} already holds results.json; choose another directory")
  os.makedirs(args.out, exist_ok=True)
  world = make_world(args.seed)
  rng = np.random.default_rng(args.seed + 1)
  c = world["num_classes"]
  x_in, y_in, _ = sample(world, args.n_imagenet, IMAGENET_MIX, rng)
  x_te, y_te, r_te = sample(world, args.n_test, (1, 1, 1, 1), rng)
  x_tr, y_tr, r_tr = sample(world, args.n_train, TRAIN_MIX, rng)

  # 1. the original head, trained on ImageNet-like data
  mean, std = x_in.mean(0), x_in.std(0) + 1e-8
  w, b = fit_linear_head((x_in - mean) / std, y_in, c, l2=1e-4, steps=args.steps)
  before = evaluate_classifier(((x_te - mean) / std) @ w + b, y_te, r_te)
  # 2. last-layer retraining on the region-balanced DollarStreet-like split
  head = retrain_last_layer(x_tr, y_tr, r_tr, c, num_subsamples=args.num_subsamples, steps=args.steps,
                            seed=args.seed)
  after = evaluate_classifier(np.asarray(head(x_te)), y_te, r_te)
  reduction = float(G.disparity_reduction(before["disparity_top1"], after["disparity_top1"]))

  # 3. the model zoo for the progress gap
  x_iv, y_iv, _ = sample(world, args.n_test, IMAGENET_MIX, rng)
  x_std, y_std, _ = sample(world, args.n_test, IMAGENET_MIX, rng, extra_noise=args.std_noise)
  zoo = []
  for i, per_class in enumerate(np.unique(np.geomspace(args.zoo_min_per_class, args.zoo_max_per_class, args.zoo).astype(int))):
    xs, ys, _ = sample(world, per_class * c, IMAGENET_MIX, np.random.default_rng(1000 + i))
    means = np.stack([xs[ys == k].mean(0) if np.any(ys == k) else np.zeros(xs.shape[1]) for k in range(c)])
    acc_in = float(np.mean(np.argmax(ncm_logits(x_iv, means), 1) == y_iv))
    acc_std = float(np.mean(np.argmax(ncm_logits(x_std, means), 1) == y_std))
    zoo.append({"name": f"ncm_{per_class}", "imagenet_acc": acc_in, "benchmarks": {"noisy": acc_std},
                "geographic": {"geo": evaluate_classifier(ncm_logits(x_te, means), y_te, r_te)}})
  summary = write_report(zoo, os.path.join(args.out, "report"), n_extreme=max(1, min(5, len(zoo) // 3)))

  results = {
      "before": {"region_top1": before["region_top1"], "disparity_top1": before["disparity_top1"],
                 "europe_minus_africa_top1": before["pair_disparity_top1"], "top1": before["top1"],
                 "top5": before["top5"], "disparity_top5": before["disparity_top5"]},
      "after": {"region_top1": after["region_top1"], "disparity_top1": after["disparity_top1"],
                "europe_minus_africa_top1": after["pair_disparity_top1"], "top1": after["top1"],
                "top5": after["top5"], "disparity_top5": after["disparity_top5"]},
      "disparity_reduction_top1": reduction,
      "progress_rate": summary["scales"]["linear"]["progress_rate"],
      "progress_gap_linear": summary["scales"]["linear"]["progress_gap"]["noisy/geo"],
      "progress_gap_probit": summary["scales"]["probit"]["progress_gap"]["noisy/geo"],
      "disparity_growth": summary.get("disparity_growth", {}).get("geo"),
      "seconds": round(time.time() - t0, 1),
  }
  _plot(before, after, os.path.join(args.out, "disparity.png"))
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("| head | " + " | ".join(REGIONS) + " | D (max−min) | Europe−Africa | top-1 |\n")
    f.write("|" + "---|" * (len(REGIONS) + 4) + "\n")
    for name, r in (("ImageNet head", before), ("retrained last layer", after)):
      f.write(f"| {name} | " + " | ".join(f"{r['region_top1'][g]:.3f}" for g in REGIONS)
              + f" | {r['disparity_top1']:.3f} | {r['pair_disparity_top1']:.3f} | {r['top1']:.3f} |\n")
    f.write(f"\nDisparity reduction: {reduction:.3f}. Progress gap (noisy / geo, linear): "
            f"{results['progress_gap_linear']:.3f}; probit: {results['progress_gap_probit']:.3f}.\n")
  print(json.dumps(results))
  return results


def _plot(before, after, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  pos = np.arange(len(REGIONS))
  for off, (name, r) in zip((-0.2, 0.2), (("ImageNet head", before), ("retrained last layer", after))):
    ax.bar(pos + off, [r["region_top1"][g] for g in REGIONS], 0.4,
           label=f"{name} (D = {r['disparity_top1']:.2f})")
  ax.set_xticks(pos, REGIONS)
  ax.set_ylabel("top-1 accuracy")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
