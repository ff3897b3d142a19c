"""Training entrypoint: end-to-end run, outputs, resume equality, mesh equality, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from train import trainer
from train.configs import llama as llama_cfg
from train.configs import quickstart
from train.configs.base import base_config, model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp_path, method="lost", steps=6, **train):
  c = base_config()
  c.model = model_config("tiny", method)
  c.model.attn_rank = c.model.mlp_rank = 8
  c.model.sparsity = 0.1
  c.model.sparse_impl = "xla"
  c.data.source = "stdlib"
  c.data.max_bytes = 300_000
  c.data.eval_max_tokens = 2048
  c.data.cache_dir = str(tmp_path / "cache")
  c.mesh.num_devices = 1
  c.train.update(dict(steps=steps, global_batch=8, seq_len=32, log_every=2, eval_every=0, ckpt_every=3,
                      progress=False, plot=False))
  c.train.update(train)
  return c


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_end_to_end_outputs_and_loss_decreases(tmp_path):
  cfg = _cfg(tmp_path, steps=30, log_every=5, eval_every=15, ckpt_every=15, plot=True)
  cfg.optim.lr = 3e-3
  out = trainer.train(cfg, str(tmp_path / "run"))
  run = tmp_path / "run"
  for name in ("config.json", "summary.json", "metrics.jsonl", "loss.png"):
    assert (run / name).exists(), name
  rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
  train_rows = [r for r in rows if "train_loss" in r]
  eval_rows = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
  assert [r["step"] for r in eval_rows] == [15, 30]
  for key in ("step", "train_loss", "lr", "tokens_per_s", "tokens"):
    assert key in train_rows[0]
  for key in ("eval_loss", "eval_ppl", "eval_bpb"):
    assert key in eval_rows[0]
  assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"] - 0.5   # real text, bytes: ln 257 = 5.55
  assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
  np.testing.assert_allclose(eval_rows[0]["eval_ppl"], np.exp(eval_rows[0]["eval_loss"]), rtol=1e-6)
  assert sorted(os.listdir(run / "checkpoints")) == ["15", "30"]
  assert out["final_step"] == 30
  summary = json.load(open(run / "summary.json"))
  assert summary["params"]["index_count"] > 0
  # the checkpoint rebuilds the trained model (used by the analysis commands)
  from flax import nnx
  from train.checkpoint import load_model
  model, _ = load_model(str(run))
  tokens = jax.numpy.arange(16, dtype=jax.numpy.int32)[None]
  trained = nnx.state(model, nnx.Param)
  for a, b in zip(jax.tree.leaves(trained), _params(out["state"])):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert model(tokens).shape == (1, 16, 257)


@pytest.mark.parametrize("method", ["dense", pytest.param("lost", marks=pytest.mark.slow)])
def test_resume_is_bit_identical(tmp_path, method):
  full = trainer.train(_cfg(tmp_path, method), str(tmp_path / "full"))
  first = trainer.train(_cfg(tmp_path, method, stop_at=3), str(tmp_path / "split"))
  assert first["final_step"] == 3
  second = trainer.train(_cfg(tmp_path, method), str(tmp_path / "split"))
  assert second["final_step"] == 6
  for a, b in zip(_params(full["state"]), _params(second["state"])):
    np.testing.assert_array_equal(a, b)
  # the data position is part of the checkpoint: the logged losses after resume match the uninterrupted run
  rows = lambda d: {r["step"]: r["train_loss"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl"))
                    if "train_loss" in r}
  assert rows("full")[6] == rows("split")[6]


# the default run keeps tests/test_sharding.py::test_sharded_training_equals_one_device (fsdp and tensor meshes)
@pytest.mark.parametrize("sparse_impl", [pytest.param("xla", marks=pytest.mark.slow),
                                         pytest.param("fused", marks=pytest.mark.slow)])
def test_eight_device_mesh_matches_one_device(tmp_path, sparse_impl):
  cfg1 = _cfg(tmp_path, steps=2, log_every=1)
  cfg1.model.sparse_impl = sparse_impl
  one = trainer.train(cfg1, str(tmp_path / "one"))
  cfg8 = _cfg(tmp_path, steps=2, log_every=1)
  cfg8.model.sparse_impl = sparse_impl
  cfg8.mesh.update(dict(num_devices=8, data=2, fsdp=4))
  eight = trainer.train(cfg8, str(tmp_path / "eight"))
  losses = lambda d: [r["train_loss"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl"))
                      if "train_loss" in r]
  np.testing.assert_allclose(losses("one"), losses("eight"), rtol=2e-5)
  emb = eight["state"]["params"]["embed"]["embedding"][...]
  assert emb.sharding.spec == jax.P(None, "fsdp")
  for a, b in zip(_params(one["state"]), _params(eight["state"])):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_refuses_workdir_of_a_different_model(tmp_path):
  trainer.train(_cfg(tmp_path, steps=2), str(tmp_path / "run"))
  before = open(tmp_path / "run" / "config.json").read()
  other = _cfg(tmp_path, steps=2)
  other.model.d_model = 128
  with pytest.raises(ValueError, match="model.d_model: 64 -> 128"):
    trainer.train(other, str(tmp_path / "run"))
  assert open(tmp_path / "run" / "config.json").read() == before


@pytest.mark.slow   # tests/test_workdir.py resumes runs of the previous release in the default set
def test_run_written_before_an_added_field_resumes_with_its_legacy_value(tmp_path):
  run = tmp_path / "run"
  trainer.train(_cfg(tmp_path, steps=2), str(run))
  stored = json.loads((run / "config.json").read_text())
  del stored["model"]["fuse_projections"]  # as written before the field existed
  (run / "config.json").write_text(json.dumps(stored))
  with pytest.raises(ValueError, match="model.fuse_projections: False -> True"):
    trainer.train(_cfg(tmp_path, steps=2), str(run))
  legacy = _cfg(tmp_path, steps=3)
  legacy.model.fuse_projections = False
  trainer.train(legacy, str(run))  # resumes from step 2
  steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps[-1] == 3


def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path):
  trainer.train(_cfg(tmp_path, steps=3), str(tmp_path / "run"))
  ckpt = tmp_path / "run" / "checkpoints" / "3" / "state"
  files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.stat().st_size > 0)
  for p in files:
    p.write_bytes(b"garbage")
  listing = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
  with pytest.raises(ValueError, match="cannot restore checkpoint step 3"):
    trainer.train(_cfg(tmp_path, steps=6), str(tmp_path / "run"))
  assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == listing
  assert all(p.read_bytes() == b"garbage" for p in files)


def test_nan_loss_stops_with_step_and_skip_policy(tmp_path):
  cfg = _cfg(tmp_path, steps=4, log_every=1)
  cfg.optim.lr = 1e30
  cfg.optim.grad_clip = 0.0
  with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite loss or gradient at step \d"):
    trainer.train(cfg, str(tmp_path / "nan"))
  assert not (tmp_path / "nan" / "checkpoints" / "4").exists()
  cfg.train.nan_policy = "skip"
  out = trainer.train(cfg, str(tmp_path / "skip"))
  assert out["final_step"] == 4 and all(np.isfinite(p).all() for p in _params(out["state"]))


@pytest.mark.parametrize("section,field,value,match", [
    ("train", "steps", 0, "train.steps"),
    ("train", "grad_accum", 3, "grad_accum"),
    ("train", "nan_policy", "ignore", "nan_policy"),
    ("data", "source", "c5", "c5"),
    ("data", "tokenizer", "wordpiece", "wordpiece"),
    ("model", "attn_kind", "sparse", "sparse"),
    ("optim", "name", "sgdx", "sgdx"),
    ("mesh", "fsdp", 3, "fsdp"),
])
def test_bad_config_values(tmp_path, section, field, value, match):
  cfg = _cfg(tmp_path, steps=2)
  cfg[section][field] = value
  with pytest.raises(ValueError, match=match):
    trainer.train(cfg, str(tmp_path / "bad"))


def test_missing_data_path(tmp_path):
  cfg = _cfg(tmp_path, steps=2)
  cfg.data.source = "files"
  cfg.data.paths = str(tmp_path / "nope" / "*.txt")
  with pytest.raises(ValueError, match="nope"):
    trainer.train(cfg, str(tmp_path / "bad"))


@pytest.mark.slow   # tests/test_step.py checks accumulation against the full-batch gradient in the default set
def test_grad_accum_matches_full_batch(tmp_path):
  a = trainer.train(_cfg(tmp_path, "dense", steps=2), str(tmp_path / "a"))
  b = trainer.train(_cfg(tmp_path, "dense", steps=2, grad_accum=2), str(tmp_path / "b"))
  for x, y in zip(_params(a["state"]), _params(b["state"])):
    np.testing.assert_allclose(x, y, atol=2e-5)


def test_config_files():
  q = quickstart.get_config()
  assert q.model.attn_kind == "lost" and q.data.source == "stdlib"
  c = llama_cfg.get_config("130m,lost")
  assert (c.model.d_model, c.model.attn_rank, c.train.steps, c.train.global_batch) == (768, 256, 20_000, 512)
  assert llama_cfg.get_config("60m,dense").model.mlp_kind == "dense"
  with pytest.raises(ValueError, match="13m"):
    llama_cfg.get_config("13m,lost")


def test_cli_summary_only_and_bad_override():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  r = subprocess.run([sys.executable, "-m", "train.main", "--config=train/configs/llama.py:60m,lost",
                      "--summary_only", "--json"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  info = json.loads(r.stdout.strip().splitlines()[-1])
  assert abs(info["params"]["total"] - 44.0e6) / 44.0e6 < 0.003   # LOST 60M ≈ 44.0M parameters (preset table of docs/model.md)
  assert info["optimizer"]["moment_elements"] == 2 * info["params"]["total"]  # AdamW: mu and nu
  assert info["memory_estimate_per_device_bytes"]["total"] > 0
  r = subprocess.run([sys.executable, "-m", "train.main", "--config=train/configs/quickstart.py",
                      "--config.train.stepz=3", "--summary_only"], cwd=REPO, capture_output=True, text=True,
                     env=env, timeout=300)
  # a config typo is exactly one stderr line (no traceback), exit status 2
  assert r.returncode == 2 and r.stderr.splitlines() == [
      "error: unknown config field 'train.stepz'; did you mean 'train.steps'?"], r.stderr


def test_start_line_says_what_and_where():
  line = trainer.describe_run(quickstart.get_config(), "runs/quick", 1)
  assert line == ("training small LLaMA (lost layers, d_model 256, 4 layers) with adamw on the Python standard "
                  "library's source (byte tokenizer): 240 steps of 16×128 tokens on 1 device(s); outputs in "
                  "runs/quick: config.json, summary.json, metrics.jsonl, checkpoints/, loss.png"), line
  c = llama_cfg.get_config("60m,dense")
  c.model.mlp_kind = "lost"
  c.train.plot = False
  line = trainer.describe_run(c, "runs/x", 8)
  assert "(dense attention, lost MLP," in line and "on allenai/c4 (hf tokenizer)" in line and line.endswith("checkpoints/")
