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
sys.path.append(BENCH)   # after the repo root: bench/losses.py must not shadow the losses package
import layers as layer_bench  # noqa: E402


def test_layer_variants_compute_the_lost_formula():
  params, idx = layer_bench.make_params(jax.random.key(0), 40, 24, 4, jnp.float32)
  x = jax.random.normal(jax.random.key(1), (6, 40))
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x64 = np.asarray(x, np.float64)
  lr = (x64 @ p["a"]) / (1 + np.exp(-(x64 @ p["a"]))) @ p["b"]
  sp = x64[:, np.asarray(idx)] @ p["ws"]
  g = layer_bench.GAMMA
  expect = {"dense": x64 @ p["w"], "lowrank": lr}
  expect.update({v: sp for v in layer_bench.SPARSE_VARIANTS})
  expect.update({v: g * lr + (1 - g) * sp for v in layer_bench.LAYER_VARIANTS[2:]})
  assert set(expect) == set(layer_bench.LAYER_VARIANTS + layer_bench.SPARSE_VARIANTS)
  for v, ref in expect.items():
    y = layer_bench.layer_fn(v, idx)(x, layer_bench._params_for(v, params))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5, err_msg=v)


def test_bench_layer_rows_and_ratios():
  variants = ["dense", "lowrank", "lost_concat", "sparse_xla", "sparse_xla_onehotdx", "nonexistent"]
  rows = layer_bench.bench_layer("tiny", 32, 48, 8, 64, jnp.float32, variants, reps=2)
  by = {r["variant"]: r for r in rows}
  # each ratio is computed from two DIFFERENT implementations' own timings (rounded as the script does)
  for v in ("lowrank", "lost_concat"):
    assert by[v]["ratio_vs_dense"] == pytest.approx(by[v]["ms_fwd_bwd"] / by["dense"]["ms_fwd_bwd"], rel=1e-2)
  onehot = by["sparse_xla_onehotdx"]
  assert onehot["speedup_vs_sparse_xla"] == pytest.approx(by["sparse_xla"]["ms_fwd_bwd"] / onehot["ms_fwd_bwd"],
                                                          rel=1e-2)
  assert all(by[v]["ms_fwd_bwd"] > 0 and by[v]["ms_min"] <= by[v]["ms_fwd_bwd"] for v in variants[:-1])
  assert "ratio_vs_dense" not in by["sparse_xla"] and "speedup_vs_sparse_xla" not in by["lost_concat"]
  assert "unknown variant" in by["nonexistent"]["error"]
  assert by["lost_concat"]["k"] == int(0.05 * 32)


def test_pallas_variants_listed_only_on_their_backend():
  assert layer_bench.variant_backend_ok("sparse_xla", "cpu")
  assert layer_bench.variant_backend_ok("sparse_pallas", "gpu") and not layer_bench.variant_backend_ok("sparse_pallas", "tpu")
  assert layer_bench.variant_backend_ok("lost_pallas_tpu", "tpu") and not layer_bench.variant_backend_ok("lost_pallas_tpu", "gpu")


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
  assert {"fused_concat", "fused_onehot", "auto-sep", "fused_concat-sep"} <= {r["sparse_impl"] for r in res["model"]["rows"]}


@pytest.mark.slow
def test_sparse_tpu_script_smoke_mode(tmp_path):
  out = tmp_path / "sparse_tpu.json"
  subprocess.run([sys.executable, os.path.join(BENCH, "sparse_tpu.py"), "--smoke", "--out", str(out)], check=True,
                 timeout=900, capture_output=True)
  res = json.loads(out.read_text())
  for sec in ("check", "layers", "model"):
    assert "error" not in res[sec], (sec, res[sec])
  for row in res["check"]["rows"]:  # pallas_tpu (TPU interpret mode) against gather_xla
    for name in ("y", "dx", "dw"):
      assert row[f"max_abs_diff_{name}"] <= 1e-5 * max(1.0, row[f"max_abs_{name}"]), row
  assert all("error" not in r for r in res["layers"]["rows"])
  lost = {r["sparse_impl"]: r["loss"] for r in res["model"]["rows"] if r["kind"] == "lost"}
  assert set(lost) == {"gather_xla", "pallas_tpu", "fused_concat", "fused_onehot"}
  assert max(lost.values()) - min(lost.values()) < 1e-4  # the same model whatever the sparse path
  assert res["auto_tpu"] in ("gather_xla", "pallas_tpu")
