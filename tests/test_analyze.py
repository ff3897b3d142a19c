"""`python -m train.analyze spectra|scaling|pathways`: the analysis commands over training runs."""
import json
import subprocess
import sys

import numpy as np
import pytest

from lostjax.metrics import scaling_law as sl
from test_metrics_scaling_law import SMALL_GRID, SMALL_LAW, law_np, write_run
from train import analyze


def test_read_samples(tmp_path):
  f = tmp_path / "t.txt"
  f.write_text("first para\nline two\n\n\nsecond\n")
  assert analyze._read_samples(str(f), 10) == ["first para\nline two", "second"]
  f.write_text("a\nb\nc\n")
  assert analyze._read_samples(str(f), 2) == ["a", "b"]
  f.write_text("\n\n")
  with pytest.raises(ValueError, match="no non-empty samples"):
    analyze._read_samples(str(f), 2)


def test_unknown_command_is_one_clear_error():
  out = subprocess.run([sys.executable, "-m", "train.analyze", "spectrum"], capture_output=True, text=True)
  assert out.returncode == 2
  assert "error: expected a command, one of ['pathways', 'scaling', 'spectra']" in out.stderr
  assert "Traceback" not in out.stderr


def test_spectra_on_a_tiny_lostjax_llama(tmp_path, monkeypatch):
  import ml_collections
  from flax import nnx

  import train.checkpoint
  from lostjax.models import Llama, LlamaConfig
  cfg = LlamaConfig(vocab_size=257, d_model=16, d_ff=32, n_heads=2, n_layers=2, max_seq_len=32,
                    attn_kind="lost", mlp_kind="dense", attn_rank=4, sparsity=0.25, sparse_impl="xla")
  model = Llama(cfg, rngs=nnx.Rngs(0))
  run_cfg = ml_collections.ConfigDict({"data": {"tokenizer": "byte", "tokenizer_path": ""},
                                       "train": {"seq_len": 24}})
  monkeypatch.setattr(train.checkpoint, "load_model", lambda workdir, step=None: (model, run_cfg))
  text = tmp_path / "text.txt"
  text.write_text("The quick brown fox jumps.\n\nA second sample of text here.\n\nThird one!\n")
  out, plot = tmp_path / "table.txt", tmp_path / "spectra.png"
  assert analyze.main(["spectra", "--workdir", str(tmp_path), "--text", str(text), "--out", str(out), "--plot", str(plot),
                  "--chunk-size", "2"]) == 0
  lines = out.read_text().splitlines()
  assert lines[0].split()[:3] == ["layer", "nuc_q", "erank_q"] and len(lines) == 4
  assert np.all(np.isfinite([float(x) for x in lines[-1].split()[1:]]))
  assert plot.stat().st_size > 1000


def test_scaling_fits_synthetic_runs_and_reports_heldout_are(tmp_path, monkeypatch):
  monkeypatch.setattr(sl, "chinchilla_grid", lambda: SMALL_GRID)  # the default grid is tested (slow) above
  law = lambda n, t: law_np(SMALL_LAW, n, t)
  runs = [write_run(tmp_path, f"run{i}", n, law, tokens_per_step=5000, noise=1e-3, seed=i)
          for i, n in enumerate([50_000, 100_000, 200_000, 400_000, 1_600_000])]
  out, plot = tmp_path / "fit.json", tmp_path / "fit.png"
  assert analyze.main(["scaling", "--runs", ",".join(runs), "--out", str(out), "--plot", str(plot)]) == 0
  result = json.loads(out.read_text())
  assert result["target"] == "run4" and result["n_key"] == "total"
  for method in ("huber", "least_squares"):
    entry = result["fits"][method]
    assert entry["are_heldout"] < 0.01, entry
    assert entry["num_test_points"] == 4  # eval at 140, 160, 180, 200 of 200 steps (>= 70%)
    assert entry["num_points"] == 4 * 9  # 4 smaller runs x eval steps 40..200 (first 10% cut)
  assert plot.stat().st_size > 1000
