"""lostjax.generate and the KV cache: oracles are the model's own full (uncached) forward and a float64 numpy
nucleus filter; the sample CLI runs on a tiny model trained here to memorise one line of text."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lostjax
from lostjax import generate as gen
from lostjax.models import Llama, preset


def _model(kind="dense", **kw):
  return _cached_model(kind, tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=None)
def _cached_model(kind, kw):
  base = dict(attn_kind=kind, mlp_kind=kind, attn_rank=8, mlp_rank=8, sparsity=0.1, max_seq_len=32)
  base.update(dict(kw))
  model = Llama(preset("tiny", **base), rngs=nnx.Rngs(0))
  model.jit_forward = jax.jit(lambda t: model(t))
  model.jit_cached = jax.jit(lambda t, c: model(t, cache=c))
  return model


def _greedy_reference(model, rows, n):
  """Greedy continuation of each row by repeated full forwards (causal: read the logit at the row's end)."""
  fwd = model.jit_forward
  out = []
  for row in rows:
    seq = list(row)
    for _ in range(n):
      buf = np.zeros((1, model.cfg.max_seq_len), np.int32)
      buf[0, :len(seq)] = seq
      seq.append(int(np.argmax(np.asarray(fwd(jnp.asarray(buf)))[0, len(seq) - 1])))
    out.append(seq[len(row):])
  return np.asarray(out)


@pytest.mark.parametrize("kind,kw", [("dense", {}), ("lost", {}), ("lowrank", dict(lowrank_act="silu", n_layers=1))])
def test_greedy_equals_repeated_full_forward_ragged(kind, kw):
  model = _model(kind, **kw)
  rows = [[5, 17, 99, 3, 250, 7], [42, 8, 1]]
  right = np.array([rows[0], rows[1] + [0, 0, 0]])
  left = np.array([rows[0], [9, 9, 9] + rows[1]])
  want = _greedy_reference(model, rows, 8)
  got = gen.generate(model, right, 8, temperature=0, prompt_lengths=[6, 3])
  np.testing.assert_array_equal(np.asarray(got), want)
  got_left = lostjax.generate(model, left, 8, temperature=0, prompt_lengths=[6, 3], padding_side="left")
  np.testing.assert_array_equal(np.asarray(got_left), want)


@pytest.mark.parametrize("kind,impl", [("dense", "auto"), ("lost", "auto"),    # 'auto' is 'fused' on CPU
                                       pytest.param("lost", "xla", marks=pytest.mark.slow)])
def test_cached_logits_equal_uncached(kind, impl):
  model = _model(kind) if impl == "auto" else _model(kind, sparse_impl=impl)
  tokens = jax.random.randint(jax.random.key(3), (2, 14), 0, model.cfg.vocab_size)
  full = np.asarray(model.jit_forward(tokens))
  # Row 1 is left-padded by 3: its real tokens are tokens[1, :11] at times 3..13.
  padded = tokens.at[1].set(jnp.concatenate([jnp.full((3,), 77), tokens[1, :11]]))
  cache = model.init_cache(2, 20, start=jnp.array([0, 3]))
  step = model.jit_cached
  logits, cache = step(padded[:, :9], cache)
  outs = [logits]
  for i in range(9, 14):
    logits, cache = step(padded[:, i:i + 1], cache)
    outs.append(logits)
  inc = np.asarray(jnp.concatenate(outs, axis=1))
  assert int(cache.index) == 14
  np.testing.assert_allclose(inc[0], full[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(inc[1, 3:], full[1, :11], atol=1e-5, rtol=1e-5)


def test_ring_buffer_is_a_sliding_window():
  # One layer: the logit at time t depends only on tokens t-W+1..t (RoPE is relative), so it equals the full
  # forward of that window alone.
  w = 8
  model = _model("dense", n_layers=1, max_seq_len=w)
  tokens = np.asarray(jax.random.randint(jax.random.key(4), (1, 20), 0, model.cfg.vocab_size))
  cache = model.init_cache(1, w)
  step = model.jit_cached
  logits, cache = step(jnp.asarray(tokens[:, :5]), cache)
  got = []
  for t in range(5, 20):
    logits, cache = step(jnp.asarray(tokens[:, t:t + 1]), cache)
    got.append(np.asarray(logits)[0, 0])
  prefix = np.asarray(model.jit_forward(jnp.asarray(tokens[:, :w])))[0]            # t < W: plain causal
  windows = np.stack([tokens[0, t - w + 1:t + 1] for t in range(w - 1, 20)])      # t >= W-1: the last W tokens
  last = np.asarray(model.jit_forward(jnp.asarray(windows)))[:, -1]
  want = np.concatenate([prefix[5:w - 1], last])
  np.testing.assert_allclose(np.stack(got), want, atol=2e-5, rtol=1e-4)


@pytest.mark.slow  # kept out of the default run for time; `pytest -m slow tests` runs it
def test_generation_past_max_seq_len_and_bf16():
  model = _model("lost", dtype="bfloat16", max_seq_len=16, n_layers=1)
  out = gen.generate(model, np.array([[1, 2, 3, 4]]), 30, temperature=0.7, top_k=20, seed=1)
  assert out.shape == (1, 30) and out.dtype == jnp.int32
  assert int(out.min()) >= 0 and int(out.max()) < model.cfg.vocab_size
  cache = model.init_cache(1, 16)
  assert len(cache.k) == 1 and cache.k[0].dtype == jnp.bfloat16 and cache.k[0].shape == (1, 4, 16, 16)


@pytest.mark.slow
def test_bf16_cached_tracks_full_forward():
  model = _model("lost", dtype="bfloat16", max_seq_len=16, n_layers=1)
  cache = model.init_cache(1, 16)
  # bf16 cached decoding tracks the bf16 full forward (bf16 rounding only).
  tokens = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]])
  _, cache = model.jit_cached(tokens[:, :15], cache)
  last, _ = model.jit_cached(tokens[:, 15:], cache)
  np.testing.assert_allclose(np.asarray(last[0, 0]), np.asarray(model.jit_forward(tokens)[0, 15]), atol=0.05)


