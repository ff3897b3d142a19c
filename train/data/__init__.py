"""Training data for lostjax: sources -> tokenizer -> cached token streams -> packed, shuffled batches.

    bundle = make_data(cfg.data, seq_len=256, global_batch=512, seed=0)
    batch = next(bundle.train)          # {'tokens': int32[B, L+1], 'ids': int64[B], 'epoch': int}
    state = bundle.train.get_state()    # JSON ints; bundle.train.set_state(state) resumes exactly
    for eb in bundle.eval_batches(): ...  # {'tokens': int32[B, L+1], 'mask': float32[B, L]}
    bpb = total_eval_nats / bundle.eval_num_bytes / ln 2

Conventions (details in the module docstrings):
* sources (`sources.py`): 'stdlib' (the standard library's .py files), 'files' (globs of .txt/.gz/.jsonl/
  .jsonl.gz), 'tfds' (optional extra), 'synthetic' (uniform random tokens, for benchmarks);
* validation = the last `val_fraction` of the bytes of every document, cut at the first newline after the mark
  (shared/corpus/README.md); for TFDS with `tfds_eval_split` set, that split instead;
* tokenizers (`tokenizers.py`): 'byte' (257 ids, EOS=256) or 'sentencepiece' (`tokenizer_path`, e.g. T5's
  spiece.model, or one trained with `python -m train.data.train_tokenizer`);
* token streams cached as .npy memmaps under `cache_dir` (`corpus.py`); packing with stride seq_len, seeded
  per-epoch permutations, resumable iterator (`pipeline.py`).
"""
import dataclasses
import os
from typing import Any, Callable, Iterator, Optional

import ml_collections

from train.data import corpus as corpus_lib
from train.data import pipeline
from train.data.pipeline import SyntheticTrainIterator, TrainIterator
from train.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, make_tokenizer

SOURCES = ("stdlib", "files", "tfds", "synthetic")
TOKENIZERS = ("byte", "sentencepiece")


def default_data_config():
  """Data config; every field can be overridden with `--config.data.<field>=...`."""
  c = ml_collections.ConfigDict()
  c.source = "stdlib"             # 'stdlib' | 'files' | 'tfds' | 'synthetic'
  c.paths = ""                    # source='files': comma-separated globs (.txt, .gz, .jsonl, .jsonl.gz)
  c.text_field = "text"           # JSON field (jsonl) / feature (tfds) holding the text
  c.tfds_name = "c4/en"           # source='tfds'
  c.tfds_data_dir = ""            # tfds data_dir ('' = TFDS default)
  c.tfds_train_split = "train"
  c.tfds_eval_split = "validation"  # '' = cut validation from each training document instead
  c.tokenizer = "byte"            # 'byte' | 'sentencepiece'
  c.tokenizer_path = ""           # SentencePiece .model file
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
  for name in ("max_bytes", "eval_max_tokens", "synthetic_vocab_size"):
    v = cfg[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f"data.{name}={v!r} must be a non-negative int")


def make_data(data_cfg, *, seq_len, global_batch, seed):
  """Builds the train iterator and evaluation batches for `data_cfg` (see `default_data_config`)."""
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
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed={seed!r} must be an int")
  _check_config(cfg)
  seed = seed % (1 << 63)
  shuffle_seed = seed if cfg.shuffle_seed < 0 else int(cfg.shuffle_seed)
  tokenizer = make_tokenizer(cfg.tokenizer, cfg.tokenizer_path)

  if cfg.source == "synthetic":
    vocab = cfg.synthetic_vocab_size or tokenizer.vocab_size
    n_eval = cfg.eval_max_tokens or global_batch * seq_len
    return DataBundle(
        train=SyntheticTrainIterator(vocab, seq_len, global_batch, seed),
        eval_batches=pipeline.make_synthetic_eval_batches(vocab, seq_len, global_batch, seed, n_eval),
        eval_num_bytes=0, eval_num_tokens=int(n_eval), vocab_size=int(vocab), tokenizer=tokenizer,
        info={"source": "synthetic"})

  corpus = corpus_lib.load_corpus(cfg, tokenizer)
  n_train = int(corpus.train.shape[0])
  if n_train == 0:
    what = cfg.paths if cfg.source == "files" else (cfg.tfds_name if cfg.source == "tfds" else cfg.source)
    raise ValueError(f"empty corpus: data source {cfg.source!r} ({what}) gave no training text")
  train = TrainIterator(corpus.train, seq_len, global_batch, shuffle_seed)
  if train.num_sequences < global_batch:
    raise ValueError(
        f"corpus too small: {n_train} training tokens pack into {train.num_sequences} sequences of "
        f"seq_len+1={seq_len + 1} tokens, fewer than global_batch={global_batch} (use more data "
        "(max_bytes/paths), a smaller global_batch or a smaller seq_len)")
  n_val = int(corpus.val.shape[0])
  if cfg.val_fraction > 0 and n_val < 2 and not (cfg.source == "tfds" and cfg.tfds_eval_split):
    raise ValueError(
        f"empty validation split: no document has a newline after its val_fraction={cfg.val_fraction} mark "
        "(use longer documents or a larger val_fraction, or val_fraction=0 to disable evaluation)")
  n_targets = max(n_val - 1, 0)
  if cfg.eval_max_tokens > 0:
    n_targets = min(n_targets, cfg.eval_max_tokens)
  eval_bytes = int(corpus.val_bytes[1:n_targets + 1].sum(dtype="int64")) if n_targets else 0
  info = {k: v for k, v in corpus.meta.items()}
  info.update(num_train_sequences=train.num_sequences, batches_per_epoch=train.batches_per_epoch)
  return DataBundle(
      train=train,
      eval_batches=pipeline.make_eval_batches(corpus.val, seq_len, global_batch, n_targets),
      eval_num_bytes=eval_bytes, eval_num_tokens=int(n_targets), vocab_size=int(tokenizer.vocab_size),
      tokenizer=tokenizer, info=info)


__all__ = ["default_data_config", "make_data", "DataBundle", "TrainIterator", "SyntheticTrainIterator",
           "ByteTokenizer", "SentencePieceTokenizer", "make_tokenizer"]
