"""Autoregressive text generation from a `lostjax.models.Llama` with a static-shape KV cache.

Decoding as in the LLaMA paper's models ("LLaMA: Open and Efficient Foundation Language Models", arXiv 2302.13971)
and the usual sampling filters:
  * temperature:  p(x) ∝ exp(z_x / T); T = 0 is greedy decoding (argmax of the logits z);
  * top-k:        only the k largest logits are kept (k = 0: all);
  * top-p (nucleus sampling, "The Curious Case of Neural Text Degeneration", Holtzman et al., arXiv 1904.09751):
                  with the tokens sorted by probability p_(1) >= p_(2) >= ..., keep token (i) iff
                  Σ_{j<i} p_(j) < top_p, i.e. the smallest prefix whose mass reaches top_p (tokens tied with the
                  last kept logit are kept too). Applied after temperature and top-k, as Hugging Face does.

Algorithm (one `jax.jit`, compiled once per model structure, prompt shape and max_new_tokens; temperature, top-k,
top-p, seed and eos_id are traced, so changing them does not recompile):
  1. the prompts are left-aligned into [batch, P] (right-padded input is shifted; row b's real tokens start at
     time pad_b = P - len_b), a `KVCache` of W = min(P + max_new_tokens, model.max_seq_len) slots is allocated;
  2. prefill: one forward over the P prompt tokens writes every layer's keys/values into the cache;
  3. decode: a `lax.scan` of max_new_tokens - 1 steps, each a forward of the model on [batch, 1] (any linear kind:
     dense, low-rank, LOST — the layers are just called on one token) attending to the cache.
RoPE positions count from each row's first real token (time - pad_b), so a padded row sees exactly the
positions it would see alone. Beyond model.max_seq_len tokens the cache is a ring buffer: each new token attends
to the previous W - 1 tokens (a sliding window; relative RoPE distances stay within the trained range).
After `eos_id` a row emits `eos_id` for the remaining steps.

`lostjax.generate` is this module and is callable: `lostjax.generate(model, ...)` is `generate(model, ...)`.
"""

from __future__ import annotations

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PADDING_SIDES = ("right", "left")


