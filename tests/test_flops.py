"""train/flops.py (FLOPs per token, peak table) and train/observe.py (MFU, profiler window, compile cache).

Oracle for N_matmul: the model's own parameter tree (every parameter with >= 2 dims except the input embedding;
expert weights scaled by top_k / experts), which is independent of flops.py's closed-form count.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from lostjax.models import Llama, preset
from train import flops, observe


def _oracle_matmul_params(mc) -> float:
  params = nnx.state(nnx.eval_shape(lambda: Llama(mc, rngs=nnx.Rngs(0))), nnx.Param)
  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    if leaf.ndim < 2 or "embed" in keys:
      continue
    n = float(np.prod(leaf.shape))
    if "experts" in keys:
      n *= mc.moe_top_k / mc.moe_experts
    total += n
  return total


@pytest.mark.parametrize("kw", [
    dict(attn_kind="dense", mlp_kind="dense"),
    dict(attn_kind="lowrank", mlp_kind="lowrank"),
    dict(attn_kind="lost", mlp_kind="lost", sparsity=0.1),
    dict(attn_kind="dense", mlp_kind="lost", sparsity=0.05, moe_experts=4, moe_top_k=2),
    dict(attn_kind="dense", mlp_kind="dense", moe_experts=3, moe_top_k=1),
])
def test_matmul_params_match_parameter_tree(kw):
  mc = preset("tiny", **kw)
  assert flops.matmul_params(mc) == pytest.approx(_oracle_matmul_params(mc), rel=1e-12)


def test_flops_per_token_formula_and_60m_value():
  mc = preset("60m", vocab_size=32000)
  n = _oracle_matmul_params(mc)
  assert flops.flops_per_token(mc, 256) == pytest.approx(6 * n + 12 * 8 * 512 * 256)
  # 60M dense: 41,680,896 weights in matmuls incl. the LM head (docs/benchmarks/train_step_cpu.md, count with HF's LlamaForCausalLM)
  assert flops.matmul_params(mc) == 41_680_896
  with pytest.raises(ValueError, match="seq_len"):
    flops.flops_per_token(mc, 0)


def test_peak_table_and_override():
  assert flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5") == 459e12
  assert flops.peak_flops("TPU v6 lite") == 918e12
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("cpu") is None
  assert flops.peak_flops("cpu", 1e12) == 1e12
  with pytest.raises(ValueError, match="-1"):
    flops.peak_flops("cpu", -1.0)
  assert flops.device_memory("NVIDIA H200") == 141 * 2**30
  assert flops.device_memory("cpu") is None


def test_mfu():
  assert observe.mfu(1000.0, 6e9, 4, 1e12) == pytest.approx(1000 * 6e9 / 4e12)
  assert observe.mfu(1000.0, 6e9, 4, None) is None
  with pytest.raises(ValueError, match="peak"):
    observe.mfu(1.0, 1.0, 1, 0.0)


@pytest.mark.parametrize("bad", ["3", "5:2", "a:b", "-1:3", "1:2:3", "2:2"])
def test_profile_steps_rejects(bad):
  with pytest.raises(ValueError, match="profile_steps"):
    observe.parse_profile_steps(bad)


def test_profile_steps_parse():
  assert observe.parse_profile_steps("") is None
  assert observe.parse_profile_steps("2:5") == (2, 5)


def test_compile_cache_off_and_on(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  assert observe.enable_compile_cache("") is False
  assert jax.config.jax_compilation_cache_dir == before
  try:
    assert observe.enable_compile_cache(str(tmp_path / "cc")) is True
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cc")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def _tiny_run_config(**train):
  from train.configs.base import base_config, model_config
  c = base_config()
  c.model = model_config("tiny", "dense")
  c.data.source = "synthetic"
  c.mesh.num_devices = 1
  c.train.update(dict(steps=4, global_batch=4, seq_len=32, log_every=2, eval_every=0, ckpt_every=0,
                      progress=False, plot=False))
  c.train.update(train)
  return c


def _rows(workdir):
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "tokens_per_s" in r]


def test_train_logs_mfu(tmp_path):
  from train import trainer
  c = _tiny_run_config(peak_flops_per_device=1e9)
  trainer.train(c, str(tmp_path / "run"))
  rows = _rows(tmp_path / "run")
  assert len(rows) == 2
  fpt = flops.flops_per_token(preset("tiny", vocab_size=c.model.vocab_size, max_seq_len=1024), 32)
  for r in rows:
    assert math.isclose(r["mfu"], r["tokens_per_s"] * fpt / 1e9, rel_tol=1e-9)
  assert not (tmp_path / "run" / "profile").exists()  # profile_steps="" traces nothing


def test_profile_window_traces_only_inside(tmp_path):
  f = jax.jit(lambda x: x * 2.0)
  win = observe.ProfileWindow("1:3", str(tmp_path))
  x = jax.numpy.ones(4)
  states = []
  for step in range(5):
    win.before(step)
    x = f(x)
    states.append(win.active)
    win.after(step + 1, x)
  win.close()
  assert states == [False, True, True, False, False]
  assert list((tmp_path / "profile").rglob("*.xplane.pb"))
  off = observe.ProfileWindow("", str(tmp_path / "off"))
  off.before(0)
  assert not off.active


@pytest.mark.slow
def test_train_writes_profile_and_no_mfu_on_cpu(tmp_path):
  from train import trainer
  trainer.train(_tiny_run_config(profile_steps="1:3"), str(tmp_path / "run"))
  assert all("mfu" not in r for r in _rows(tmp_path / "run"))  # CPU: no peak known
  assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))


def test_bad_profile_steps_fails_before_writing(tmp_path):
  from train import trainer
  with pytest.raises(ValueError, match="profile_steps"):
    trainer.train(_tiny_run_config(profile_steps="4:2"), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()
