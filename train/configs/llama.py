"""LLaMA presets on the GaLore/LOST C4 protocol: `--config=train/configs/llama.py:<size>,<method>`.

size: tiny | small | 20m | 60m | 130m | 350m | 1b | 7b; method: dense | lowrank | lost (default lost) | cola | sltrain
(the baselines, presets of train/configs/base.py: PRESET_METHODS).
Protocol (GaLore scripts/benchmark_c4, LOST §4): seq 256, 512×256 tokens per step, warmup 10 % then cosine to
10 %, AdamW, 10K/20K/60K/100K steps for 60M/130M/350M/1B, C4 (`allenai/c4`, config `en`) streamed with Hugging
Face `datasets` (`pip install -e .[hf]`) and T5's tokenizer (`google-t5/t5-base` tokenizer.json: 32,100 ids, of
which the model embeds 32,000 = `data.vocab_limit`; C4 text never yields the 100 sentinel ids, a batch that did
would stop the run naming the id). The streaming pipeline reads only what the run consumes (steps × 512 × 256
tokens, plus `eval_max_tokens` of the validation split). Other inputs:
`--config.data.source=tfds` (TFDS `c4/en` from `--config.data.tfds_data_dir=gs://...`, `pip install -e .[tfds]`),
`--config.data.tokenizer=sentencepiece --config.data.tokenizer_path=/path/to/spiece.model` (T5's SentencePiece
file), `--config.data.tokenizer_path=/path/to/tokenizer.json` (offline), or local text:
`--config.data.source=files --config.data.paths='/data/*.jsonl.gz'`.

No gradient clipping (`optim.grad_clip=0.0`): the GaLore and FRUGAL C4 reference scripts clip nothing, so the
presets do not either; the shared default elsewhere stays 1.0 (quickstart). Turn it on, or resume a run directory
written with the earlier default, with `--config.optim.grad_clip=1.0`.

The learning rates are the GaLore/LOST scripts' (1e-3 for 60M–350M dense AdamW; LOST's dev code uses 1e-3 as
well); they are starting points, not tuned values.
"""

from train.cli import did_you_mean
from train.configs.base import METHODS, base_config, model_config

STEPS = {"tiny": 2000, "small": 5000, "20m": 5000, "60m": 10_000, "130m": 20_000, "350m": 60_000,
         "1b": 100_000, "7b": 150_000}


def get_config(arg: str = "60m,lost"):
  parts = [p.strip() for p in (arg or "60m,lost").split(",")]
  size = parts[0]
  method = parts[1] if len(parts) > 1 else "lost"
  if len(parts) > 2:
    raise ValueError(f"llama.py:{arg}: expected <size>,<method>, got {len(parts)} comma-separated parts")
  if size not in STEPS:
    raise ValueError(f"unknown preset size {size!r} in llama.py:{arg} (sizes: {', '.join(STEPS)})"
                     f"{did_you_mean(size, STEPS)}")
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r} in llama.py:{arg} (methods: {', '.join(METHODS)})"
                     f"{did_you_mean(method, METHODS)}")
  c = base_config()
  c.model = model_config(size, method)
  if size not in ("tiny", "small"):
    c.model.vocab_size = 32000
    c.data.source = "hf"
    c.data.hf_name = "allenai/c4"
    c.data.hf_config = "en"
    c.data.tfds_name = "c4/en"          # --config.data.source=tfds reads the same corpus from TFDS
    c.data.tokenizer = "hf"
    c.data.tokenizer_path = "google-t5/t5-base"  # Hub name (the GaLore scripts' t5-base), or a local tokenizer.json
    c.data.vocab_limit = 32000
    c.data.eval_max_tokens = 10_000_000
  c.model.max_seq_len = 1024
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.warmup_frac = 0.1
  c.optim.min_lr_ratio = 0.1
  c.optim.grad_clip = 0.0   # the GaLore/FRUGAL reference scripts clip nothing
  c.train.steps = STEPS[size]
  c.train.global_batch = 512
  c.train.seq_len = 256
  c.train.eval_every = 1000
  c.train.ckpt_every = 1000
  c.train.log_every = 50
  return c
