"""Tests for the kernel benchmarks: bench/layers.py (per-layer timing) and bench/layers_gpu.py --smoke.

The per-layer benchmark must time every variant of the LOST layer (arXiv 2508.02668) and each of its
variants must compute the same function as the dense reference formula it claims to time; the GPU
script's FLOP count is checked against a hand count.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
sys.path.insert(0, BENCH)
import layers as layer_bench  # noqa: E402


def test_layer_variants_compute_the_lost_formula():
  params, idx = layer_bench.make_params(jax.random.key(0), 40, 24, 4, jnp.float32)
  x = jax.random.normal(jax.random.key(1), (6, 40))
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x64 = np.asarray(x, np.float64)
  lr = (x64 @ p["a"]) / (1 + np.exp(-(x64 @ p["a"]))) @ p["b"]
  sp = x64[:, np.asarray(idx)] @ p["ws"]
  g = layer_bench.GAMMA
  expect = {"dense": x64 @ p["w"], "lowrank": lr, "sparse_xla": sp, "sparse_onehot_gemm": sp,
            "sparse_xla_onehotdx": sp, "sparse_pallas": sp, "sparse_pallas_xla_dw": sp}
  for v in layer_bench.LAYER_VARIANTS[2:]:
    expect[v] = g * lr + (1 - g) * sp
  for v, ref in expect.items():
    y = layer_bench.layer_fn(v, idx)(x, layer_bench._params_for(v, params))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5, err_msg=v)


def test_bench_layer_rows_and_ratios():
  rows = layer_bench.bench_layer("tiny", 32, 48, 8, 64, jnp.float32,
                                 ["dense", "lowrank", "lost_concat", "sparse_xla", "nonexistent"],
                                 reps=2)
  by = {r["variant"]: r for r in rows}
  assert by["dense"]["ratio_vs_dense"] == 1.0
  assert by["lost_concat"]["ms_fwd_bwd"] > 0 and "ratio_vs_dense" in by["lost_concat"]
  assert by["sparse_xla"]["speedup_vs_sparse_xla"] == 1.0
  assert "unknown variant" in by["nonexistent"]["error"]
  assert by["lost_concat"]["k"] == int(0.05 * 32)


def test_model_flop_count_matches_hand_count():
  import layers_gpu
  from lostjax.models import preset
  cfg = preset("350m")
  flops, n = layers_gpu.model_flops_per_token(cfg, 1024)
  d, ff, L, V = 1024, 2736, 24, 32000
  n_hand = L * (4 * d * d + 3 * d * ff) + d * V
  assert n == n_hand and flops == 6 * n_hand + 12 * L * d * 1024
  lost = preset("350m", attn_kind="lost", mlp_kind="lost")
  _, n_lost = layers_gpu.model_flops_per_token(lost, 256)
  r = 256
  per = lambda di, do: r * (di + do) + int(0.05 * di) * do
  assert n_lost == L * (4 * per(d, d) + 2 * per(d, ff) + per(ff, d)) + d * V


@pytest.mark.slow
def test_gpu_script_smoke_mode(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path))
  subprocess.run([sys.executable, os.path.join(BENCH, "layers_gpu.py"), "--smoke"], check=True,
                 env=env, timeout=600, capture_output=True)
  res = json.loads((tmp_path / "layers_gpu.json").read_text())
  for sec in ("env", "peak", "check", "sweep", "layers", "model", "torch"):
    assert sec in res and "error" not in res[sec], (sec, res[sec])
  assert all("error" not in r for r in res["layers"]["rows"])
  assert all(r["max_abs_diff_y"] < 1e-3 for r in res["check"]["rows"])
  assert {r["kind"] for r in res["model"]["rows"]} == {"dense", "lost"}
  assert all("tokens_per_s" in r for r in res["model"]["rows"]), res["model"]["rows"]
  assert {"fused", "auto-sep"} <= {r["sparse_impl"] for r in res["model"]["rows"]}