def test_sampling_reproducible_topk1_is_greedy_and_eos():
  model = _model("dense")
  prompt = np.array([[10, 20, 30], [40, 50, 60]])
  a = gen.generate(model, prompt, 12, temperature=1.0, seed=7)
  b = gen.generate(model, prompt, 12, temperature=1.0, seed=7)
  c = gen.generate(model, prompt, 12, temperature=1.0, seed=8)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  greedy = np.asarray(gen.generate(model, prompt, 12, temperature=0))
  np.testing.assert_array_equal(np.asarray(gen.generate(model, prompt, 12, temperature=1.3, top_k=1, seed=3)),
                                greedy)
  zeros = np.array([[0, 20, 30], [40, 50, 0]])                      # 0 is a valid prompt id
  assert gen.generate(model, zeros, 12, temperature=0).shape == (2, 12)
  # eos_id 0 is a valid id, also as the first new token: seed 49 at T = 50 samples 0 first in row 1
  free = np.asarray(gen.generate(model, prompt, 12, temperature=50.0, seed=49))
  assert free[1, 0] == 0 and (free[1, 1:] != 0).any()
  stop = np.asarray(gen.generate(model, prompt, 12, temperature=50.0, seed=49, eos_id=0))
  assert (stop[1] == 0).all()
  eos = int(greedy[0, 2])
  out = np.asarray(gen.generate(model, prompt, 12, temperature=0, eos_id=eos))
  first = np.argmax(greedy == eos, axis=1)
  for r in range(2):
    if (greedy[r] == eos).any():
      np.testing.assert_array_equal(out[r, :first[r] + 1], greedy[r, :first[r] + 1])
      assert (out[r, first[r]:] == eos).all()
    else:
      np.testing.assert_array_equal(out[r], greedy[r])


def test_sample_token_reduces_the_last_axis_of_any_leading_shape():
  logits = jax.random.normal(jax.random.key(1), (2, 3, 5))     # [batch, seq, vocab]
  got = jax.jit(functools.partial(gen.sample_token, temperature=0.0))(logits, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), axis=-1))


def test_compiled_once_per_shape():
  model = _model("dense")
  prompt = np.array([[10, 20, 30], [40, 50, 60]])
  gen.generate(model, prompt, 12, temperature=0)
  n = gen._generate._cache_size()
  gen.generate(model, prompt[::-1], 12, temperature=0.5, top_k=3, top_p=0.5, seed=3, eos_id=4)  # all traced
  assert gen._generate._cache_size() == n


