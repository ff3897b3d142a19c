"""Benchmark: each loss + its gradient, jitted on CPU, at batch 256 and 1024; torch references
(pytorch-metric-learning MultiSimilarityLoss(+Miner), diffsort DiffSortNet, a GroCo transcription on
diffsort) timed in the same run where installed. Prints one JSON object.

  python bench/losses.py [--batches 256 1024] [--reps 5]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# this script is itself named losses.py: make `import losses` resolve to the repo package
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import jax
import jax.numpy as jnp
import numpy as np

import losses as L


def _time(fn, reps):
  fn()  # compile / warm up
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def _jax_case(loss, args, argnums=0, grad=True):
  f = jax.jit(jax.value_and_grad(loss, argnums=argnums)) if grad else jax.jit(loss)
  return lambda: jax.block_until_ready(f(*args))


def jax_cases(b, rng):
  """name -> (loss(*args), args, argnums to differentiate or None for forward only).

  Every array is passed as an argument (no closure constants, which XLA would constant-fold).
  """
  n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  ints = lambda hi, *s: jnp.asarray(rng.integers(0, hi, s))
  emb, lab = n(b, 128), jnp.arange(b) % max(b // 4, 1)
  s_t, t_t, y_c = n(b, 100), n(b, 100), ints(100, b)
  eye = jnp.eye(b, dtype=jnp.int32)
  rel16 = jnp.tile(jnp.arange(16.), (b, 1))
  cases = {
      "multi_similarity_loss": (lambda e, l: L.multi_similarity_loss(e, l), (emb, lab), 0),
      "multi_similarity_loss(mining)": (lambda e, l: L.multi_similarity_loss(e, l, mining=True), (emb, lab), 0),
      "groco_loss(2 views, k=10)": (L.groco_loss, (n(2, b, 128),), 0),
      "groco_loss(2 views, k=10, where: 1/8 padded)": (lambda v, w: L.groco_loss(v, where=w),
                                                       (n(2, b, 128), jnp.arange(b) % 8 != 0), 0),
      "diffsort_permutation(odd_even, n=11)": (lambda x: L.diffsort_permutation(x, steepness=1.)[1].sum(), (n(b, 11),), 0),
      "diffsort_permutation(bitonic, n=16)": (lambda x: L.diffsort_permutation(x, network="bitonic")[1].sum(),
                                              (n(b, 16),), 0),
      "mw_loss(per_query, BxB)": (lambda s, y: L.mw_loss(s, y, scope="per_query", max_positives=1), (n(b, b), eye), 0),
      "pld_loss(C=100)": (L.pld_loss, (s_t, t_t, y_c), 0),
      "e2rank_loss(L=16)": (lambda q, c, d, r: L.e2rank_loss(q, d, q, c, r), (n(b, 128), n(b, 16, 128), n(2 * b, 128), rel16),
                            (0, 1)),
      "dpo_loss": (L.dpo_loss, (n(b), n(b), n(b), n(b)), (0, 1)),
      "proto_triplet_loss(20-way)": (L.proto_triplet_loss, (n(b, 128), ints(20, b), n(20, 128)), 0),
      "icnn_loss(self, k=4)": (L.icnn_loss, (n(b, 64), jnp.arange(b) % 20), 0),
      "icnn_loss(self, k=4, D=128)": (L.icnn_loss, (n(b, 128), jnp.arange(b) % 20), 0),
      "dual_head_kd_loss(C=100)": (L.dual_head_kd_loss, (s_t, n(b, 100), t_t, y_c), (0, 1)),
      "unpg_loss(C=1000)": (L.unpg_loss, (n(b, 128), n(1000, 128), ints(1000, b)), (0, 1)),
      "anyloss(f_beta)": (lambda p, y: L.anyloss(p, y, metric="f_beta"), (jax.nn.sigmoid(n(b)), ints(2, b)), 0),
      "lol_regularizer(R=3)": (L.lol_regularizer, (n(b, 3),), 0),
      "fidelity_loss": (L.fidelity_loss, (n(b, 5), n(b, 5), n(b), n(b), jnp.ones(b), jnp.ones(b)), (0, 1)),
      "fedld_margin_loss(C=100)": (L.fedld_margin_loss, (s_t, y_c), 0),
      "sft+cl+URL(1+7 docs)": (lambda zy, zn: L.sft_loss(zy, zn) + L.cl_loss(zy) + L.unified_reranking_loss(
          L.sft_cl_decomposition(zy, zn)["sft_weight"], zy), (n(b, 8), n(b, 8)), (0, 1)),
      "principal_gradient_aggregate(m=10, d=1000B) [no grad]": (
          lambda g, h: L.principal_gradient_aggregate(g, h)[0], (n(10, 1000 * b), jnp.ones(1000 * b)), None),
      "unlikeliness_reward+grpo_advantages(G=8, T=256) [no grad]": (
          lambda r, lp: L.grpo_advantages(L.unlikeliness_reward(r, lp)),
          (ints(2, b // 8, 8).astype(jnp.float32), n(b // 8, 8, 256)), None),
      "curriculum_weights(pairwise, 4 negs) [no grad]": (lambda hp, hn: L.curriculum_weights(hp, hn, epoch=3),
                                                         (jax.nn.sigmoid(n(b)), jax.nn.sigmoid(n(b, 4))), None),
  }
  if b <= 256:   # B^3 pairs: 1024 would need ~1e9 pair evaluations per call
    cases["mw_loss(global, BxB, 1 pos/row)"] = (lambda s, y: L.mw_loss(s, y, max_positives=b), (n(b, b), eye), 0)
    cases["auc(global, BxB) [no grad]"] = (lambda s, y: L.auc(s, y, max_positives=b), (n(b, b), eye), None)
  return {name: _jax_case(fn, args, argnums, grad=argnums is not None)
          for name, (fn, args, argnums) in cases.items()}


def torch_cases(b, rng):
  try:
    import torch
  except ImportError:
    return {}
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  out = {}
  lab = torch.arange(b) % max(b // 4, 1)
  try:
    from pytorch_metric_learning import losses as pl, miners as pm
    emb = torch.tensor(rng.normal(size=(b, 128)), dtype=torch.float32, requires_grad=True)
    ms, miner = pl.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), pm.MultiSimilarityMiner(epsilon=0.1)
    def run_ms(mine):
      emb.grad = None
      loss = ms(emb, lab, miner(emb, lab)) if mine else ms(emb, lab)
      loss.backward()
    out["multi_similarity_loss"] = lambda: run_ms(False)
    out["multi_similarity_loss(mining)"] = lambda: run_ms(True)
  except ImportError:
    pass
  try:
    import diffsort
    for net_type, n in (("odd_even", 11), ("bitonic", 16)):
      x = torch.tensor(rng.normal(size=(b, n)), dtype=torch.float32, requires_grad=True)
      net = diffsort.DiffSortNet(net_type, n, steepness=1. if net_type == "odd_even" else 10.)
      def run_ds(x=x, net=net):
        x.grad = None
        net(x)[1].sum().backward()
      key = "diffsort_permutation(odd_even, n=11)" if net_type == "odd_even" else "diffsort_permutation(bitonic, n=16)"
      out[key] = run_ds
    views = torch.tensor(rng.normal(size=(2, b, 128)), dtype=torch.float32, requires_grad=True)
    sorter = diffsort.DiffSortNet("odd_even", 11, steepness=1., interpolation_type="cauchy")
    bce = torch.nn.BCELoss()
    def run_groco():
      views.grad = None
      total = 0
      for a in range(2):
        anc = views[a]
        an = anc / anc.norm(dim=1, keepdim=True).clamp(min=1e-8)
        pos = torch.nn.functional.cosine_similarity(anc, views[1 - a].detach(), dim=1)[:, None]
        neg = (an @ an.detach().T).masked_fill(torch.eye(b, dtype=torch.bool), -float("inf"))
        sims = torch.cat([torch.flip(torch.topk(neg, 10, dim=1)[0], [1]), pos], 1)
        _, P = sorter(sims)
        t = (torch.arange(11) < 10).float()[None].repeat(b, 1)
        total = total + (bce(P[:, :, 10:].sum(2).clamp(0, 1), 1 - t) + bce(P[:, :, :10].sum(2).clamp(0, 1), t)) / 2
      (total / 2).backward()
    out["groco_loss(2 views, k=10)"] = run_groco
  except ImportError:
    pass
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "cpus": os.cpu_count(),
            "python": platform.python_version(), "unit": "ms (median, value+grad, jitted; compile excluded)",
            "results": {}}
  for b in args.batches:
    jc, tc = jax_cases(b, rng), torch_cases(b, rng)
    for name, fn in jc.items():
      row = {"jax_ms": round(_time(fn, args.reps), 3)}
      if name in tc:
        row["torch_ms"] = round(_time(tc[name], args.reps), 3)
        row["torch_over_jax"] = round(row["torch_ms"] / row["jax_ms"], 2)
      result["results"].setdefault(name, {})[str(b)] = row
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
