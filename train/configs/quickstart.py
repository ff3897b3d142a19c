"""Quickstart: a small LOST LLaMA trained on the Python standard library's source, a few minutes on 2 CPU cores.

    python -m train.main --config=train/configs/quickstart.py --workdir=runs/quick
"""

from train.configs.base import base_config, model_config


def get_config():
  c = base_config()
  c.model = model_config("small", "lost")   # d=256, ff=688, 4 heads, 4 layers, rank 64, s=0.05
  c.model.max_seq_len = 128
  c.data.source = "stdlib"
  c.data.tokenizer = "byte"
  c.data.max_bytes = 4_000_000
  c.data.eval_max_tokens = 32_768
  c.optim.lr = 3e-3
  c.optim.warmup_frac = 0.05
  c.train.steps = 240
  c.train.global_batch = 16
  c.train.seq_len = 128
  c.train.log_every = 10
  c.train.eval_every = 120
  c.train.ckpt_every = 120
  return c
