"""Hugging Face sources and tokenizer, parquet files (offline fixtures written here; no network).

Oracles: the `tokenizers` library itself for token ids; plain-Python packing of each shard's documents
(docs/data.md) for the batches; the c4 streaming path runs against a monkeypatched `datasets.load_dataset` that
returns an `IterableDataset` built from a generator (4 generator shards).
"""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from train.data import default_data_config, make_data  # pylint: disable=wrong-import-position
from train.data import sources  # pylint: disable=wrong-import-position
from train.data.tokenizers import HFTokenizer  # pylint: disable=wrong-import-position
from test_data_pipeline import make_docs, oracle_split  # pylint: disable=wrong-import-position


def texts(n, seed=0, lo=80, hi=400):
  return [d.decode("utf-8") for d in make_docs(np.random.default_rng(seed), n, lo, hi)]


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
  """A small BPE tokenizer.json (Metaspace pre-tokenizer, T5-like specials) trained on the fixture text."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
  tok.train_from_iterator(texts(40, seed=9), trainer=trainer)
  d = tmp_path_factory.mktemp("tok")
  tok.save(str(d / "tokenizer.json"))
  return str(d / "tokenizer.json")


def oracle_packed(docs, encode, eos, frac, S, B, L, steps, shard_of):
  """Batches from per-shard streams: shard_of(i, n) -> shard of document i of n."""
  r = B // S
  wins = []
  for s in range(S):
    stream = []
    mine = [d for i, d in enumerate(docs) if shard_of(i, len(docs)) == s]
    while len(stream) < steps * r * L + 1:
      for d in mine:
        t, _ = oracle_split(d.encode("utf-8"), frac)
        if t:
          stream += list(encode(t.decode("utf-8"))) + [eos]
    wins.append([stream[k * L:k * L + L + 1] for k in range(steps * r)])
  return [np.array([wins[s][j] for s in range(S) for j in range(k * r, (k + 1) * r)]) for k in range(steps)]


def test_hf_tokenizer_matches_library(hf_tok, tmp_path):
  ref = tokenizers.Tokenizer.from_file(hf_tok)
  t = HFTokenizer(hf_tok)
  assert t.vocab_size == ref.get_vocab_size() and t.eos_id == ref.token_to_id("</s>") == 1
  for s in texts(5, seed=3) + ["", "x", "\u4e2d\u6587 \u00e9t\u00e9"]:
    np.testing.assert_array_equal(t.encode(s), ref.encode(s, add_special_tokens=False).ids)
    ids = t.encode(s)
    lens = t.token_byte_lengths(ids, len(s.encode("utf-8")))
    assert lens.shape == ids.shape and (lens >= 0).all()
    assert int(lens.sum()) == (len(s.encode("utf-8")) if ids.size else 0)
  ids = np.concatenate([[t.eos_id], t.encode("alpha beta")])      # a special token stands for no text
  assert t.token_byte_lengths(ids, 10)[0] == 0 and t.token_byte_lengths(ids, 10).sum() == 10
  batch = texts(4, seed=4)
  assert [list(x) for x in t.encode_batch(batch)] == [ref.encode(x, add_special_tokens=False).ids for x in batch]
  assert t.decode(t.encode("alpha beta")) == ref.decode(ref.encode("alpha beta").ids)
  # A folder holding tokenizer.json works too; bad paths give one clear error.
  assert HFTokenizer(hf_tok.rsplit("/", 1)[0]).vocab_size == t.vocab_size
  with pytest.raises(ValueError, match="does not exist"):
    HFTokenizer(str(tmp_path / "missing" / "tokenizer.json"))
  (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
  with pytest.raises(ValueError, match="bad.json"):
    HFTokenizer(str(tmp_path / "bad.json"))
  with pytest.raises(ValueError, match="tokenizer_path"):
    HFTokenizer("")
  with pytest.raises(ValueError, match="tokenizer='sentencepiece'"):
    HFTokenizer(str(tmp_path / "spiece.model"))


def test_hf_saved_dataset_stream_with_hf_tokenizer(hf_tok, tmp_path):
  docs = texts(10, seed=5)
  datasets.Dataset.from_dict({"text": docs, "n": list(range(10))}).save_to_disk(str(tmp_path / "ds"))
  c = default_data_config()
  c.update(source="hf", hf_name=str(tmp_path / "ds"), hf_eval_split="", tokenizer="hf", tokenizer_path=hf_tok,
           stream_shards=2, eval_max_tokens=30, val_fraction=0.2)
  b = make_data(c, seq_len=12, global_batch=4, seed=0)
  ref = tokenizers.Tokenizer.from_file(hf_tok)
  enc = lambda s: ref.encode(s, add_special_tokens=False).ids

  def contiguous(i, n):  # Dataset.shard(contiguous=True): the first n mod S shards get one extra row.
    div, mod = divmod(n, 2)
    bounds = [div * s + min(s, mod) for s in range(3)]
    return next(s for s in range(2) if bounds[s] <= i < bounds[s + 1])

  want = oracle_packed(docs, enc, 1, 0.2, 2, 4, 12, 6, contiguous)
  for k in range(6):
    np.testing.assert_array_equal(next(b.train)["tokens"], want[k])
  val = [t for d in docs for v in [oracle_split(d.encode(), 0.2)[1]] if v for t in enc(v.decode()) + [1]]
  targets = [t for e in b.eval_batches() for row, m in zip(e["tokens"], e["mask"]) for t in row[1:int(m.sum()) + 1]]
  assert targets == val[1:31] and b.eval_num_tokens == 30
  # One saved Dataset has no validation split: asking for one is an error, not evaluation on training text.
  c.update(hf_eval_split="validation")
  with pytest.raises(ValueError, match="no split 'validation'"):
    make_data(c, seq_len=12, global_batch=4, seed=0)
  # A DatasetDict with its own validation split; a missing text column is named.
  dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs}),
                             "validation": datasets.Dataset.from_dict({"text": docs[:2]})})
  dd.save_to_disk(str(tmp_path / "dd"))
  c.update(hf_name=str(tmp_path / "dd"), hf_eval_split="validation", eval_max_tokens=1000)
  b = make_data(c, seq_len=12, global_batch=4, seed=0)
  whole = [t for d in docs[:2] for t in enc(d) + [1]]
  assert b.eval_num_tokens == len(whole) - 1 and b.info["eval_split"] == "validation"
  c.update(text_field="body")
  with pytest.raises(ValueError, match="text_field='body'"):
    make_data(c, seq_len=12, global_batch=4, seed=0)
  c.update(text_field="text", hf_eval_split="test")
  with pytest.raises(ValueError, match="no split 'test'"):
    make_data(c, seq_len=12, global_batch=4, seed=0)


class FakeC4:
  """`datasets.load_dataset` stand-in: 4 generator shards of documents, streaming only; records reads."""

  def __init__(self):
    self.calls, self.read = [], []
    self.shards = {"train": [texts(8, seed=20 + i, lo=20, hi=60) for i in range(4)],
                   "validation": [texts(3, seed=30)]}

  def __call__(self, path, name=None, split=None, streaming=False, **kw):
    self.calls.append((path, name, split, streaming))
    assert streaming, "the c4 path must stream"

    def gen(shards):
      for sh in shards:
        for i, t in enumerate(self.shards[split][sh]):
          self.read.append((split, sh, i))
          yield {"text": t, "timestamp": "x", "url": "u"}
    return datasets.IterableDataset.from_generator(gen, gen_kwargs={"shards": list(range(len(self.shards[split])))})


def c4_cfg(**kw):
  c = default_data_config()
  c.update(source="hf", hf_name="allenai/c4", hf_config="en", tokenizer="byte", stream_shards=2,
           eval_max_tokens=64, cache_dir="")
  c.update(kw)
  return c


def test_c4_streaming_path_mocked(monkeypatch):
  fake = FakeC4()
  monkeypatch.setattr(datasets, "load_dataset", fake)
  b = make_data(c4_cfg(prefetch=0), seq_len=16, global_batch=4, seed=0)  # No background reads: exact counts.
  assert ("allenai/c4", "en", "train", True) in fake.calls and ("allenai/c4", "en", "validation", True) in fake.calls
  # split_dataset_by_node with 4 generator shards and 2 stream shards: stream s reads generator shards s, s+2.
  docs = [t for sh in range(4) for t in fake.shards["train"][sh]]
  owner = lambda i, n: (i // 8) % 2
  want = oracle_packed(docs, lambda s: list(s.encode()), 256, 0.0, 2, 4, 16, 5, owner)
  run = [next(b.train) for _ in range(5)]
  for k in range(5):
    np.testing.assert_array_equal(run[k]["tokens"], want[k])
  val = [t for d in fake.shards["validation"][0] for t in list(d.encode()) + [256]]
  assert b.eval_num_tokens == 64
  targets = [t for e in b.eval_batches() for row, m in zip(e["tokens"], e["mask"]) for t in row[1:int(m.sum()) + 1]]
  assert targets == val[1:65]
  # Process 1 of 2 reads only its generator shards (1 and 3) for training.
  fake.read.clear()
  p1 = make_data(c4_cfg(prefetch=0), seq_len=16, global_batch=4, seed=0, process_index=1, process_count=2)
  fake.read.clear()
  for k in range(3):
    np.testing.assert_array_equal(next(p1.train)["tokens"], want[k][2:])
  assert {sh for split, sh, _ in fake.read if split == "train"} <= {1, 3}
  # Resume from the saved HF position (state_dict): the resumed reader does not read the generator shards it
  # had finished (each stream's first generator shard), and the batches continue identically.
  ref = make_data(c4_cfg(prefetch=0), seq_len=16, global_batch=4, seed=0)
  for k in range(1, 40):
    next(ref.train)
    state = json.loads(json.dumps(ref.train.get_state()))
    if all(x["src"] and x["src"]["examples_iterable"]["shard_idx"] >= 1 for x in _shard_states(state)):
      break
  assert all(x["epoch"] == 0 for x in _shard_states(state)), "fixture too small: resumed after a wrap-around"
  fresh = make_data(c4_cfg(prefetch=0), seq_len=16, global_batch=4, seed=0)
  fake.read.clear()
  fresh.train.set_state(state)
  got = [next(fresh.train)["tokens"] for _ in range(3)]
  assert not {sh for split, sh, _ in fake.read if split == "train"} & {0, 1}
  for x in got:
    np.testing.assert_array_equal(x, next(ref.train)["tokens"])


def _shard_states(state):
  """The per-shard packer states ({'epoch', 'doc', 'offset', 'windows', 'src'}) inside a pipeline state."""
  if isinstance(state, dict):
    if "windows" in state and "src" in state:
      return [state]
    return [x for v in state.values() for x in _shard_states(v)]
  if isinstance(state, list):
    return [x for v in state for x in _shard_states(v)]
  return []


def test_hf_errors(monkeypatch, tmp_path):
  def missing(path, name=None, split=None, streaming=False, **kw):
    raise FileNotFoundError(f"Dataset {path} doesn't exist on the Hub")
  monkeypatch.setattr(datasets, "load_dataset", missing)
  with pytest.raises(ValueError, match="hf_name='nope/c4'"):
    make_data(c4_cfg(hf_name="nope/c4"), seq_len=16, global_batch=4, seed=0)


def write_parquet(path, docs, gz=False, row_group_size=3):
  import pyarrow as pa
  import pyarrow.parquet as pq
  table = pa.table({"text": docs, "id": list(range(len(docs)))})
  if gz:
    raw = path.with_suffix("")
    pq.write_table(table, str(raw), row_group_size=row_group_size)
    with open(raw, "rb") as f, gzip.open(path, "wb") as g:
      g.write(f.read())
    raw.unlink()
  else:
    pq.write_table(table, str(path), row_group_size=row_group_size)


def test_parquet_files(tmp_path):
  a, b = texts(7, seed=40), texts(5, seed=41)
  write_parquet(tmp_path / "a.parquet", a)
  write_parquet(tmp_path / "b.parquet.gz", b, gz=True)
  files = sources.expand_paths(f"{tmp_path}/*.parquet,{tmp_path}/*.parquet.gz")
  got = list(sources.file_documents(files, "text"))
  assert got == [d.encode("utf-8") for d in a + b]
  with pytest.raises(ValueError, match="text_field='body'"):
    list(sources.file_documents(files, "body"))
  (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
  with pytest.raises(ValueError, match="bad.parquet"):
    list(sources.file_documents([str(tmp_path / "bad.parquet")], "text"))
  # Streaming over parquet rows: shard s = rows i % S == s over both files.
  c = default_data_config()
  c.update(source="files", paths=f"{tmp_path}/a.parquet,{tmp_path}/b.parquet.gz", pipeline="stream",
           stream_shards=2, eval_max_tokens=16, cache_dir="")
  bd = make_data(c, seq_len=16, global_batch=4, seed=0)
  want = oracle_packed(a + b, lambda s: list(s.encode()), 256, 0.02, 2, 4, 16, 4, lambda i, n: i % 2)
  for k in range(4):
    np.testing.assert_array_equal(next(bd.train)["tokens"], want[k])


def test_llama_c4_preset_data_config(monkeypatch, hf_tok):
  """The 60m preset's data config, as shipped (c4 streaming, T5-style vocab limit), with local stand-ins for the
  Hub dataset and tokenizer: it streams, reads only what it consumes, and reports the model's 32,000 rows."""
  from train.configs import llama
  fake = FakeC4()
  monkeypatch.setattr(datasets, "load_dataset", fake)
  cfg = llama.get_config("60m,lost")
  assert (cfg.data.source, cfg.data.hf_name, cfg.data.hf_config, cfg.data.tokenizer, cfg.data.tokenizer_path,
          cfg.data.vocab_limit, cfg.model.vocab_size, cfg.data.max_bytes) == (
              "hf", "allenai/c4", "en", "hf", "google-t5/t5-base", 32000, 32000, 0)
  cfg.data.tokenizer_path = hf_tok
  cfg.data.eval_max_tokens = 100
  b = make_data(cfg.data, seq_len=16, global_batch=8, seed=0)
  assert b.vocab_size == 32000 and b.info["pipeline"] == "stream" and b.info["stream_shards"] == 8
  assert fake.calls[0] == ("allenai/c4", "en", "train", True)
  x = next(b.train)
  assert x["tokens"].shape == (8, 17) and x["tokens"].max() < b.tokenizer.vocab_size
  assert b.eval_num_tokens == 100
  cfg.data.source = "tfds"  # The documented TFDS variant needs the tfds extra; without it, one clear error.
  import sys
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ValueError, match=r"pip install -e \.\[tfds\]"):
    make_data(cfg.data, seq_len=16, global_batch=8, seed=0)