def filter_logits(logits: jax.Array, top_k=0, top_p=1.0) -> jax.Array:
  """Sets logits outside the top-k / top-p (nucleus) set to -inf. logits: [..., vocab] float.

  top_k (0 = off) and top_p (>= 1 = off) may be traced scalars: changing them does not recompile.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  top_k = jnp.asarray(top_k, jnp.int32)
  desc = -jnp.sort(-logits, axis=-1)
  rank = jnp.arange(vocab)
  desc = jnp.where((top_k > 0) & (rank >= top_k), -jnp.inf, desc)     # top-k, in sorted order
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs                          # mass of the tokens ranked above
  keep = (before < top_p) | (rank == 0) | (jnp.asarray(top_p) >= 1.0)
  keep = keep & jnp.isfinite(desc)
  threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_token(logits: jax.Array, key: jax.Array, *, temperature, top_k=0, top_p=1.0) -> jax.Array:
  """One token id per row of logits [batch, vocab]: the argmax when temperature == 0, else a draw from the
  softmax of the top-k/top-p filtered logits / temperature. All settings may be traced scalars."""
  temperature = jnp.asarray(temperature, jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  z = filter_logits(logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0), top_k, top_p)
  drawn = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "width"))
def _generate(graphdef, state, tokens, start, key, temperature, top_k, top_p, eos_id, *, max_new_tokens, width):
  """Compiled once per model structure, prompt shape, max_new_tokens and cache width; every sampling setting
  (and eos_id, -1 = none) is a traced scalar."""
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(tokens.shape[0], width, start=start)
  logits, cache = model(tokens, cache=cache)

  def pick(logits, step):
    return sample_token(logits, jax.random.fold_in(key, step), temperature=temperature, top_k=top_k, top_p=top_p)

  first = pick(logits[:, -1], 0)
  done = (first == eos_id) & (eos_id >= 0)

  def step(carry, i):
    tok, done, cache = carry
    logits, cache = model(tok[:, None], cache=cache)
    nxt = jnp.where(done, eos_id, pick(logits[:, 0], i))
    done = done | ((nxt == eos_id) & (eos_id >= 0))
    return (nxt, done, cache), nxt

  _, rest = jax.lax.scan(step, (first, done, cache), jnp.arange(1, max_new_tokens))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def _check_int(name, value, low, high=None):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
      high is not None and value > high):
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be an int {bound}, got {value!r}")


def left_align(prompt_tokens, prompt_lengths=None, padding_side: str = "right"):
  """(tokens [batch, P] int32 left-padded with 0, pad [batch] int32) from padded prompts and their lengths."""
  tokens = np.asarray(prompt_tokens)
  if tokens.ndim == 1:
    tokens = tokens[None]
  if tokens.ndim != 2 or tokens.shape[1] == 0 or tokens.shape[0] == 0:
    raise ValueError(f"prompt_tokens must be a non-empty [batch, prompt_len] array, got shape {tokens.shape}")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"prompt_tokens must hold integer token ids, got dtype {tokens.dtype}")
  if padding_side not in PADDING_SIDES:
    raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
  b, p = tokens.shape
  lengths = np.full(b, p) if prompt_lengths is None else np.asarray(prompt_lengths).reshape(-1)
  if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer) or lengths.min() < 1 or lengths.max() > p:
    raise ValueError(f"prompt_lengths must be {b} ints in [1, {p}] (one per row), got {prompt_lengths!r}")
  out = np.zeros((b, p), np.int32)
  for row, n in enumerate(lengths):
    real = tokens[row, :n] if padding_side == "right" else tokens[row, p - n:]
    out[row, p - n:] = real
  return out, (p - lengths).astype(np.int32)


def generate(model, prompt_tokens, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, prompt_lengths=None, eos_id: int | None = None,
             padding_side: str = "right") -> jax.Array:
  """New tokens [batch, max_new_tokens] int32 continuing each prompt (see the module docstring).

  Args:
    model: a `lostjax.models.Llama` (any linear kinds, float32 or bfloat16 compute).
    prompt_tokens: [batch, P] (or [P]) integer ids; ragged prompts are padded to P with any value.
    max_new_tokens: number of tokens to generate (>= 1).
    temperature: 0 = greedy; otherwise logits are divided by it before top-k/top-p and sampling.
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass in (0, 1] (1 = off).
    seed: PRNG seed; the same seed and inputs give the same tokens.
    prompt_lengths: [batch] real lengths of the rows (default: all P).
    eos_id: once a row emits it, the row keeps emitting it.
    padding_side: where the padding of a short row is, 'right' (tokens first, default) or 'left'.
  Called eagerly (not inside jit); the work itself is one jitted prefill + scan (see the module docstring).
  """
  cfg = model.cfg
  tokens, pad = left_align(prompt_tokens, prompt_lengths, padding_side)
  real = np.concatenate([tokens[r, pad[r]:] for r in range(tokens.shape[0])])
  if real.min() < 0 or real.max() >= cfg.vocab_size:
    raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}), got min {real.min()} max {real.max()}")
  if tokens.shape[1] > cfg.max_seq_len:
    raise ValueError(f"prompt length {tokens.shape[1]} exceeds model.max_seq_len={cfg.max_seq_len}")
  _check_int("max_new_tokens", max_new_tokens, 1)
  _check_int("top_k", top_k, 0, cfg.vocab_size)
  _check_int("seed", seed, 0)
  if eos_id is not None:
    _check_int("eos_id", eos_id, 0, cfg.vocab_size - 1)
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
      np.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be a float in (0, 1], got {top_p!r}")
  graphdef, state = nnx.split(model)
  width = min(tokens.shape[1] + max_new_tokens, cfg.max_seq_len)
  return _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(pad), jax.random.key(seed),
                   jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                   jnp.int32(-1 if eos_id is None else eos_id), max_new_tokens=max_new_tokens, width=width)


class _CallableModule(types.ModuleType):
  """Makes `lostjax.generate(...)` (the module, once imported) call `generate`."""

  def __call__(self, *args, **kwargs):
    return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
