"""Sample text from a trained run: `python -m train.sample --workdir=runs/quick --prompt="def " --max_new_tokens=200`.

Loads the latest (or `--step`) checkpoint with `train.checkpoint.load_model`, encodes the prompt with the run's
tokenizer (its config.json `data` section, `train.data.tokenizers.make_tokenizer`), generates with
`lostjax.generate` (KV cache; temperature 0 = greedy) and prints prompt + continuation of each sample, separated
by a line of dashes. A sample ends at the tokenizer's EOS. An empty prompt starts from EOS (a document boundary).
Bad input (no checkpoint, a prompt longer than model.max_seq_len, bad sampling settings) prints one `error:`
line and exits with status 2.
"""

from __future__ import annotations

import sys

from absl import flags, logging

# Own FlagValues (not absl's global FLAGS): `main(argv)` can be called in-process, next to other CLIs' flags.
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).", flag_values=FLAGS)
flags.DEFINE_string("prompt", "", "Text to continue.", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).", flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "PRNG seed.", flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 1, "Samples (one batch).", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)


def sample_texts(workdir: str, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                 seed: int, num_samples: int, step: int | None = None) -> list[str]:
  """The continuations (decoded, without the prompt) of `num_samples` samples."""
  import numpy as np

  import lostjax
  from train.checkpoint import load_model
  from train.data.tokenizers import make_tokenizer

  if not workdir:
    raise ValueError("--workdir is required")
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
  model, cfg = load_model(workdir, step)
  tok = make_tokenizer(cfg.data.tokenizer, cfg.data.get("tokenizer_path", ""))
  ids = tok.encode(prompt) if prompt else np.asarray([tok.eos_id], np.int32)
  if len(ids) > model.cfg.max_seq_len:
    raise ValueError(f"the prompt is {len(ids)} tokens long; this model takes at most "
                     f"model.max_seq_len={model.cfg.max_seq_len}")
  prompts = np.tile(np.asarray(ids, np.int32)[None], (num_samples, 1))
  out = np.asarray(lostjax.generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, eos_id=int(tok.eos_id)))
  texts = []
  for row in out:
    stop = np.flatnonzero(row == tok.eos_id)
    texts.append(tok.decode(row[:stop[0]] if stop.size else row))
  return texts


def main(argv) -> int:
  from train.cli import parse
  status = parse(FLAGS, argv, __doc__)
  if status is not None:
    return status
  logging.set_verbosity(logging.WARNING)
  from train.checkpoint import CheckpointError
  try:
    texts = sample_texts(FLAGS.workdir, FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
                         temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
                         num_samples=FLAGS.num_samples, step=FLAGS.step)
  except (ValueError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for i, text in enumerate(texts):
    if i:
      print("-" * 40)
    print(FLAGS.prompt + text)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