def test_hf_local_folder_of_jsonl_files(tmp_path):
  """A local folder that is not a save_to_disk dataset: read by `load_dataset(folder, streaming=True)`."""
  a, b = texts(4, seed=50), texts(3, seed=51)
  d = tmp_path / "corpus"
  d.mkdir()
  for name, docs in (("part-0.jsonl", a), ("part-1.jsonl", b)):
    with open(d / name, "w", encoding="utf-8") as f:
      for t in docs:
        f.write(json.dumps({"text": t, "meta": 1}) + "\n")
  c = default_data_config()
  c.update(source="hf", hf_name=str(d), hf_eval_split="", stream_shards=1, eval_max_tokens=20, cache_dir="",
           val_fraction=0.3)
  bd = make_data(c, seq_len=16, global_batch=2, seed=0)
  want = oracle_packed(a + b, lambda s: list(s.encode()), 256, 0.3, 1, 2, 16, 5, lambda i, n: 0)
  for k in range(5):
    np.testing.assert_array_equal(next(bd.train)["tokens"], want[k])
  c.update(hf_eval_split="validation")  # Such a folder has only a train split: one clear error naming it.
  with pytest.raises(ValueError, match="validation"):
    make_data(c, seq_len=16, global_batch=2, seed=0)


def test_t5_style_sentinels_and_vocab_limit(hf_tok, tmp_path):
  """T5 protocol in miniature: the tokenizer has extra sentinel ids above the pieces, the model embeds only the
  pieces (vocab_limit). Ordinary text trains; text that yields a sentinel stops with the id and the limit."""
  tok = tokenizers.Tokenizer.from_file(hf_tok)
  base = tok.get_vocab_size()
  tok.add_special_tokens([f"<extra_id_{i}>" for i in range(3)])
  path = str(tmp_path / "t5like.json")
  tok.save(path)
  t = HFTokenizer(path)
  assert t.vocab_size == base + 3 and t.eos_id == 1
  sentinel = tok.token_to_id("<extra_id_1>")
  assert sentinel == base + 1
  docs = texts(6, seed=60)
  for i, d in enumerate(docs):
    (tmp_path / f"d{i}.txt").write_text(d, encoding="utf-8")
  c = default_data_config()
  c.update(source="files", paths=str(tmp_path / "d*.txt"), tokenizer="hf", tokenizer_path=path, vocab_limit=base,
           pipeline="stream", stream_shards=1, eval_max_tokens=16, val_fraction=0.3)
  b = make_data(c, seq_len=8, global_batch=2, seed=0)
  assert b.vocab_size == base
  for _ in range(4):
    assert next(b.train)["tokens"].max() < base
  (tmp_path / "d9.txt").write_text("alpha <extra_id_1> beta\n" * 30, encoding="utf-8")
  for pipe in ("stream", "cached"):
    c.update(pipeline=pipe, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=f"token id {sentinel} in a (training|validation) batch is >= "
                       f"data.vocab_limit={base}"):
      b = make_data(c, seq_len=8, global_batch=2, seed=0)
      for _ in range(200):
        next(b.train)


def test_hf_tokenizer_hub_names(hf_tok, monkeypatch, tmp_path):
  """Hub names (with or without an organisation) go to `Tokenizer.from_pretrained`; local-looking paths that do
  not exist are reported as missing files."""
  real = tokenizers.Tokenizer
  asked = []

  class Hub:
    from_str = staticmethod(real.from_str)

    @staticmethod
    def from_pretrained(name):
      asked.append(name)
      return real.from_file(hf_tok)

  monkeypatch.setattr(tokenizers, "Tokenizer", Hub)
  monkeypatch.chdir(tmp_path)
  for name in ("t5-base", "google-t5/t5-base"):
    assert HFTokenizer(name).vocab_size == real.from_file(hf_tok).get_vocab_size()
  assert asked == ["t5-base", "google-t5/t5-base"]
  for path in ("./org/tok.json", "/no/such/dir/tokenizer.json", "a/b/c"):
    with pytest.raises(ValueError, match="does not exist"):
      HFTokenizer(path)
  assert len(asked) == 2
