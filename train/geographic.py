"""Geographic generalization report: per-model tables, progress gap and a benchmark-vs-ImageNet scatter plot.

Paper: M. Richards, P. Kirichenko, D. Bouchacourt, M. Ibrahim, "Does Progress on Object Recognition Benchmarks
Improve Real-World Generalization?", ICLR 2024, arXiv:2307.13136. The metrics are `lostjax.metrics.geographic`;
this module turns any set of classifiers' outputs into the paper's tables and figure:

* `evaluate_classifier(logits, labels, regions, incomes=None)`: overall, per-region and per-income top-1/top-5
  set accuracy and the disparities (max − min, and the named pair when both regions are present) of one model on
  one geographic dataset;
* `write_report(models, out_dir)`: for a list of models, each {'name', 'imagenet_acc', 'benchmarks':
  {benchmark: accuracy}, 'geographic': {dataset: evaluate_classifier(...)}}, writes
    models.csv          one row per model: ImageNet accuracy, benchmark accuracies, geographic top-1/top-5 and
                        disparities per dataset
    regions_<ds>.csv    per-region (and per-income) top-1 / top-5 accuracy of every model
    summary.json        progress rates of every benchmark (linear / probit / logit), the progress gap of every
                        standard benchmark against every geographic one, the headline max gap, disparity growth
    tables.md           the same as markdown tables
    scatter.png         benchmark accuracy against ImageNet accuracy, one colour per benchmark, with OLS lines
  and returns the summary dict.

Standard benchmarks are given as plain accuracies per model (ImageNet-V2, -A, -R, Sketch, ObjectNet, ...); the
geographic datasets as logits with label sets and region labels, so every model is scored the same way.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Mapping, Optional, Sequence

import numpy as np

from lostjax.metrics import geographic as G


def evaluate_classifier(logits, labels, regions, incomes=None, *, ks: Sequence[int] = (1, 5),
                        pair=("Europe", "Africa")) -> dict:
  """One model on one geographic dataset: {'top{k}': overall, 'region_top{k}': {region: acc}, 'disparity_top{k}',
  'pair_disparity_top{k}' (when both regions of `pair` are present), and 'income_top{k}' when incomes are given}.

  labels: [N, C] multi-hot label sets or [N] integer labels; regions, incomes: [N] group names."""
  z = np.asarray(logits)
  ks = [k for k in ks if k <= z.shape[1]]
  out = {}
  for k in ks:
    correct = np.asarray(G.topk_set_correct(z, labels, k))
    out[f"top{k}"] = float(correct.mean())
    acc = G.accuracy_by_group(z, labels, regions, k=k)
    out[f"region_top{k}"] = acc
    out[f"disparity_top{k}"] = G.disparity(acc)
    if pair is not None and all(p in acc for p in pair):
      out[f"pair_disparity_top{k}"] = G.disparity(acc, pair=tuple(pair))
    if incomes is not None:
      out[f"income_top{k}"] = G.accuracy_by_group(z, labels, incomes, k=k)
  return out


def _check_models(models):
  if not models:
    raise ValueError("models must hold at least one model")
  names = set()
  for i, m in enumerate(models):
    for key in ("name", "imagenet_acc", "benchmarks", "geographic"):
      if key not in m:
        raise ValueError(f"model {i} has no '{key}' entry (keys: {sorted(m)})")
    if m["name"] in names:
      raise ValueError(f"model names must be unique, got {m['name']!r} twice")
    names.add(m["name"])
  bench = set(models[0]["benchmarks"])
  geo = set(models[0]["geographic"])
  for m in models:
    if set(m["benchmarks"]) != bench or set(m["geographic"]) != geo:
      raise ValueError(f"model {m['name']!r} must report the same benchmarks {sorted(bench)} and geographic "
                       f"datasets {sorted(geo)} as the first model")
  return sorted(bench), sorted(geo)


def summarize(models: Sequence[Mapping], *, n_extreme: int = 5) -> dict:
  """Progress rates, gaps (all scales), the headline max gap per geographic dataset and disparity growth."""
  bench, geo = _check_models(models)
  x = np.array([m["imagenet_acc"] for m in models], np.float64)
  ys = {b: np.array([m["benchmarks"][b] for m in models], np.float64) for b in bench}
  ys.update({g: np.array([m["geographic"][g]["top1"] for m in models], np.float64) for g in geo})
  summary = {"num_models": len(models), "standard": bench, "geographic": geo, "scales": {}}
  if len(models) >= 2:
    for scale in G.SCALES:
      rates = {b: float(G.progress_rate(x, y, scale=scale)) for b, y in ys.items()}
      gaps = {f"{b}/{g}": rates[b] / rates[g] for b in bench for g in geo}
      best = {g: max(((rates[b] / rates[g]), b) for b in bench) if bench else None for g in geo}
      summary["scales"][scale] = {"progress_rate": rates, "progress_gap": gaps,
                                  "max_gap": {g: {"gap": v[0], "benchmark": v[1]} for g, v in best.items() if v}}
  n = min(n_extreme, len(models) // 2)
  if n >= 1:
    summary["disparity_growth"] = {g: float(G.disparity_growth(
        x, np.array([m["geographic"][g]["disparity_top1"] for m in models]), n=n)) for g in geo}
    summary["disparity_growth_n"] = n
  return summary


def _fmt(v):
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(models: Sequence[Mapping], out_dir: str, *, n_extreme: int = 5, scale: str = "linear") -> dict:
  """Writes models.csv, regions_<dataset>.csv, summary.json, tables.md and scatter.png into `out_dir`.

  `scale` picks the axes of the scatter plot (the summary holds all three). Refuses to overwrite a report that
  is already in `out_dir`."""
  if scale not in G.SCALES:
    raise ValueError(f"scale must be one of {G.SCALES}, got {scale!r}")
  summary = summarize(models, n_extreme=n_extreme)
  bench, geo = summary["standard"], summary["geographic"]
  if os.path.exists(os.path.join(out_dir, "summary.json")):
    raise ValueError(f"out_dir {out_dir!r} already holds a report (summary.json); choose another directory")
  os.makedirs(out_dir, exist_ok=True)

  cols = ["model", "imagenet_acc"] + bench
  for g in geo:
    cols += [f"{g}_top1", f"{g}_top5", f"{g}_disparity_top1", f"{g}_disparity_top5", f"{g}_pair_disparity_top1"]
  rows = []
  for m in models:
    row = {"model": m["name"], "imagenet_acc": m["imagenet_acc"], **m["benchmarks"]}
    for g in geo:
      r = m["geographic"][g]
      for k in ("top1", "top5", "disparity_top1", "disparity_top5", "pair_disparity_top1"):
        row[f"{g}_{k}"] = r.get(k, "")
    rows.append(row)
  with open(os.path.join(out_dir, "models.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, cols)
    w.writeheader()
    w.writerows(rows)
  md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  md += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]

  for g in geo:
    groups = [("region", k) for k in ("region_top1", "region_top5")]
    groups += [("income", k) for k in ("income_top1", "income_top5")]
    with open(os.path.join(out_dir, f"regions_{g}.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["model", "kind", "metric", "group", "accuracy"])
      for m in models:
        for kind, key in groups:
          for grp, acc in m["geographic"][g].get(key, {}).items():
            w.writerow([m["name"], kind, key.split("_")[1], grp, acc])
    regions = sorted(models[0]["geographic"][g]["region_top1"])
    md += ["", f"Top-1 accuracy per region on {g}:", "", "| model | " + " | ".join(regions) + " | disparity |",
           "|" + "---|" * (len(regions) + 2)]
    md += ["| " + m["name"] + " | " + " | ".join(_fmt(m["geographic"][g]["region_top1"].get(r, float("nan")))
                                                 for r in regions)
           + f" | {_fmt(m['geographic'][g]['disparity_top1'])} |" for m in models]
  if summary["scales"]:
    md += ["", "Progress rates (OLS slope against ImageNet accuracy) and gaps:", "",
           "| scale | " + " | ".join(bench + geo) + " | max gap |", "|" + "---|" * (len(bench) + len(geo) + 2)]
    for sc, v in summary["scales"].items():
      gaps = "; ".join(f"{g}: {d['gap']:.3f} ({d['benchmark']})" for g, d in v["max_gap"].items())
      md += [f"| {sc} | " + " | ".join(_fmt(v["progress_rate"][b]) for b in bench + geo) + f" | {gaps} |"]
  if "disparity_growth" in summary:
    md += ["", f"Disparity growth (mean top-1 disparity of the {summary['disparity_growth_n']} best / worst "
               "ImageNet models): " + ", ".join(f"{g}: {v:.3f}" for g, v in summary["disparity_growth"].items())]
  with open(os.path.join(out_dir, "tables.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  _scatter(models, bench, geo, os.path.join(out_dir, "scatter.png"), scale)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def _scatter(models, bench, geo, path, scale):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from scipy import special
  t = {"linear": lambda a: a, "probit": lambda a: special.ndtri(np.clip(a, 1e-4, 1 - 1e-4)),
       "logit": lambda a: special.logit(np.clip(a, 1e-4, 1 - 1e-4))}[scale]
  x = t(np.array([m["imagenet_acc"] for m in models], np.float64))
  fig, ax = plt.subplots(figsize=(6, 4.5))
  series = [(b, [m["benchmarks"][b] for m in models], "o") for b in bench]
  series += [(g, [m["geographic"][g]["top1"] for m in models], "s") for g in geo]
  for name, y, marker in series:
    y = t(np.asarray(y, np.float64))
    line = ax.scatter(x, y, marker=marker, s=18, label=name)
    if len(x) >= 2 and np.ptp(x) > 0:
      s, a = np.polyfit(x, y, 1)
      xx = np.linspace(x.min(), x.max(), 2)
      ax.plot(xx, a + s * xx, color=line.get_facecolor()[0], lw=1, label=f"  slope {s:.2f}")
  lim = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
  ax.plot(lim, lim, "k:", lw=0.8, label="y = x")
  ax.set_xlabel(f"ImageNet top-1 accuracy ({scale})")
  ax.set_ylabel(f"benchmark top-1 accuracy ({scale})")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
