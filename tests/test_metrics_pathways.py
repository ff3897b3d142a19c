"""Pathway metrics (lostjax.metrics.pathways, arXiv 2506.21551) and the `train.pathways` command.

Oracles: `editdistance.eval` and `rapidfuzz.distance.Levenshtein.distance` for the edit distance over expert-id
sequences; float64 python loops written from the definitions for the per-sample pathways and the consistency.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lostjax.metrics import pathways as pw

editdistance = pytest.importorskip("editdistance")
rapidfuzz_lev = pytest.importorskip("rapidfuzz.distance").Levenshtein


def _oracle(a, b):
  a, b = [int(v) for v in a], [int(v) for v in b]
  d = editdistance.eval(a, b)
  assert d == rapidfuzz_lev.distance(a, b)
  return d


def test_levenshtein_vs_libraries():
  rng = np.random.default_rng(0)
  cases = [([], []), ([], [3, 4]), ([7], []), ([12], [13]), ([1, 2, 3], [1, 2, 3]), ([1, 2, 3], [3, 2, 1]),
           ([1000, 2000], [2000, 1000, 5])]
  for _ in range(60):
    m, n = rng.integers(0, 12, size=2)
    cases.append((rng.integers(0, 5, m), rng.integers(0, 5, n)))
  for a, b in cases:
    assert pw.levenshtein(np.asarray(a, np.int64), np.asarray(b, np.int64)) == _oracle(a, b), (a, b)


def test_levenshtein_is_symbol_level_not_character_level():
  assert pw.levenshtein([12, 5], [13, 5]) == 1            # a string distance of "12,5" vs "13,5" would also be 1,
  assert pw.levenshtein([12], [21]) == 1                  # but "12" vs "21" is 2 characters apart
  with pytest.raises(ValueError, match="integers"):
    pw.levenshtein([1.5], [1])
  with pytest.raises(ValueError, match="1-D"):
    pw.levenshtein([[1]], [1])


def test_pairwise_and_mean_distance_vs_library():
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 6, size=(9, 3, 2))
  d = pw.pathway_distances(ids)
  flat = ids.reshape(9, -1)
  want = np.array([[_oracle(flat[i], flat[j]) for j in range(9)] for i in range(9)], np.float64)
  np.testing.assert_array_equal(d, want)
  iu = np.triu_indices(9, 1)
  assert pw.mean_pathway_distance(ids) == pytest.approx(want[iu].mean())
  assert pw.mean_pathway_distance(ids, normalize=True) == pytest.approx(want[iu].mean() / 6)
  assert pw.mean_pathway_distance(np.repeat(ids[:1], 4, 0)) == 0.0    # identical pathways
  assert pw.pathway_distances(ids[:1]).shape == (1, 1)
  with pytest.raises(ValueError, match="at least 2 samples"):
    pw.mean_pathway_distance(ids[:1])


def _loop_pathways(probs, k, mask):
  n_layers, n, s, e = probs.shape
  ids = np.zeros((n, n_layers, k), int)
  w = np.zeros((n, n_layers, k))
  for i in range(n):
    for layer in range(n_layers):
      tot = np.zeros(e)
      cnt = 0.0
      for t in range(s):
        tot += mask[i, t] * probs[layer, i, t]
        cnt += mask[i, t]
      mean = tot / cnt
      top = sorted(sorted(range(e), key=lambda j: -mean[j])[:k])
      ids[i, layer] = top
      w[i, layer] = [mean[j] / sum(mean[q] for q in top) for j in top]
  return ids, w


def test_sample_pathways_vs_loop():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 4, 5, 6))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  mask = (rng.random((4, 5)) < 0.7).astype(float)
  mask[:, 0] = 1.0
  ids, w = pw.sample_pathways(probs.astype(np.float32), 2, mask=mask)
  want_ids, want_w = _loop_pathways(probs.astype(np.float32).astype(np.float64), 2, mask)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(w, want_w, rtol=1e-12)
  assert np.all(np.diff(ids, axis=-1) > 0)       # ascending ids within a layer
  mask[2] = 0.0
  with pytest.raises(ValueError, match=r"samples \[2\]"):
    pw.sample_pathways(probs, 2, mask=mask)
  with pytest.raises(ValueError, match="top_k"):
    pw.sample_pathways(probs, 7)
  with pytest.raises(ValueError, match="probs"):
    pw.sample_pathways(probs[0], 2)


def test_pathway_consistency_vs_loop():
  rng = np.random.default_rng(3)
  n, n_layers, k, e, d = 5, 4, 2, 6, 7
  ids = np.stack([np.stack([np.sort(rng.choice(e, k, replace=False)) for _ in range(n_layers)]) for _ in range(n)])
  w = rng.random((n, n_layers, k))
  u = rng.normal(size=(n_layers, e, d))
  got = pw.pathway_consistency(ids, w, u)
  for i in range(n):
    hs = [sum(w[i, layer, j] * u[layer, ids[i, layer, j]] for j in range(k)) for layer in range(n_layers)]
    cos = [float(np.dot(hs[l], hs[l + 1]) / (np.linalg.norm(hs[l]) * np.linalg.norm(hs[l + 1])))
           for l in range(n_layers - 1)]
    assert got[i] == pytest.approx(sum(cos) / (n_layers - 1), rel=1e-12)
  np.testing.assert_allclose(pw.pathway_consistency(ids, 3.0 * w, u), got, rtol=1e-12)   # scale-invariant
  same = np.repeat(u[:1], n_layers, 0)                                                  # same embedding per layer
  ids_same = np.repeat(ids[:, :1], n_layers, 1)
  np.testing.assert_allclose(pw.pathway_consistency(ids_same, np.repeat(w[:, :1], n_layers, 1), same), 1.0)
  np.testing.assert_array_equal(pw.pathway_consistency(ids, w, np.zeros_like(u)), 0.0)
  with pytest.raises(ValueError, match="at least 2 layers"):
    pw.pathway_consistency(ids[:, :1], w[:, :1], u[:1])
  with pytest.raises(ValueError, match="expert ids"):
    pw.pathway_consistency(ids + e, w, u)


def _tiny_moe_config():
  from train.configs.base import base_config, model_config
  c = base_config()
  c.model = model_config("tiny", "dense")
  c.model.update(dict(d_model=32, d_ff=48, n_heads=2, n_layers=2, max_seq_len=16, moe_experts=4, moe_top_k=2))
  c.data.source = "synthetic"
  c.mesh.num_devices = 1
  c.train.update(dict(steps=2, global_batch=4, seq_len=12, log_every=1, eval_every=0, ckpt_every=1,
                      progress=False, plot=False))
  return c


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
  """A tiny MoE run directory with checkpoints at steps 1 and 2, written with train.checkpoint.Checkpointer in the
  trainer's layout (config.json + {'train': {'params': ...}, 'static': ...}); step 2 holds perturbed weights."""
  import jax

  from train import state as state_lib
  from train.checkpoint import Checkpointer

  c = _tiny_moe_config()
  workdir = tmp_path_factory.mktemp("moe_run") / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(c.to_dict()))
  _, params, rest = state_lib.init_model(state_lib.llama_config(c), seed=0)
  ckpt = Checkpointer(str(workdir))
  ckpt.save(1, {"params": params}, rest, {})
  noisy = jax.tree.map(lambda a: a + 0.5 * jax.random.normal(jax.random.key(1), a.shape, a.dtype), params)
  ckpt.save(2, {"params": noisy}, rest, {})
  ckpt.close()
  return str(workdir)