def _nucleus_numpy(logits, top_p):
  """float64 oracle: keep token (i) (sorted by probability) iff the mass ranked above it is < top_p."""
  z = np.asarray(logits, np.float64)
  order = np.argsort(-z)
  p = np.exp(z[order] - z[order].max())
  p /= p.sum()
  before = np.cumsum(p) - p
  keep = np.zeros(z.shape, bool)
  keep[order[(before < top_p) | (np.arange(z.size) == 0)]] = True
  return keep


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.75, 0.95, 1.0])
def test_top_p_filter_vs_numpy(top_p):
  logits = np.asarray(jax.random.normal(jax.random.key(5), (6, 40))) * 2.0
  got = np.isfinite(np.asarray(gen.filter_logits(jnp.asarray(logits), 0, top_p)))
  want = np.stack([_nucleus_numpy(row, top_p) for row in logits])
  np.testing.assert_array_equal(got, want)
  # as a traced value (inside jit) too
  got_jit = np.isfinite(np.asarray(jax.jit(gen.filter_logits)(jnp.asarray(logits), 0, jnp.float32(top_p))))
  np.testing.assert_array_equal(got_jit, want)
  if top_p == 1.0:
    assert got.all()


def test_top_p_one_keeps_tokens_whose_preceding_mass_rounds_to_one():
  # p = (1 - 2e-13, 1e-13, 1e-13): in float32 the mass ranked above the tail tokens is exactly 1.0, so only the
  # "top_p >= 1 is off" rule keeps them; top_p = 1 must leave every logit untouched.
  logits = jnp.asarray([[0.0, -30.0, -30.0]])
  got = jax.jit(gen.filter_logits)(logits, 0, jnp.float32(1.0))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(logits))


def test_top_k_then_top_p_and_sampled_frequencies():
  logits = np.asarray(jax.random.normal(jax.random.key(6), (30,)), np.float64) * 1.5
  got = np.isfinite(np.asarray(gen.filter_logits(jnp.asarray(logits), 10, 0.8)))
  top10 = np.where(logits >= np.sort(logits)[-10], logits, -np.inf)
  want = _nucleus_numpy(np.where(np.isfinite(top10), top10, -1e30), 0.8)
  np.testing.assert_array_equal(got, want)
  # draws follow the renormalised kept distribution (20000 draws, 3-sigma bound per token)
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = jax.vmap(lambda k: gen.sample_token(jnp.asarray(logits, jnp.float32)[None], k, temperature=1.0,
                                              top_k=10, top_p=0.8))(keys)
  freq = np.bincount(np.asarray(draws).ravel(), minlength=30) / 20000
  p = np.where(want, np.exp(logits - logits.max()), 0)
  p /= p.sum()
  assert (freq[~want] == 0).all()
  np.testing.assert_array_less(np.abs(freq - p), 3 * np.sqrt(p * (1 - p) / 20000) + 1e-3)


@jax.jit
def _draws_at(logits, keys, temperature):
  return jax.vmap(lambda k: gen.sample_token(logits[None], k, temperature=temperature))(keys)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_frequencies_follow_the_temperature(temperature):
  """Draws at T != 1 follow softmax(z / T) (float64 oracle; 20000 draws, 3-sigma bound per token)."""
  logits = np.asarray(jax.random.normal(jax.random.key(8), (12,)), np.float64) * 1.5
  draws = _draws_at(jnp.asarray(logits, jnp.float32), jax.random.split(jax.random.key(1), 20000),
                    jnp.float32(temperature))
  freq = np.bincount(np.asarray(draws).ravel(), minlength=12) / 20000
  p = np.exp((logits - logits.max()) / temperature)
  p /= p.sum()
  np.testing.assert_array_less(np.abs(freq - p), 3 * np.sqrt(p * (1 - p) / 20000) + 1e-3)


