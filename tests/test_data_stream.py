"""Tests for the streaming pipeline (train/data/stream.py) and the process-local cached pipeline.

Oracles are plain-Python re-implementations written here from docs/data.md: shard s holds documents
i % S == s, each shard's training parts are EOS-terminated and packed with stride seq_len into windows of
seq_len+1 tokens, a global batch holds B/S consecutive windows of each shard (shard 0 first), id = k*S + s.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from train.data import default_data_config, make_data
from test_data_pipeline import EOS, make_docs, oracle_split, write_txt


def oracle_shard_windows(docs, frac, S, s, seq_len, n_windows):
  """The first n_windows windows of shard s, wrapping over the shard's documents (epochs)."""
  stream = []
  mine = [d for i, d in enumerate(docs) if i % S == s]
  while len(stream) < n_windows * seq_len + 1:
    for d in mine:
      t, _ = oracle_split(d, frac)
      if t:
        stream += list(t) + [EOS]
  return [stream[k * seq_len:k * seq_len + seq_len + 1] for k in range(n_windows)]


def oracle_batches(docs, frac, S, B, seq_len, steps):
  r = B // S
  wins = [oracle_shard_windows(docs, frac, S, s, seq_len, steps * r) for s in range(S)]
  out = []
  for k in range(steps):
    tokens, ids = [], []
    for s in range(S):
      for j in range(k * r, (k + 1) * r):
        tokens.append(wins[s][j])
        ids.append(j * S + s)
    out.append((np.array(tokens, np.int32), np.array(ids, np.int64)))
  return out


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("stream")
  docs = make_docs(np.random.default_rng(11), 12, lo=60, hi=300)
  write_txt(tmp_path, docs)
  return tmp_path, docs


def stream_cfg(tmp_path, **kw):
  c = default_data_config()
  c.update(source="files", paths=str(tmp_path / "*.txt"), pipeline="stream", eval_max_tokens=40, cache_dir="")
  c.update(kw)
  return c


def test_stream_matches_oracle_with_epochs_and_prefetch(docs_dir):
  tmp_path, docs = docs_dir
  steps = 14  # Shards hold ~3 short documents: several epochs (wrap-arounds) per shard.
  want = oracle_batches(docs, 0.02, 4, 8, 16, steps)
  for prefetch in (0, 3):
    b = make_data(stream_cfg(tmp_path, stream_shards=4, prefetch=prefetch), seq_len=16, global_batch=8, seed=0)
    assert b.info["pipeline"] == "stream" and b.info["stream_shards"] == 4
    for k in range(steps):
      x = next(b.train)
      assert x["tokens"].dtype == np.int32 and x["ids"].dtype == np.int64 and x["mask"].dtype == np.float32
      np.testing.assert_array_equal(x["tokens"], want[k][0])
      np.testing.assert_array_equal(x["ids"], want[k][1])
      assert x["mask"].shape == (8, 16) and x["mask"].min() == 1.0
  assert max(int(x["epoch"]) for x in [next(b.train)]) >= 1


def test_stream_eval_reads_only_the_cap(docs_dir):
  tmp_path, docs = docs_dir
  b = make_data(stream_cfg(tmp_path, val_fraction=0.3), seq_len=8, global_batch=4, seed=0)
  val = []
  for d in docs:  # Validation parts of the documents in global order, until the cap is covered.
    _, v = oracle_split(d, 0.3)
    if v:
      val += list(v) + [EOS]
  assert b.eval_num_tokens == 40
  targets = [t for e in b.eval_batches() for row, m in zip(e["tokens"], e["mask"]) for t in row[1:int(m.sum()) + 1]]
  assert targets == val[1:41]
  assert b.eval_num_bytes == sum(1 for t in val[1:41] if t != EOS)


