"""Training data for lostjax: sources -> tokenizer -> packed batches, on grain (details in docs/data.md).

    bundle = make_data(cfg.data, seq_len=256, global_batch=512, seed=0, process_index=0, process_count=1)
    batch = next(bundle.train)          # {'tokens': int32[B/P, L+1], 'ids': int64[B/P], 'mask': float32[B/P, L]}
    state = bundle.train.get_state()    # JSON; bundle.train.set_state(state) resumes exactly
    for eb in bundle.eval_batches(): ...  # {'tokens': int32[B/P, L+1], 'mask': float32[B/P, L]}
    bpb = total_eval_nats / bundle.eval_num_bytes / ln 2

Two pipelines (`data.pipeline`, 'auto' picks 'cached' for stdlib/files and 'stream' for hf/tfds):
* 'cached' (`corpus.py`, `pipeline.py`): the corpus is tokenized once into `.npy` memmaps under `cache_dir`;
  packed sequences are visited in seeded per-epoch permutations; grain's MapDataset reader prefetches batches;
* 'stream' (`stream.py`): documents are read shard by shard, tokenized and packed as the run consumes them (no
  up-front pass; each process reads only its shards); grain's thread prefetch overlaps the train step.
Sources (`sources.py`): 'stdlib', 'files' (.txt/.gz/.jsonl/.jsonl.gz/.parquet), 'hf' (Hugging Face `datasets`:
streaming Hub datasets such as allenai/c4, or local folders), 'tfds' (optional extra), 'synthetic'. Validation =
the last `val_fraction` of the bytes of every document (docs/data.md), or the hf/tfds eval split.
Tokenizers (`tokenizers.py`): 'byte' (257 ids), 'sentencepiece', 'hf' (`tokenizer.json`); `vocab_limit` caps the
ids the model embeds (T5: 32,100 ids, 32,000 rows) and any batch holding a larger id raises a ValueError.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator, Optional

import ml_collections
import numpy as np

from train.data import corpus as corpus_lib
from train.data import pipeline
from train.data import sources as sources_lib
from train.data.pipeline import SyntheticTrainIterator, TrainIterator
from train.data.tokenizers import TOKENIZERS, ByteTokenizer, HFTokenizer, SentencePieceTokenizer, make_tokenizer

SOURCES = ("stdlib", "files", "hf", "tfds", "synthetic")
PIPELINES = ("auto", "cached", "stream")
MAX_AUTO_STREAM_SHARDS = 8


def default_data_config():
  """Data config; every field can be overridden with `--config.data.<field>=...`."""
  c = ml_collections.ConfigDict()
  c.source = "stdlib"             # 'stdlib' | 'files' | 'hf' | 'tfds' | 'synthetic'
  c.paths = ""                    # source='files': comma-separated globs (.txt, .gz, .jsonl(.gz), .parquet(.gz))
  c.text_field = "text"           # JSON field (jsonl) / column (parquet, hf) / feature (tfds) holding the text
  c.hf_name = ""                  # source='hf': Hub name (e.g. 'allenai/c4', streamed) or a local dataset folder
  c.hf_config = ""                # source='hf': dataset config (e.g. 'en' for allenai/c4)
  c.hf_train_split = "train"
  c.hf_eval_split = "validation"  # '' = cut validation from each training document instead
  c.tfds_name = "c4/en"           # source='tfds'
  c.tfds_data_dir = ""            # tfds data_dir ('' = TFDS default)
  c.tfds_train_split = "train"
  c.tfds_eval_split = "validation"  # '' = cut validation from each training document instead
  c.tokenizer = "byte"            # 'byte' | 'sentencepiece' | 'hf'
  c.tokenizer_path = ""           # SentencePiece .model file; hf: tokenizer.json, its folder, or a Hub name
  c.vocab_limit = 0               # ids the model embeds (0 = the tokenizer's vocabulary); larger ids raise
  c.pipeline = "auto"             # 'auto' (cached for stdlib/files, stream for hf/tfds) | 'cached' | 'stream'
  c.stream_shards = 0             # stream: document shards S (0 = gcd(global_batch, 8)); S % processes == 0
  c.prefetch = 2                  # batches prepared ahead by grain in a background thread (0 = off)
  c.shuffle_buffer = 0            # stream: windows shuffled together per shard (0 = off: stream order; seed
                                  # data.shuffle_seed); its state is in the checkpoint, resume stays exact
  c.stream_aligned_epochs = False  # stream: pack every epoch of a shard from its first token, so an example keeps
                                  # its id across epochs (needed by SAF); counts the windows with one pass first
  c.val_fraction = 0.02           # validation = last fraction of each document's bytes (cut at a newline)
  c.max_bytes = 0                 # cap on corpus bytes read (0 = unlimited)
  c.shuffle_seed = -1             # -1 = use the training seed
  c.eval_max_tokens = 0           # cap on evaluated validation targets (0 = all)
  c.cache_dir = os.path.join("~", ".cache", "lostjax", "data")  # '' or 'none' = no cache (in memory)
  c.synthetic_vocab_size = 0      # source='synthetic': vocabulary (0 = the tokenizer's)
  return c


@dataclasses.dataclass
class DataBundle:
  train: Any                                   # TrainIterator | SyntheticTrainIterator
  eval_batches: Callable[[], Iterator[dict]]   # each call restarts from the first evaluation batch
  eval_num_bytes: int                          # UTF-8 bytes behind the evaluated targets (0 for synthetic)
  eval_num_tokens: int                         # evaluated targets (= mask sum over one pass)
  vocab_size: int
  tokenizer: Any
  info: Optional[dict] = None                  # corpus statistics (token counts, cache path, ...)


def _positive_int(name, value):
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name}={value!r} must be a positive int")
  return value


def _check_config(cfg):
  if cfg.source not in SOURCES:
    raise ValueError(f"unknown data source={cfg.source!r}; expected one of {', '.join(SOURCES)}")
  if cfg.tokenizer not in TOKENIZERS:
    raise ValueError(f"unknown tokenizer={cfg.tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")
  if not 0.0 <= float(cfg.val_fraction) < 1.0:
    raise ValueError(f"val_fraction={cfg.val_fraction!r} must be in [0, 1)")
  if cfg.pipeline not in PIPELINES:
    raise ValueError(f"unknown data.pipeline={cfg.pipeline!r}; expected one of {', '.join(PIPELINES)}")
  for name in ("max_bytes", "eval_max_tokens", "synthetic_vocab_size", "vocab_limit", "stream_shards",
               "prefetch", "shuffle_buffer"):
    v = cfg[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f"data.{name}={v!r} must be a non-negative int")
  for name in ("hf_name", "hf_config", "hf_train_split", "hf_eval_split"):
    if not isinstance(cfg[name], str):
      raise ValueError(f"data.{name}={cfg[name]!r} must be a string")
  if cfg.source == "hf" and not cfg.hf_name:
    raise ValueError("source='hf' needs data.hf_name (e.g. 'allenai/c4' with hf_config='en', or a local "
                     "dataset folder); got hf_name=''")
  if cfg.source == "hf" and not cfg.hf_train_split:
    raise ValueError("source='hf' needs data.hf_train_split (e.g. 'train'); got ''")


def resolve_pipeline(cfg) -> str:
  """The pipeline `data.pipeline` selects for this source ('auto': stream for hf/tfds, cached otherwise)."""
  if cfg.pipeline != "auto":
    return cfg.pipeline
  return "stream" if cfg.source in ("hf", "tfds") else "cached"


def _eval_set(val_docs, tokenizer, cfg, seq_len, global_batch, process_index, process_count, eval_split):
  """Evaluation batches, target count and bytes from validation documents (a stream of bytes or a Corpus)."""
  if isinstance(val_docs, corpus_lib.Corpus):
    val, vbytes = val_docs.val, val_docs.val_bytes
  else:
    (_, val, vbytes), _ = corpus_lib.write_streams(
        tokenizer, [], val_docs, 0.0, cfg.eval_max_tokens, None)
  n_val = int(val.shape[0])
  if cfg.val_fraction > 0 and n_val < 2 and not eval_split:
    raise ValueError(
        f"empty validation split: no document has a newline after its val_fraction={cfg.val_fraction} mark "
        "(use longer documents or a larger val_fraction, or val_fraction=0 to disable evaluation)")
  n_targets = max(n_val - 1, 0)
  if cfg.eval_max_tokens > 0:
    n_targets = min(n_targets, cfg.eval_max_tokens)
  if cfg.vocab_limit:
    pipeline.check_vocab(np.asarray(val[:n_targets + 1]), cfg.vocab_limit, "validation")
  eval_bytes = int(vbytes[1:n_targets + 1].sum(dtype="int64")) if n_targets else 0
  batches = pipeline.make_eval_batches(val, seq_len, global_batch, n_targets, process_index, process_count)
  return batches, int(n_targets), eval_bytes


def _stream_readers(cfg):
  """(shard factory index, count -> reader; validation documents (bytes iterator) or None; eval split name)."""
  src = cfg.source
  if src in ("stdlib", "files"):
    files = sources_lib.stdlib_files() if src == "stdlib" else sources_lib.expand_paths(cfg.paths)
    shard = lambda i, n: sources_lib.FileShard(files, cfg.text_field, i, n)
    val = lambda: sources_lib.file_documents(files, cfg.text_field)
    return shard, _val_parts(val, cfg.val_fraction), ""
  if src == "hf":
    where = f"hf_name={cfg.hf_name!r}"
    make = lambda split: (lambda: sources_lib.hf_dataset(cfg.hf_name, cfg.hf_config, split, cfg.text_field,
                                                         split_required=split != cfg.hf_train_split))
    make(cfg.hf_train_split)()  # Fail early (bad name, split or text_field), before the prefetch thread starts.
    shard = lambda i, n: sources_lib.HFShard(make(cfg.hf_train_split), cfg.text_field, i, n, where)
    if cfg.hf_eval_split:
      docs = lambda: (d for d, _ in sources_lib.HFShard(make(cfg.hf_eval_split), cfg.text_field, 0, 1,
                                                        where).open(0))
      return shard, _whole(docs), cfg.hf_eval_split
    docs = lambda: (d for d, _ in sources_lib.HFShard(make(cfg.hf_train_split), cfg.text_field, 0, 1,
                                                      where).open(0))
    return shard, _val_parts(docs, cfg.val_fraction), ""
  if src == "tfds":
    if not cfg.tfds_name:
      raise ValueError("source='tfds' needs data.tfds_name (e.g. 'c4/en'); got ''")
    sources_lib.import_tfds()
    shard = lambda i, n: sources_lib.TFDSShard(cfg.tfds_name, cfg.tfds_train_split, cfg.tfds_data_dir,
                                               cfg.text_field, i, n)
    split = cfg.tfds_eval_split or cfg.tfds_train_split
    docs = lambda: sources_lib.tfds_documents(cfg.tfds_name, split, cfg.tfds_data_dir, cfg.text_field)
    if cfg.tfds_eval_split:
      return shard, _whole(docs), cfg.tfds_eval_split
    return shard, _val_parts(docs, cfg.val_fraction), ""
  raise ValueError(f"data.pipeline='stream' does not support source={src!r}")


def _whole(docs):
  return lambda: (sources_lib.clean(bytes(d)) for d in docs())


def _val_parts(docs, val_fraction):
  if val_fraction <= 0:
    return lambda: iter(())
  return lambda: (v for d in docs() for v in [sources_lib.split_document(sources_lib.clean(bytes(d)),
                                                                         val_fraction)[1]] if v)


def make_data(data_cfg, *, seq_len, global_batch, seed, process_index=0, process_count=1):
  """Builds the train iterator and evaluation batches for `data_cfg` (see `default_data_config`).

  With process_count P > 1 every batch holds this process's rows [p*B/P, (p+1)*B/P) of the global batch.
  """
  cfg = default_data_config()
  given = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  unknown = sorted(set(given) - set(cfg.keys()))
  if unknown:
    raise ValueError(f"unknown data config field(s) {unknown}; known: {sorted(cfg.keys())}")
  try:
    cfg.update(given)  # Partial configs / plain dicts are filled in with the defaults.
  except TypeError as e:  # ml_collections type check, e.g. a float for an int field.
    raise ValueError(f"bad data config value: {e}") from None
  _positive_int("seq_len", seq_len)
  _positive_int("global_batch", global_batch)
  _positive_int("process_count", process_count)
  if isinstance(process_index, bool) or not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index!r} must be an int in [0, process_count={process_count})")
  if global_batch % process_count:
    raise ValueError(f"global_batch={global_batch} is not a multiple of process_count={process_count}")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed={seed!r} must be an int")
  _check_config(cfg)
  seed = seed % (1 << 63)
  shuffle_seed = seed if cfg.shuffle_seed < 0 else int(cfg.shuffle_seed)
  tokenizer = make_tokenizer(cfg.tokenizer, cfg.tokenizer_path)
  vocab = cfg.vocab_limit or tokenizer.vocab_size
  if cfg.vocab_limit and tokenizer.eos_id >= cfg.vocab_limit:
    raise ValueError(f"data.vocab_limit={cfg.vocab_limit} does not cover the tokenizer's EOS id "
                     f"{tokenizer.eos_id} (the document separator); raise vocab_limit")
  procs = dict(process_index=process_index, process_count=process_count)
  if cfg.get("shuffle_buffer", 0) and (cfg.source == "synthetic" or resolve_pipeline(cfg) != "stream"):
    raise ValueError(f"data.shuffle_buffer={cfg.shuffle_buffer} applies to the streaming pipeline; the cached one "
                     f"already shuffles every epoch globally (set shuffle_buffer=0, or data.pipeline='stream')")
  if cfg.get("stream_aligned_epochs", False) and (cfg.source == "synthetic" or resolve_pipeline(cfg) != "stream"):
    raise ValueError("data.stream_aligned_epochs=True applies to the streaming pipeline; the cached pipeline's ids "
                     "are already the same in every epoch (set it to False, or data.pipeline='stream')")

  if cfg.source == "synthetic":
    vocab = cfg.synthetic_vocab_size or vocab
    n_eval = cfg.eval_max_tokens or global_batch * seq_len
    return DataBundle(
        train=SyntheticTrainIterator(vocab, seq_len, global_batch, seed, **procs),
        eval_batches=pipeline.make_synthetic_eval_batches(vocab, seq_len, global_batch, seed, n_eval, **procs),
        eval_num_bytes=0, eval_num_tokens=int(n_eval), vocab_size=int(vocab), tokenizer=tokenizer,
        info={"source": "synthetic"})

  if resolve_pipeline(cfg) == "stream":
    return _make_stream(cfg, tokenizer, vocab, seq_len, global_batch, procs, shuffle_seed)

  corpus = corpus_lib.load_corpus(cfg, tokenizer)
  n_train = int(corpus.train.shape[0])
  if n_train == 0:
    raise ValueError(f"empty corpus: data source {cfg.source!r} ({_what(cfg)}) gave no training text")
  train = TrainIterator(corpus.train, seq_len, global_batch, shuffle_seed, vocab_limit=cfg.vocab_limit,
                        prefetch=cfg.prefetch, **procs)
  if train.num_sequences < global_batch:
    raise ValueError(
        f"corpus too small: {n_train} training tokens pack into {train.num_sequences} sequences of "
        f"seq_len+1={seq_len + 1} tokens, fewer than global_batch={global_batch} (use more data "
        "(max_bytes/paths), a smaller global_batch or a smaller seq_len)")
  eval_split = cfg.tfds_eval_split if cfg.source == "tfds" else (cfg.hf_eval_split if cfg.source == "hf" else "")
  batches, n_targets, eval_bytes = _eval_set(corpus, tokenizer, cfg, seq_len, global_batch, process_index,
                                             process_count, eval_split)
  info = {k: v for k, v in corpus.meta.items()}
  info.update(pipeline="cached", num_train_sequences=train.num_sequences, batches_per_epoch=train.batches_per_epoch)
  return DataBundle(train=train, eval_batches=batches, eval_num_bytes=eval_bytes, eval_num_tokens=n_targets,
                    vocab_size=int(vocab), tokenizer=tokenizer, info=info)


def aligned_span(rows_per_shard: int, shuffle_buffer: int) -> int:
  """Consecutive windows of a shard that one batch can draw from: B/S, or with a shuffle buffer K > 1 the K-groups
  that B/S consecutive shuffled positions touch, (floor((B/S − 1)/K) + 2)·K at most."""
  b, k = int(rows_per_shard), int(shuffle_buffer)
  return b if k <= 1 else ((b - 1) // k + 2) * k


def _check_aligned(epoch_windows, rows_per_shard, shuffle_buffer):
  """With aligned epochs an id repeats every W_s windows of shard s; no batch may hold one id twice."""
  span = aligned_span(rows_per_shard, shuffle_buffer)
  for s, w in enumerate(epoch_windows):
    if w < span:
      raise ValueError(
          f"data.stream_aligned_epochs: stream shard {s} of {len(epoch_windows)} packs into {w} windows per epoch, "
          f"fewer than the {span} consecutive windows one batch draws from it (global_batch/stream_shards="
          f"{rows_per_shard}" + (f", data.shuffle_buffer={shuffle_buffer}" if shuffle_buffer > 1 else "")
          + "), so an example would appear twice in one batch; use more data, fewer data.stream_shards, a smaller "
          "global_batch or shuffle_buffer")


def _what(cfg):
  return {"files": cfg.paths, "tfds": cfg.tfds_name, "hf": cfg.hf_name}.get(cfg.source, cfg.source)


def _make_stream(cfg, tokenizer, vocab, seq_len, global_batch, procs, shuffle_seed=0):
  if cfg.max_bytes:
    raise ValueError(f"data.max_bytes={cfg.max_bytes} applies to the cached pipeline; the streaming pipeline "
                     "reads only what the run consumes (set max_bytes=0, or data.pipeline='cached')")
  shards = cfg.stream_shards or math.gcd(global_batch, MAX_AUTO_STREAM_SHARDS)
  if global_batch % shards:
    raise ValueError(f"data.stream_shards={shards} must divide global_batch={global_batch}")
  if shards % procs["process_count"]:
    raise ValueError(f"data.stream_shards={shards} must be a multiple of process_count="
                     f"{procs['process_count']} (each process reads whole shards)")
  shard, val_docs, eval_split = _stream_readers(cfg)
  if cfg.eval_max_tokens == 0 and (eval_split or cfg.val_fraction > 0):
    raise ValueError("data.eval_max_tokens=0 (evaluate everything) needs a whole pass over the data; the "
                     "streaming pipeline needs a cap: set data.eval_max_tokens (e.g. 10000000), or val_fraction=0 "
                     "and an empty eval split to disable evaluation")
  batches, n_targets, eval_bytes = _eval_set(val_docs(), tokenizer, cfg, seq_len, global_batch,
                                             procs["process_index"], procs["process_count"], eval_split)
  from train.data import stream  # pylint: disable=import-outside-toplevel  (imports grain)
  train_frac = 0.0 if eval_split else cfg.val_fraction
  info = {"source": cfg.source, "pipeline": "stream", "stream_shards": shards, "tokenizer": tokenizer.name,
          "eval_split": eval_split or None}
  epoch_windows = None
  if cfg.get("stream_aligned_epochs", False):
    epoch_windows = [stream.count_epoch_windows(shard(s, shards), tokenizer, seq_len, train_frac)
                     for s in range(shards)]
    _check_aligned(epoch_windows, global_batch // shards, cfg.get("shuffle_buffer", 0))
    # Window j of shard s has id j·S + s: the ids are < N = max_s (W_s − 1)·S + s + 1.
    info.update(epoch_windows=epoch_windows,
                num_train_sequences=max((w - 1) * shards + s + 1 for s, w in enumerate(epoch_windows)))
  train = stream.StreamTrainIterator(lambda i: shard(i, shards), shards, tokenizer, seq_len, global_batch,
                                     train_frac, vocab_limit=cfg.vocab_limit, prefetch=cfg.prefetch,
                                     shuffle_buffer=cfg.get("shuffle_buffer", 0), shuffle_seed=shuffle_seed,
                                     epoch_windows=epoch_windows, **procs)
  return DataBundle(train=train, eval_batches=batches, eval_num_bytes=eval_bytes, eval_num_tokens=n_targets,
                    vocab_size=int(vocab), tokenizer=tokenizer, info=info)


__all__ = ["default_data_config", "make_data", "DataBundle", "TrainIterator", "SyntheticTrainIterator",
           "ByteTokenizer", "SentencePieceTokenizer", "HFTokenizer", "make_tokenizer"]