@pytest.mark.slow
def test_pathways_on_a_trained_run(tmp_path):
  """The command on checkpoints written by the real trainer (tiny MoE, synthetic tokens)."""
  from train import pathways, trainer
  workdir = str(tmp_path / "run")
  trainer.train(_tiny_moe_config(), workdir)
  assert pathways.main(["--workdir", workdir, "--num_samples", "4", "--plot", "none"]) == 0
  res = json.loads((tmp_path / "run" / "pathways.json").read_text())
  assert [r["step"] for r in res["steps"]] == [1, 2]
  assert all(math.isfinite(r["mean_distance"]) and math.isfinite(r["consistency_mean"]) for r in res["steps"])


@pytest.mark.slow  # kept out of the default run for time; `pytest -m slow tests` runs it
def test_pathways_command_end_to_end(moe_run, tmp_path):
  import jax

  from train import analyze, pathways
  from train.checkpoint import load_model

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 257, size=(5, 13)).astype(np.int32)
  np.save(tmp_path / "tok.npy", tokens)
  out, plot = tmp_path / "p.json", tmp_path / "p.png"
  assert pathways.main(["--workdir", moe_run, "--tokens_npy", str(tmp_path / "tok.npy"), "--out", str(out),
                        "--plot", str(plot), "--batch_size", "2"]) == 0
  res = json.loads(out.read_text())
  assert plot.exists() and res["samples"] == 5 and res["seq_len"] == 12
  assert [r["step"] for r in res["steps"]] == [1, 2]
  for row in res["steps"][-1:]:  # recompute from the last checkpoint with the library oracles
    model, _ = load_model(moe_run, step=row["step"])
    probs = np.asarray(jax.jit(lambda t: model.route(t).probs)(tokens[:, :-1]), np.float64)
    ids, w = _loop_pathways(probs, 2, np.ones((5, 12)))
    flat = ids.reshape(5, -1)
    pairs = [_oracle(flat[i], flat[j]) for i in range(5) for j in range(i + 1, 5)]
    assert row["mean_distance"] == pytest.approx(np.mean(pairs), abs=1e-9)
    u = np.stack([np.asarray(b.mlp.router.kernel[...], np.float64).T for b in model.layers])
    cons = pw.pathway_consistency(ids, w, u)
    assert row["consistency_mean"] == pytest.approx(cons.mean(), rel=1e-5)
    logits = np.asarray(model(tokens[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    assert row["sample_loss"] == pytest.approx(nll, rel=1e-5)
    assert math.isfinite(row["consistency_std"])
  # the run's own data, through the analyze entry point, one step
  out2 = tmp_path / "q.json"
  assert analyze.main(["pathways", "--workdir", moe_run, "--steps", "2", "--num_samples", "4", "--out", str(out2),
                       "--plot", "none"]) == 0
  res2 = json.loads(out2.read_text())
  assert [r["step"] for r in res2["steps"]] == [2] and res2["samples"] == 4 and res2["seq_len"] == 12
  with pytest.raises(ValueError, match=r"\[7\]"):
    pathways.main(["--workdir", moe_run, "--steps", "7", "--plot", "none", "--out", str(out2)])