def test_stream_resume_bit_identical(docs_dir):
  tmp_path, _ = docs_dir
  cfg = stream_cfg(tmp_path, stream_shards=2)
  a = make_data(cfg, seq_len=16, global_batch=4, seed=0)
  run = [next(a.train) for _ in range(12)]
  for k in (0, 1, 5, 9):
    c = make_data(cfg, seq_len=16, global_batch=4, seed=0)
    for _ in range(k):
      next(c.train)
    state = json.loads(json.dumps(c.train.get_state()))
    d = make_data(cfg, seq_len=16, global_batch=4, seed=0)
    d.train.set_state(state)
    for j in range(k, 12):
      x = next(d.train)
      np.testing.assert_array_equal(x["tokens"], run[j]["tokens"])
      np.testing.assert_array_equal(x["ids"], run[j]["ids"])
  with pytest.raises(ValueError, match="stream"):
    d.train.set_state({"epoch": 0, "position": 0, "num_sequences": 10})  # A cached-pipeline state.


def test_stream_process_shares_union_is_global_batch(docs_dir):
  tmp_path, _ = docs_dir
  cfg = stream_cfg(tmp_path, stream_shards=4)
  full = make_data(cfg, seq_len=8, global_batch=8, seed=0)
  parts = [make_data(cfg, seq_len=8, global_batch=8, seed=0, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(5):
    x = next(full.train)
    ys = [next(p.train) for p in parts]
    assert all(y["tokens"].shape == (4, 9) for y in ys)
    np.testing.assert_array_equal(np.concatenate([y["tokens"] for y in ys]), x["tokens"])
    np.testing.assert_array_equal(np.concatenate([y["ids"] for y in ys]), x["ids"])
  ev = list(full.eval_batches())
  evp = [list(p.eval_batches()) for p in parts]
  for i, e in enumerate(ev):
    np.testing.assert_array_equal(np.concatenate([evp[0][i]["tokens"], evp[1][i]["tokens"]]), e["tokens"])
    np.testing.assert_array_equal(np.concatenate([evp[0][i]["mask"], evp[1][i]["mask"]]), e["mask"])
  with pytest.raises(ValueError, match="stream_shards=4 must be a multiple of process_count=8"):
    make_data(cfg, seq_len=8, global_batch=8, seed=0, process_index=0, process_count=8)


def test_cached_process_shares_and_old_state_format(docs_dir):
  tmp_path, _ = docs_dir
  c = default_data_config()
  c.update(source="files", paths=str(tmp_path / "*.txt"), cache_dir=str(tmp_path / "cache"))
  full = make_data(c, seq_len=8, global_batch=4, seed=3)
  parts = [make_data(c, seq_len=8, global_batch=4, seed=3, process_index=p, process_count=2) for p in (0, 1)]
  n, bpe = full.train.num_sequences, full.train.batches_per_epoch
  for _ in range(bpe + 2):
    x = next(full.train)
    ys = [next(p.train) for p in parts]
    np.testing.assert_array_equal(np.concatenate([y["tokens"] for y in ys]), x["tokens"])
    np.testing.assert_array_equal(np.concatenate([y["ids"] for y in ys]), x["ids"])
    assert x["mask"].shape == (4, 8) and x["mask"].min() == 1.0
  # A state written before grain ({'epoch', 'position', 'num_sequences'}) resumes at the same position:
  # oracle = the documented permutation of epoch e, rows [position, position + B).
  for epoch, position in ((1, 2 * 4), (0, bpe * 4), (2, 0)):
    b = make_data(c, seq_len=8, global_batch=4, seed=3)
    b.train.set_state({"epoch": epoch, "position": position, "num_sequences": n})
    if position + 4 > n:
      epoch, position = epoch + 1, 0
    perm = np.random.default_rng(np.random.SeedSequence([3, epoch])).permutation(n)
    np.testing.assert_array_equal(next(b.train)["ids"], perm[position:position + 4])
    assert b.train.get_state() == {"epoch": epoch, "position": position + 4, "num_sequences": n}
  with pytest.raises(ValueError, match="position=3"):
    b.train.set_state({"epoch": 0, "position": 3, "num_sequences": n})


def test_stream_config_errors(docs_dir):
  tmp_path, _ = docs_dir
  cases = [
      (dict(pipeline="fast"), "data.pipeline='fast'"),
      (dict(stream_shards=3), "stream_shards=3 must divide global_batch=8"),
      (dict(stream_shards=-1), "stream_shards=-1"),
      (dict(prefetch=-2), "prefetch=-2"),
      (dict(max_bytes=100), "max_bytes=100"),
      (dict(eval_max_tokens=0), "eval_max_tokens=0"),
      (dict(vocab_limit=-1), "vocab_limit=-1"),
      (dict(source="hf", hf_name=""), "hf_name"),
  ]
  for kw, msg in cases:
    with pytest.raises(ValueError, match=re.escape(msg)):
      make_data(stream_cfg(tmp_path, **kw), seq_len=8, global_batch=8, seed=0)
  with pytest.raises(ValueError, match="process_index=2"):
    make_data(stream_cfg(tmp_path), seq_len=8, global_batch=8, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="global_batch=6 is not a multiple of process_count=4"):
    make_data(stream_cfg(tmp_path), seq_len=8, global_batch=6, seed=0, process_index=0, process_count=4)


@pytest.fixture()
def one_doc_dir(tmp_path):
  d = tmp_path / "one"
  d.mkdir()
  (d / "a.txt").write_bytes(b"a single document\n" * 20)
  return tmp_path


def test_stream_empty_shard_error(one_doc_dir):
  with pytest.raises(ValueError, match="shard 1 of 2 has no training text"):
    b = make_data(stream_cfg(one_doc_dir / "one", stream_shards=2, val_fraction=0.0), seq_len=8, global_batch=2,
                  seed=0)
    next(b.train)


def test_vocab_limit(docs_dir):
  tmp_path, _ = docs_dir
  # Byte tokens of this text reach 0xe4 ('中' is e4 b8 ad); a limit of 200 must name an id >= 200.
  for pipe in ("stream", "cached"):
    cfg = stream_cfg(tmp_path, vocab_limit=257, pipeline=pipe, cache_dir=str(tmp_path / "c") if pipe == "cached"
                     else "")
    b = make_data(cfg, seq_len=8, global_batch=4, seed=0)
    assert b.vocab_size == 257
    next(b.train)
  with pytest.raises(ValueError, match=r"vocab_limit=200 does not cover the tokenizer's EOS id 256"):
    make_data(stream_cfg(tmp_path, vocab_limit=200), seq_len=8, global_batch=4, seed=0)


def test_vocab_limit_names_the_bad_id(tmp_path):
  (tmp_path / "a.txt").write_text("x\u00e9\n" * 200 + "tail\n" * 10, encoding="utf-8")  # é = c3 a9 (195, 169)
  from train.data import tokenizers as tok_lib
  orig = tok_lib.ByteTokenizer.eos_id
  try:
    tok_lib.ByteTokenizer.eos_id = 10  # '\n' doubles as EOS so that a limit of 180 covers it.
    for pipe in ("stream", "cached"):
      cfg = stream_cfg(tmp_path, vocab_limit=180, pipeline=pipe, cache_dir="", eval_max_tokens=8, stream_shards=1)
      with pytest.raises(ValueError, match=r"token id 195 in a (training|validation) batch is >= "
                         r"data.vocab_limit=180"):
        b = make_data(cfg, seq_len=8, global_batch=2, seed=0)
        next(b.train)
  finally:
    tok_lib.ByteTokenizer.eos_id = orig


class FakeTfds:
  """tensorflow_datasets stand-in: `even_splits`, `load`/`as_numpy` (sequential) and, optionally, `data_source`."""

  def __init__(self, docs, random_access):
    self.docs, self.calls = docs, []
    if random_access:
      self.data_source = self._data_source

  def even_splits(self, split, n):
    return [f"{split}[{i}/{n}]" for i in range(n)]

  def _rows(self, split):
    name, _, part = split.partition("[")
    rows = [{"text": d} for d in self.docs[name]]
    if part:  # Even contiguous parts, as tfds.even_splits makes.
      i, n = map(int, part.rstrip("]").split("/"))
      bounds = [len(rows) * j // n for j in range(n + 1)]
      rows = rows[bounds[i]:bounds[i + 1]]
    return rows

  def load(self, name, split, data_dir=None, shuffle_files=True):
    self.calls.append(("load", name, split, shuffle_files, data_dir))
    return self._rows(split)

  def as_numpy(self, ds):
    return iter(ds)

  def _data_source(self, name, split, data_dir=None):
    self.calls.append(("data_source", name, split, data_dir))
    return self._rows(split)


@pytest.mark.parametrize("random_access", [False, True])
def test_tfds_stream_with_fake_module(monkeypatch, random_access):
  import sys
  rng = np.random.default_rng(8)
  tr, va = make_docs(rng, 9, lo=40, hi=120), make_docs(rng, 2)
  fake = FakeTfds({"train": tr, "validation": va}, random_access)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  c = default_data_config()
  c.update(source="tfds", tfds_name="fake/en", stream_shards=2, eval_max_tokens=50, cache_dir="",
           tfds_data_dir="/data/tfds")
  b = make_data(c, seq_len=16, global_batch=4, seed=0)
  assert b.info["pipeline"] == "stream"
  bounds = [0, 4, 9]  # even_splits of 9 documents into 2 parts
  owner = lambda i: 0 if i < bounds[1] else 1
  want = oracle_batches_by(tr, owner, 2, 4, 16, 6)
  run = [next(b.train) for _ in range(6)]
  for k in range(6):
    np.testing.assert_array_equal(run[k]["tokens"], want[k])
  assert b.eval_num_tokens == 50
  kind = "data_source" if random_access else "load"
  assert any(x[:3] == (kind, "fake/en", "train[1/2]") for x in fake.calls)
  assert {x[-1] for x in fake.calls} == {"/data/tfds"}       # the configured data_dir reaches every read
  state = json.loads(json.dumps(b.train.get_state()))
  d = make_data(c, seq_len=16, global_batch=4, seed=0)
  d.train.set_state(state)
  e = make_data(c.copy_and_resolve_references(), seq_len=16, global_batch=4, seed=0)
  for _ in range(6):
    next(e.train)
  for _ in range(3):
    np.testing.assert_array_equal(next(d.train)["tokens"], next(e.train)["tokens"])


def oracle_batches_by(docs, owner, S, B, L, steps):
  r = B // S
  wins = []
  for s in range(S):
    stream = []
    while len(stream) < steps * r * L + 1:
      for i, d in enumerate(docs):
        if owner(i) == s:
          stream += list(d) + [EOS]  # Separate validation split: training documents are used whole.
    wins.append([stream[k * L:k * L + L + 1] for k in range(steps * r)])
  return [np.array([wins[s][j] for s in range(S) for j in range(k * r, (k + 1) * r)]) for k in range(steps)]


def test_prefetch_threads_end_with_the_iterator(docs_dir):
  import gc
  import threading
  tmp_path, _ = docs_dir
  count = lambda: sum(t.name.startswith("grain") for t in threading.enumerate())
  before = count()
  b = make_data(stream_cfg(tmp_path, prefetch=1), seq_len=8, global_batch=4, seed=0)   # 1: the smallest prefetch
  next(b.train)
  assert count() > before
  del b
  gc.collect()
  assert count() == before


def test_stream_shuffle_buffer_permutes_within_groups_and_resumes_exactly(docs_dir):
  tmp_path, docs = docs_dir
  S, B, L, K, steps = 2, 4, 8, 6, 9
  plain = make_data(stream_cfg(tmp_path, stream_shards=S), seq_len=L, global_batch=B, seed=0)
  cfg = stream_cfg(tmp_path, stream_shards=S, shuffle_buffer=K)
  a = make_data(cfg, seq_len=L, global_batch=B, seed=0)
  run = [next(a.train) for _ in range(steps)]
  base = [next(plain.train) for _ in range(steps)]
  # the same windows (each with its stream id), permuted within groups of K windows of one shard
  per_shard = lambda batches: {s: [(int(i), tuple(t)) for x in batches for i, t in zip(x["ids"], x["tokens"])
                                   if int(i) % S == s] for s in range(S)}
  got, want = per_shard(run), per_shard(base)
  for s in range(S):
    n = len(want[s]) // K * K
    assert got[s] != want[s]
    for g in range(0, n, K):
      assert sorted(got[s][g:g + K]) == sorted(want[s][g:g + K])
  assert make_data(cfg, seq_len=L, global_batch=B, seed=1).train.__next__()["ids"].tolist() != run[0]["ids"].tolist()
  # interrupted at any step (inside a group too) and resumed = uninterrupted, through the JSON checkpoint form
  for k in (1, 2, 4, 7):
    c = make_data(cfg, seq_len=L, global_batch=B, seed=0)
    for _ in range(k):
      next(c.train)
    state = json.loads(json.dumps(c.train.get_state()))
    d = make_data(cfg, seq_len=L, global_batch=B, seed=0)
    d.train.set_state(state)
    for j in range(k, steps):
      x = next(d.train)
      np.testing.assert_array_equal(x["tokens"], run[j]["tokens"])
      np.testing.assert_array_equal(x["ids"], run[j]["ids"])
  with pytest.raises(ValueError, match="shuffle_buffer"):
    make_data(stream_cfg(tmp_path, shuffle_buffer=-1), seq_len=L, global_batch=B, seed=0)
  with pytest.raises(ValueError, match="shuffle_buffer=4 applies to the streaming pipeline"):
    make_data(stream_cfg(tmp_path, shuffle_buffer=4, pipeline="cached"), seq_len=L, global_batch=B, seed=0)


def oracle_aligned_windows(docs, frac, S, s, seq_len):
  """One epoch of shard s packed from its first token: the W_s windows (the tail shorter than a window dropped)."""
  stream = []
  for d in [d for i, d in enumerate(docs) if i % S == s]:
    t, _ = oracle_split(d, frac)
    if t:
      stream += list(t) + [EOS]
  return [stream[j * seq_len:j * seq_len + seq_len + 1] for j in range((len(stream) - 1) // seq_len)]


def test_stream_aligned_epochs_give_stable_ids_and_resume_exactly(docs_dir):
  tmp_path, docs = docs_dir
  S, B, L, steps = 2, 4, 64, 24
  per = [oracle_aligned_windows(docs, 0.02, S, s, L) for s in range(S)]
  W = [len(w) for w in per]
  assert W == [14, 21]   # two or more epochs of both shards in `steps` batches, of different lengths
  cfg = stream_cfg(tmp_path, stream_shards=S, stream_aligned_epochs=True)
  a = make_data(cfg, seq_len=L, global_batch=B, seed=0)
  assert a.info["epoch_windows"] == W
  assert a.info["num_train_sequences"] == max((w - 1) * S + s + 1 for s, w in enumerate(W))
  run = [next(a.train) for _ in range(steps)]
  r = B // S
  for k, x in enumerate(run):  # batch k: windows k·r .. k·r + r − 1 of each shard, epoch after epoch
    want_ids = [((k * r + i) % W[s]) * S + s for s in range(S) for i in range(r)]
    np.testing.assert_array_equal(x["ids"], want_ids)
    np.testing.assert_array_equal(x["tokens"], [per[i % S][i // S] for i in want_ids])
  assert max(int(x["epoch"]) for x in run) >= 2
  # two processes, one shard each: the same id range, and their rows are the 1-process batch
  parts = [make_data(cfg, seq_len=L, global_batch=B, seed=0, process_index=p, process_count=2) for p in (0, 1)]
  assert [p.info["num_train_sequences"] for p in parts] == [a.info["num_train_sequences"]] * 2
  for k in range(steps):
    ys = [next(p.train) for p in parts]
    np.testing.assert_array_equal(np.concatenate([y["ids"] for y in ys]), run[k]["ids"])
    np.testing.assert_array_equal(np.concatenate([y["tokens"] for y in ys]), run[k]["tokens"])
  # shuffled: the same (id, tokens) pairs; interrupted anywhere (across epoch boundaries) = uninterrupted
  for K, stops in ((0, (7, 10)), (4, (5, 13))):
    cfg = stream_cfg(tmp_path, stream_shards=S, stream_aligned_epochs=True, shuffle_buffer=K, prefetch=0)
    it = make_data(cfg, seq_len=L, global_batch=B, seed=0).train
    full = [next(it) for _ in range(steps)]
    for x in full:
      for i, t in zip(x["ids"], x["tokens"]):
        np.testing.assert_array_equal(t, per[int(i) % S][int(i) // S])
      assert len(set(x["ids"].tolist())) == B
    for k in stops:
      c = make_data(cfg, seq_len=L, global_batch=B, seed=0)
      for _ in range(k):
        next(c.train)
      d = make_data(cfg, seq_len=L, global_batch=B, seed=0)
      d.train.set_state(json.loads(json.dumps(c.train.get_state())))
      for j in range(k, steps):
        x = next(d.train)
        np.testing.assert_array_equal(x["tokens"], full[j]["tokens"])
        np.testing.assert_array_equal(x["ids"], full[j]["ids"])


def test_stream_aligned_epochs_refusals(docs_dir):
  tmp_path, docs = docs_dir
  W0 = len(oracle_aligned_windows(docs, 0.02, 1, 0, 64))
  with pytest.raises(ValueError, match=f"stream shard 0 of 1 packs into {W0} windows per epoch, fewer than the "
                                       f"{W0 + 1} consecutive windows one batch draws"):
    make_data(stream_cfg(tmp_path, stream_shards=1, stream_aligned_epochs=True), seq_len=64, global_batch=W0 + 1,
              seed=0)
  # B/S = 2 rows with groups of K = W0 // 2 windows: (floor(1/K) + 2)·K > W0 windows can meet in one batch
  K = W0 // 2 + 1
  with pytest.raises(ValueError, match=f"shuffle_buffer={K}\\), so an example would appear twice in one batch"):
    make_data(stream_cfg(tmp_path, stream_shards=1, stream_aligned_epochs=True, shuffle_buffer=K), seq_len=64,
              global_batch=2, seed=0)
  with pytest.raises(ValueError, match="stream_aligned_epochs=True applies to the streaming pipeline"):
    make_data(stream_cfg(tmp_path, stream_aligned_epochs=True, pipeline="cached"), seq_len=8, global_batch=4, seed=0)


def test_stream_aligned_epochs_window_count_edges_and_changed_data(tmp_path):
  L = 8
  for n in (L - 1, L, 2 * L - 1, 2 * L, 3 * L + 3):  # T = n + 1 tokens per epoch (bytes + EOS)
    d = tmp_path / f"n{n}"
    d.mkdir()
    doc = bytes(range(97, 97 + 26)) * 2
    (d / "a.txt").write_bytes(doc[:n])
    cfg = stream_cfg(d, stream_shards=1, val_fraction=0.0, stream_aligned_epochs=True, prefetch=0)
    want = oracle_aligned_windows([doc[:n]], 0.0, 1, 0, L)
    if not want:
      with pytest.raises(ValueError, match="packs into 0 windows per epoch, fewer than the 1 consecutive"):
        make_data(cfg, seq_len=L, global_batch=1, seed=0)
      continue
    b = make_data(cfg, seq_len=L, global_batch=1, seed=0)
    assert b.info["epoch_windows"] == [len(want)]
    for k in range(3 * len(want)):
      x = next(b.train)
      assert x["tokens"][0].tolist() == want[k % len(want)] and int(x["ids"][0]) == k % len(want)
  # the shard grows after the windows were counted: refused at the epoch boundary, not silently renumbered
  b = make_data(stream_cfg(tmp_path / f"n{2 * L}", stream_shards=1, val_fraction=0.0, stream_aligned_epochs=True,
                           prefetch=0), seq_len=L, global_batch=1, seed=0)
  (tmp_path / f"n{2 * L}" / "a.txt").write_bytes(doc[:4 * L])
  with pytest.raises(ValueError, match="stream shard 0 of 1 gave more than 2 windows in epoch 0, not the 2 counted "
                                       "when the run started"):
    for _ in range(4):
      next(b.train)
  b = make_data(stream_cfg(tmp_path / f"n{2 * L}", stream_shards=1, val_fraction=0.0, stream_aligned_epochs=True,
                           prefetch=0), seq_len=L, global_batch=1, seed=0)
  (tmp_path / f"n{2 * L}" / "a.txt").write_bytes(doc[:L])
  with pytest.raises(ValueError, match="stream shard 0 of 1 gave 1 windows in epoch 0, not the 4 counted"):
    for _ in range(4):
      next(b.train)
