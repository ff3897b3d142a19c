"""Tests for bench/scale_plan.py's estimate-only rows: no compile, and the estimate `--summary_only` gives."""
import importlib.util
import os
import sys

import pytest

from train import state as state_lib
from train import summary

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "scale_plan.py")


@pytest.fixture(scope="module")
def scale_plan():
  saved = list(sys.path)   # the script points sys.path[0] at the repo when run; keep the test's path as it was
  try:
    spec = importlib.util.spec_from_file_location("scale_plan", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
  finally:
    sys.path[:] = saved
  return mod


def test_estimate_only_row_skips_the_compile_and_matches_summary_only(scale_plan, monkeypatch):
  def no_compile(*a, **k):
    raise AssertionError("estimate_only must not compile")
  monkeypatch.setattr(state_lib, "compiled_memory", no_compile)
  out = scale_plan.row_result("1b-lost-v5e16-remat", estimate_only=True)
  # the same settings as `python -m train.main --config=train/configs/llama.py:1b,lost --summary_only` with
  # bf16, remat, batch 512 x 256 and fsdp over 16 devices
  from train.configs.llama import get_config
  cfg = get_config("1b,lost")
  cfg.model.dtype, cfg.model.remat = "bfloat16", True
  cfg.train.global_batch, cfg.train.seq_len = 512, 256
  cfg.mesh.num_devices, cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 16, -1, 16, 1
  expect = summary.summarize(cfg)["memory_estimate_per_device_bytes"]["total"] / 2.0 ** 30
  assert out["estimate_gib"] == pytest.approx(expect, abs=0.006)
  assert "compiled_gib" not in out and out["fits"] == (expect <= summary.FIT_FRACTION * 16)
  assert out["command"] == "python3 bench/scale_plan.py --estimate_only --rows 1b-lost-v5e16-remat"
