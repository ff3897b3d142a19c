"""Benchmark of the G-Rank simulation (lostjax.metrics.grank): 1,000 nodes x 100 rounds on the default backend.

Prints one JSON object per scenario: compile+run wall and process CPU time of the first call, the same for a
second call with another seed (already compiled), the 1-minute load average, and the final evaluation numbers. Example:
  python bench/grank.py                      # baseline pull, and a targeted Sybil attack with push, F = 0 and 1
  python bench/grank.py --nodes 200 --rounds 50 --scenarios baseline
"""
import argparse
import json
import os
import time

import jax
import numpy as np

from lostjax.metrics.grank import grank_scenario, simulate_grank


def run(name, nodes, rounds, **overrides):
  cfg = grank_scenario(name, num_nodes=nodes, rounds=rounds, **overrides)
  t, c = time.perf_counter(), time.process_time()
  res = simulate_grank(cfg, seed=0)
  jax.block_until_ready(res.state.sim)
  first, first_cpu = time.perf_counter() - t, time.process_time() - c
  t, c = time.perf_counter(), time.process_time()
  res = simulate_grank(cfg, seed=1)
  jax.block_until_ready(res.state.sim)
  second, second_cpu = time.perf_counter() - t, time.process_time() - c
  return dict(bench="grank", scenario=name, nodes=nodes, sybils=cfg.num_sybils, rounds=rounds,
              gossip=cfg.gossip, similarity=cfg.similarity, offset=cfg.offset, terms=cfg.num_terms,
              items_per_term=cfg.items_per_term, first_call_s=round(first, 2), first_call_cpu_s=round(first_cpu, 2), second_call_s=round(second, 2),
              second_call_cpu_s=round(second_cpu, 2), load_avg_1m=round(os.getloadavg()[0], 1),
              final_list_distance=round(float(res.list_distance[-1]), 3),
              final_popular_share=round(float(res.popular_share[-1]), 3),
              final_target_share=None if np.isnan(res.target_share[-1]) else round(float(res.target_share[-1]), 3),
              final_knowledge=round(float(res.knowledge[-1]), 3),
              mean_message_size=round(float(np.mean(res.message_size)), 1), backend=jax.default_backend())


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--nodes", type=int, default=1000)
  p.add_argument("--rounds", type=int, default=100)
  p.add_argument("--scenarios", default="baseline,targeted_sybil")
  args = p.parse_args()
  for name in args.scenarios.split(","):
    if name == "baseline":
      print(json.dumps(run(name, args.nodes, args.rounds)), flush=True)
    else:
      for offset in (0.0, 1.0):
        print(json.dumps(run(name, args.nodes, args.rounds, gossip="push", offset=offset)), flush=True)


if __name__ == "__main__":
  main()
