"""train/summary.py: the --summary_only memory estimate against XLA's memory analysis of the compiled train step,
and the fit check with its suggestions.

Oracle: `compiled_memory(cfg)` = argument + output + temp − alias bytes of `jax.jit(step).lower(...).compile()`
on the CPU backend (float32), i.e. XLA's own buffer assignment of the very step the loop runs.
"""

from __future__ import annotations

import pytest

from train import summary
from train.configs.base import base_config, model_config

GIB = 2.0 ** 30


def _cfg(method="dense", opt="adamw", batch=8, seq=128, devices=1):
  c = base_config()
  c.model = model_config("tiny", method)
  c.model.vocab_size = 257
  c.optim.name = opt
  c.mesh.num_devices = devices
  c.train.global_batch = batch
  c.train.seq_len = seq
  return c


@pytest.mark.parametrize("method,opt", [("dense", "adamw"), ("lost", "adamw"), ("dense", "frugal")])
def test_estimate_within_10_percent_of_compiled(method, opt):
  cfg = _cfg(method, opt)
  compiled = summary.compiled_memory(cfg)
  assert compiled["total"] == compiled["argument"] + compiled["output"] + compiled["temp"] - compiled["alias"]
  est = summary.summarize(cfg)["memory_estimate_per_device_bytes"]
  assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"), abs=4)
  ratio = est["total"] / compiled["total"]
  assert 0.9 <= ratio <= 1.1, (method, opt, est, compiled, ratio)


def test_estimate_scales_with_batch_and_mesh():
  one = summary.summarize(_cfg(batch=8))["memory_estimate_per_device_bytes"]
  two = summary.summarize(_cfg(batch=16))["memory_estimate_per_device_bytes"]
  assert two["activations"] == pytest.approx(2 * one["activations"], rel=1e-6)
  assert two["params"] == one["params"]
  c = _cfg(batch=16, devices=8)
  c.mesh.fsdp = 4
  sharded = summary.summarize(c)["memory_estimate_per_device_bytes"]
  assert sharded["params"] == pytest.approx(one["params"] / 4, rel=1e-6)
  assert sharded["activations"] == pytest.approx(two["activations"] / 8, rel=1e-6)


def test_attention_scores_only_for_xla_attention():
  c = _cfg(seq=256)
  xla = summary.summarize(c)["memory_estimate_per_device_bytes"]["activations"]
  c.model.attention_impl = "cudnn"
  fused = summary.summarize(c)["memory_estimate_per_device_bytes"]["activations"]
  heads = c.model.n_heads
  assert xla - fused == pytest.approx(c.model.n_layers * 3 * 8 * heads * 256 * 256 * 4)


def test_fits_when_memory_is_ample():
  c = _cfg()
  c.system.device_memory_gib = 16.0
  fit = summary.summarize(c)["memory_fit"]
  assert fit == {"device_memory_bytes": 16 * 2**30, "fits": True, "suggestions": [],
                 "device_memory_source": "system.device_memory_gib=16"}


def test_does_not_fit_suggests_settings_that_fit():
  c = _cfg(batch=64, devices=8)
  total = summary.summarize(c)["memory_estimate_per_device_bytes"]["total"]
  c.system.device_memory_gib = 0.6 * total / GIB  # the budget is 90 % of the device: 0.54 of the total
  out = summary.summarize(c)
  fit = out["memory_fit"]
  assert fit["fits"] is False
  assert fit["suggestions"], fit
  for s in fit["suggestions"]:
    v = _cfg(batch=64, devices=8)
    for key, value in s.items():
      if key != "total_gib":
        sec, field = key.split(".")
        v[sec][field] = value
    est = summary.summarize(v)["memory_estimate_per_device_bytes"]["total"]
    assert est <= 0.9 * fit["device_memory_bytes"]
    assert s["total_gib"] == pytest.approx(est / GIB, abs=1e-3)


def test_nothing_fits_gives_no_suggestion():
  c = _cfg()
  c.system.device_memory_gib = 1e-6
  fit = summary.summarize(c)["memory_fit"]
  assert fit["fits"] is False and fit["suggestions"] == []