def test_every_decode_step_draws_with_its_own_key():
  """At a very high temperature every step is a near-uniform draw: with one key per step the 12 tokens of a row
  are mostly distinct; reusing a key would repeat the same Gumbel noise and so the same token."""
  model = _model("dense")
  prompt = np.array([[10 + r, 20, 30] for r in range(8)])
  out = np.asarray(gen.generate(model, prompt, 12, temperature=1e4, seed=11))
  for row in out:
    assert len(set(row.tolist())) >= 8, row
  # the first token (drawn after the prompt) and the second (the first cached step) use different keys too: with
  # a shared key all 8 rows would repeat their first token; by chance, each row only with probability ~1/257
  assert not np.all(out[:, 0] == out[:, 1]), out[:, :2]


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=300), "top_k"),
    (dict(top_k=-1), "top_k"), (dict(prompt_lengths=[0]), "prompt_lengths"),
    (dict(prompt_lengths=[4]), "prompt_lengths"), (dict(padding_side="middle"), "padding_side"),
    (dict(eos_id=257), "eos_id"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_arguments(kw, match):
  model = _model("dense")
  args = dict(max_new_tokens=3)
  args.update(kw)
  n = args.pop("max_new_tokens")
  with pytest.raises(ValueError, match=match):
    gen.generate(model, np.array([[1, 2, 3]]), n, **args)


def test_bad_prompts():
  model = _model("dense")
  with pytest.raises(ValueError, match="max_seq_len"):
    gen.generate(model, np.ones((1, 33), np.int32), 2)
  with pytest.raises(ValueError, match="token ids"):
    gen.generate(model, np.array([[1, 300]]), 2)
  with pytest.raises(ValueError, match="integer"):
    gen.generate(model, np.array([[1.5, 2.0]]), 2)
  with pytest.raises(ValueError, match="non-empty"):
    gen.generate(model, np.zeros((1, 0), np.int32), 2)
  # boundaries: the id vocab_size is out of range, a length 0 in any row is refused
  with pytest.raises(ValueError, match="token ids"):
    gen.generate(model, np.array([[1, model.cfg.vocab_size]]), 2)
  with pytest.raises(ValueError, match="token ids"):
    gen.generate(model, np.array([[-1, 5]]), 2)
  with pytest.raises(ValueError, match="prompt_lengths"):
    gen.generate(model, np.array([[1, 2, 3], [4, 5, 6]]), 2, prompt_lengths=[3, 0])


# ------------------------------------------------------------------------------------------------ sample CLI

TEXT = "hello world\n"


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A run directory (config.json + orbax checkpoint, as train.main writes them) of a one-layer byte model
  trained for 150 Adam steps to repeat TEXT."""
  from train.checkpoint import Checkpointer
  from train.configs.base import base_config, model_config

  workdir = str(tmp_path_factory.mktemp("sample_run"))
  cfg = base_config()
  cfg.model = model_config("tiny", "dense")
  cfg.model.update(n_layers=1, max_seq_len=32)
  cfg.data.tokenizer = "byte"
  cfg.train.seq_len = 32
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f)
  mcfg = preset("tiny", n_layers=1, max_seq_len=32)
  graphdef, params, rest = nnx.split(Llama(mcfg, rngs=nnx.Rngs(cfg.train.seed)), nnx.Param, ...)
  stream = np.frombuffer((TEXT * 8).encode(), np.uint8).astype(np.int32)
  batch = jnp.asarray(np.stack([stream[i:i + 33] for i in range(len(TEXT))]))
  tx = optax.adam(1e-2)

  @jax.jit
  def train_step(params, opt):
    def loss(p):
      logits = nnx.merge(graphdef, p, rest)(batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    value, g = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(params, updates), opt, value

  opt = tx.init(params)
  for _ in range(150):
    params, opt, value = train_step(params, opt)
  assert float(value) < 0.05
  ckpt = Checkpointer(workdir)
  ckpt.save(150, {"params": params}, rest, {})
  ckpt.close()
  return workdir


def test_sample_cli_greedy_continues_the_memorised_text(trained_workdir, capsys):
  from train import sample
  rc = sample.main(["sample", f"--workdir={trained_workdir}", "--prompt=hel", "--max_new_tokens=20",
                    "--temperature=0"])
  out = capsys.readouterr().out
  assert rc == 0
  assert out.startswith((TEXT * 3)[:23]), out
  rc = sample.main(["sample", f"--workdir={trained_workdir}", "--prompt=wor", "--max_new_tokens=20",
                    "--temperature=0.9", "--top_p=0.9", "--seed=2"])   # same shapes: no new compilation
  out = capsys.readouterr().out
  assert rc == 0 and out.startswith("wor") and len(out) > 3


@pytest.mark.parametrize("args,match", [
    (["--prompt=" + "x" * 40], "max_seq_len=32"), (["--top_p=2"], "top_p"), (["--num_samples=0"], "num_samples"),
    (["--nonsense=1"], "nonsense"),
])
def test_sample_cli_errors(trained_workdir, capsys, args, match):
  from train import sample
  rc = sample.main(["sample", f"--workdir={trained_workdir}", *args])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error:") and match in err and err.count("\n") == 1, err


def test_sample_cli_without_checkpoint(tmp_path, capsys):
  from train import sample
  assert sample.main(["sample", f"--workdir={tmp_path}"]) == 2
  assert "config.json" in capsys.readouterr().err
  with open(tmp_path / "config.json", "w") as f:
    from train.configs.base import base_config
    json.dump(base_config().to_dict(), f)
  assert sample.main(["sample", f"--workdir={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert "no checkpoint" in err and err.count("\n") == 1
