"""The streaming pipeline through `train.trainer.train`: SAF's store keyed by stream position (aligned epochs) and
bit-identical resume with a shuffle buffer.

Oracles are written here from docs/data.md: shard s holds the documents i % S == s; with aligned epochs each epoch
of a shard packs into W_s windows of L+1 tokens (stride L) from its first token, and batch k holds windows
(k·r + i) mod W_s (i < r = B/S) of every shard with id window·S + s.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from train import trainer
from train.configs.base import base_config, model_config
from test_data_pipeline import make_docs, write_txt
from test_data_stream import oracle_aligned_windows

SEQ, BATCH, S = 32, 8, 2
R = BATCH // S


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("stream_train")
  docs = make_docs(np.random.default_rng(5), 6, lo=100, hi=200)
  write_txt(tmp_path, docs)
  return tmp_path, docs


def _cfg(tmp_path, steps, saf=False, **data):
  c = base_config()
  c.model = model_config("tiny", "dense")
  c.data.update(dict(source="files", paths=str(tmp_path / "*.txt"), pipeline="stream", stream_shards=S,
                     val_fraction=0.0, cache_dir="", prefetch=0))
  c.mesh.num_devices = 1
  c.train.update(dict(steps=steps, global_batch=BATCH, seq_len=SEQ, log_every=1, eval_every=0, ckpt_every=3,
                      progress=False, plot=False))
  if saf:
    c.data.stream_aligned_epochs = True
    c.objectives.saf.enabled = True
    c.objectives.saf.update(dict(epochs_back=1, topk=4, store_dtype="float32"))
  c.data.update(data)
  return c


def _rows(path):
  return {r["step"]: r for r in map(json.loads, open(path / "metrics.jsonl")) if "train_loss" in r}


def _oracle_visits(W, steps):
  """(hits per step with Ẽ = 1, visits per id) from the aligned-epoch id pattern, in stream order."""
  visits, hits = {}, []
  for k in range(steps):
    ids = [((k * R + i) % W[s]) * S + s for s in range(S) for i in range(R)]
    hits.append(sum(visits.get(i, 0) >= 1 for i in ids))
    for i in ids:
      visits[i] = visits.get(i, 0) + 1
  return hits, visits


def _windows(docs):
  W = [len(oracle_aligned_windows(docs, 0.0, S, s, SEQ)) for s in range(S)]
  assert max(W) < 6 * R and any(w % R for w in W)  # every shard repeats in 6 steps; a batch spans two epochs
  return W


def _check_store(store, W, visits):
  count = np.asarray(store["count"])
  want = np.zeros_like(count)
  for i, v in visits.items():
    want[i] = v
  np.testing.assert_array_equal(count, want)
  assert int(store["size"]) == max((w - 1) * S + s + 1 for s, w in enumerate(W))


def _resume(tmp_path, name, saf, steps=6):
  """(uninterrupted run's output, its metrics rows): asserts that stopping after 3 steps and resuming gives the
  same losses and final train state bit for bit. Windows are shuffled in groups of 2·B/S, so the stop is inside
  a group (the shuffle buffer's state is restored mid-group)."""
  cfg = lambda: _cfg(tmp_path, steps, saf=saf, shuffle_buffer=2 * R, prefetch=2)
  full = trainer.train(cfg(), str(tmp_path / f"full_{name}"))
  c = cfg()
  c.train.stop_at = 3
  trainer.train(c, str(tmp_path / f"split_{name}"))
  split = trainer.train(cfg(), str(tmp_path / f"split_{name}"))
  assert split["final_step"] == steps
  a, b = _rows(tmp_path / f"full_{name}"), _rows(tmp_path / f"split_{name}")
  assert [b[s]["train_loss"] for s in range(1, steps + 1)] == [a[s]["train_loss"] for s in range(1, steps + 1)]
  for x, y in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(split["state"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  return full, a


def test_saf_on_a_shuffled_stream_hits_repeats_and_resumes_exactly(docs_dir):
  tmp_path, docs = docs_dir
  W = _windows(docs)
  out, rows = _resume(tmp_path, "saf", saf=True)
  hits, visits = _oracle_visits(W, 6)
  # a group of 2·B/S shuffled windows of a shard fills two consecutive batches, and an id never repeats inside a
  # group: the hits of each pair of steps do not depend on the order drawn
  got = [rows[k]["saf_hit_frac"] * BATCH for k in range(1, 7)]
  assert [got[k] + got[k + 1] for k in (0, 2, 4)] == [hits[k] + hits[k + 1] for k in (0, 2, 4)]
  assert 0 < sum(hits) < 6 * BATCH
  for k in range(1, 7):
    assert np.isfinite(rows[k]["train_loss"]) and (rows[k]["saf_kl"] > 0) == (rows[k]["saf_hit_frac"] > 0)
  _check_store(out["state"]["obj"]["store"], W, visits)


def test_saf_without_aligned_epochs_is_refused(docs_dir):
  tmp_path, _ = docs_dir
  c = _cfg(tmp_path, 2, saf=True, stream_aligned_epochs=False)
  with pytest.raises(ValueError, match="objectives.saf.enabled=True with data.pipeline='stream' needs "
                                       "data.stream_aligned_epochs=True"):
    trainer.train(c, str(tmp_path / "refused"))
  assert not (tmp_path / "refused").exists()


@pytest.mark.slow  # per-step hits in stream order; the default set checks them per shuffle group
def test_saf_on_the_stream_hits_repeated_examples_step_by_step(docs_dir):
  tmp_path, docs = docs_dir
  W = _windows(docs)
  out = trainer.train(_cfg(tmp_path, 6, saf=True), str(tmp_path / "saf_plain"))
  rows = _rows(tmp_path / "saf_plain")
  hits, visits = _oracle_visits(W, 6)
  assert [rows[k + 1]["saf_hit_frac"] * BATCH for k in range(6)] == hits
  _check_store(out["state"]["obj"]["store"], W, visits)


@pytest.mark.slow  # the same without SAF (unaligned epochs); the default set resumes a shuffled run with SAF on
def test_stream_shuffle_buffer_resume_is_bit_identical(docs_dir):
  _resume(docs_dir[0], "plain", saf=False)