def test_flops_per_token_reported():
  from train import flops
  from train.state import llama_config
  c = _cfg("lost")
  assert summary.summarize(c)["flops_per_token"] == flops.flops_per_token(llama_config(c), 128)


def test_unknown_device_memory_on_cpu_and_bad_value():
  fit = summary.summarize(_cfg())["memory_fit"]
  assert fit == {"device_memory_bytes": None, "fits": None, "suggestions": [], "device_memory_source": (
      "unknown: the cpu device (cpu) reports no memory limit; pass --device=<name> (v5e, v5p, h100, h200, ...: "
      "train/flops.py DEVICES) or --config.system.device_memory_gib=<GiB per device>")}
  c = _cfg()
  c.system.device_memory_gib = -1.0
  with pytest.raises(ValueError, match="-1"):
    summary.summarize(c)


def test_optimizer_bytes_follow_the_trainers_placement():
  """The optimizer term places each state leaf as the trainer does (`train.state.optimizer_shardings`): AdamW's
  moments split like their parameters, FRUGAL's moments stacked over the parameters of one shape replicated."""
  import jax
  import numpy as np
  from train.state import abstract_train_state, llama_config, make_mesh
  for opt in ("adamw", "frugal"):
    c = _cfg(opt=opt, batch=16, devices=8)
    c.mesh.fsdp = 8
    est = summary.summarize(c)["memory_estimate_per_device_bytes"]
    run = abstract_train_state(c, mesh=make_mesh(c), model_cfg=llama_config(c))
    held = sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(run.state["opt"]) if hasattr(leaf, "shape"))
    assert est["optimizer"] == pytest.approx(held, rel=1e-3, abs=64), (opt, est, held)
    if opt == "adamw":
      assert est["optimizer"] == pytest.approx(2 * est["params"], rel=1e-3, abs=64)


def test_estimate_when_the_optimizer_update_dominates():
  """One short row: the parameters outweigh the activations and the step peaks in the optimizer update, whose
  temporaries (about 2.2x the parameter bytes) the estimate counts instead of the activations."""
  cfg = _cfg(batch=1, seq=16)
  est = summary.summarize(cfg)["memory_estimate_per_device_bytes"]
  assert est["update"] > 0
  ratio = est["total"] / summary.compiled_memory(cfg)["total"]
  assert 0.9 <= ratio <= 1.1, (est, ratio)


@pytest.mark.slow   # a subprocess importing JAX: seconds on an idle machine, half a minute under load
def test_bench_reestimate_recomputes_only_the_estimate(tmp_path):
  """`bench/memory_estimate.py --reestimate FILE`: each earlier row comes back with the current estimate and
  ratio = estimate / the row's compiled total, nothing compiled (the compiled figures here are made up)."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  compiled = {"argument": 10**6, "output": 0, "temp": 2 * 10**6, "alias": 0, "total": 3 * 10**6,
              "involuntary_remat": 0}
  rows = tmp_path / "rows.json"
  rows.write_text(json.dumps({"case": "tiny:dense:adamw:8", "dtype": "float32", "compiled": compiled,
                              "estimate": {"total": 1}, "ratio": 1.0}) + "\n")
  out = subprocess.run([sys.executable, os.path.join(root, "bench", "memory_estimate.py"), "--reestimate",
                        str(rows)], capture_output=True, text=True, check=True, cwd=root).stdout
  row = json.loads(out.strip().splitlines()[-1])
  from train.configs.llama import get_config
  cfg = get_config("tiny,dense")   # as the script builds the case
  cfg.optim.name, cfg.train.global_batch, cfg.mesh.num_devices, cfg.model.vocab_size = "adamw", 8, 1, 257
  est = summary.summarize(cfg)["memory_estimate_per_device_bytes"]
  assert row["compiled"] == compiled and row["reestimated"] is True
  assert row["estimate"]["total"] == est["total"]
  assert row["ratio"] == round(est["total"] / compiled["total"], 3)
