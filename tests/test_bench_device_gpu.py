"""bench/device_gpu.py, the one-command GPU benchmark of LOST (arXiv 2508.02668) against dense: its smoke mode runs
every part on CPU, a failing part does not stop the others, and the time limits hold."""
import argparse
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
sys.path.append(BENCH)   # after the repo root: bench/losses.py must not shadow the losses package
import device_gpu  # noqa: E402


def _boom(smoke, deadline, peak):
  raise RuntimeError("part failed on purpose")


def _check_full_smoke(res):
  for name, _ in device_gpu.PARTS:
    assert "error" not in res[name] and not isinstance(res[name].get("skipped"), str), (name, res[name])
  rows = {(r["kind"], r["sparse_impl"]): r for r in res["model_350m"]["rows"]}
  assert rows[("dense", "auto")]["speedup_vs_dense"] == 1.0
  lost = rows[("lost", "auto+contiguous_down")]
  assert lost["speedup_vs_dense"] == pytest.approx(lost["tokens_per_s"] / rows[("dense", "auto")]["tokens_per_s"],
                                                   rel=1e-3)
  assert [r["sparse_impl"] for r in res["grouped"]["rows"]] == ["fused_concat-sep"]
  assert res["model_1b"]["rows"][0]["tokens_per_s"] > 0
  torch_rows = res["torch"]["rows"]
  assert [r["compiled"] for r in torch_rows] == ["eager", False] and all(r["tokens_per_s"] > 0 for r in torch_rows)
  assert res["summary"]["jax_dense_over_torch_compiled"] == torch_rows[0]["jax_dense_over_torch"]
  prof = res["profile"]
  assert "error" not in prof["trace"], prof["trace"]
  top = prof["trace"]["top"]
  assert 0 < len(top) <= device_gpu.TOP_OPS
  ms = [r["ms_per_step"] for r in top]
  assert ms == sorted(ms, reverse=True) and ms[0] > 0
  assert prof["hlo_op_counts"]["dot"] > 0 and prof["cost_analysis"]["flops"] > 0


def test_smoke_parts_and_a_failing_part(tmp_path, monkeypatch):
  """The cheap parts of the smoke run in-process, after a part that raises (the model parts: the slow test)."""
  monkeypatch.setattr(device_gpu, "PARTS", (("boom", 5),) + device_gpu.PARTS)
  monkeypatch.setitem(device_gpu.PART_FNS, "boom", _boom)
  out = tmp_path / "d.json"
  device_gpu.main(["--smoke", "--inprocess", "--only", "boom,env,peak,layers", "--out", str(out)])
  res = json.loads(out.read_text())
  assert "part failed on purpose" in res["boom"]["error"]
  for name in ("env", "peak", "layers"):
    assert "error" not in res[name], (name, res[name])
  assert res["env"]["sparse_paths"] and res["peak"]["jax_bf16_tflops"] > 0
  assert {r["variant"] for r in res["layers"]["rows"]} == {"dense", "lost_concat", "sparse_xla"}
  assert all(r["ms_fwd_bwd"] > 0 for r in res["layers"]["rows"]) and res["parts"]["boom"] >= 0


@pytest.mark.slow
def test_full_smoke_in_child_processes(tmp_path):
  """Every part, each in its own process as on the GPU machine (about 30 s of CPU)."""
  import subprocess
  out = tmp_path / "d.json"
  subprocess.run([sys.executable, os.path.join(BENCH, "device_gpu.py"), "--smoke", "--out", str(out)], check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=3600)
  _check_full_smoke(json.loads(out.read_text()))


def test_total_budget_and_part_time_limit(tmp_path):
  out = tmp_path / "d.json"
  res = device_gpu.main(["--smoke", "--inprocess", "--total-budget-s", "0", "--out", str(out)])
  assert all("skipped" in res[name] for name, _ in device_gpu.PARTS)
  with pytest.raises(SystemExit, match="unknown part"):
    device_gpu.main(["--only", "peak,nope"])
  # a child process over its limit is killed and recorded, not waited for
  res = device_gpu._child("peak", argparse.Namespace(smoke=True), 0.3, None)
  assert "timed out after" in res["error"]


def test_trace_of_a_jitted_function_lists_its_ops(tmp_path):
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
  a = jnp.ones((64, 64))
  f(a, a).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(2):
      f(a, a).block_until_ready()
  res = device_gpu._trace_top_ops(str(tmp_path), steps=2)
  assert res["source"] == "host executor threads" and res["top"] and res["top"][0]["ms_per_step"] > 0
  # host traces also hold events of other threads (no HLO details); the jitted function's ops must be among the top
  assert any(r.get("detail", {}).get("hlo_module", "").startswith("jit_") for r in res["top"])


def test_trace_parser_sums_device_ops(tmp_path):
  import gzip
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 1, "tid": 1, "name": "fusion.1", "dur": 30.0, "args": {"hlo_op": "fusion.1"}},
            {"ph": "X", "pid": 1, "tid": 1, "name": "gemm.2", "dur": 50.0},
            {"ph": "X", "pid": 1, "tid": 2, "name": "fusion.1", "dur": 30.0},
            {"ph": "X", "pid": 2, "tid": 1, "name": "host_only", "dur": 900.0}]
  d = tmp_path / "plugins" / "profile" / "run"
  d.mkdir(parents=True)
  with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  res = device_gpu._trace_top_ops(str(tmp_path), steps=2, top=1)
  assert res["source"] == "device" and res["ops_seen"] == 2 and res["total_ms_per_step"] == 0.055
  assert res["top"] == [{"op": "fusion.1", "ms_per_step": 0.03, "share": 0.5455, "calls_per_step": 1.0,
                         "detail": {"hlo_op": "fusion.1"}}]
