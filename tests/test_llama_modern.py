"""The LLaMA options of later checkpoints in lostjax.models.Llama: grouped-query attention (model.n_kv_heads),
tied embeddings (model.tie_embeddings) and the Llama-3 RoPE frequency scaling (model.rope_scaling).

Oracles: a float64 numpy decoder written here (GQA as Hugging Face's repeat_kv: query head i reads key/value head
i // (heads / kv_heads); the Llama-3 scaling transcribed from its definition, in float64), fed with the model's
effective dense weights (γ·A·B + (1−γ)·scatter_rows(I, W_s) for LOST); closed-form parameter and FLOP counts.
transformers' LlamaForCausalLM is the oracle of tests/test_export_modern.py (the same options through import).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lostjax.models import Llama, LlamaConfig, count_params
from lostjax.models.llama import rope_frequencies

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
TINY = dict(vocab_size=50, d_model=32, d_ff=40, n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=64,
            norm_eps=0.05, rope_theta=10000.0, tie_embeddings=True, rope_scaling=LLAMA3)
TOKENS = np.random.default_rng(0).integers(0, 50, (2, 34))


def np_llama3_freq(head_dim, theta, s):
  """Inverse RoPE frequencies, float64, with the Llama-3 scaling written from its definition."""
  f = theta ** (-np.arange(0, head_dim, 2) / head_dim)
  if s is None:
    return f
  lam = 2 * np.pi / f
  out = []
  for fi, li in zip(f, lam):
    if li < s["original_max_position_embeddings"] / s["high_freq_factor"]:
      out.append(fi)
    elif li > s["original_max_position_embeddings"] / s["low_freq_factor"]:
      out.append(fi / s["factor"])
    else:
      a = (s["original_max_position_embeddings"] / li - s["low_freq_factor"]) / (
          s["high_freq_factor"] - s["low_freq_factor"])
      out.append((1 - a) * fi / s["factor"] + a * fi)
  return np.array(out)


def random_model(cfg, seed):
  """A Llama of `cfg` built abstract (no initialisation: LOST's SVD init is slow eagerly) and filled with random
  draws: O(1) activations and logits, norm scales around 1, LOST channel sets random distinct sorted indices."""
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  flat = []
  for path, var in nnx.to_flat_state(state):
    shape = tuple(var.shape)
    if path[-1] == "idx":
      d_in = dict(q=cfg.d_model, k=cfg.d_model, v=cfg.d_model, o=cfg.d_model, gate=cfg.d_model, up=cfg.d_model,
                  down=cfg.d_ff)[path[-2]]
      value = np.sort(rng.choice(d_in, shape[-1], replace=False)).astype(np.int32)
    elif path[-1] == "scale":
      value = 1.0 + 0.2 * rng.normal(size=shape)
    else:
      value = rng.normal(size=shape) / np.sqrt(shape[0] if path[-1] in ("kernel", "a", "embedding") else shape[-1])
    flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _eff(layer):
  if hasattr(layer, "kernel"):
    return np.asarray(layer.kernel[...], np.float64)
  w = np.asarray(layer.a[...], np.float64) @ np.asarray(layer.b[...], np.float64)
  if not hasattr(layer, "w_sparse"):
    return w
  sparse = np.zeros_like(w)
  sparse[np.asarray(layer.idx[...])] = np.asarray(layer.w_sparse[...], np.float64)
  return layer.gamma * w + (1 - layer.gamma) * sparse


def np_forward(model, tokens):
  cfg = model.cfg
  h, kvh, hd = cfg.n_heads, cfg.kv_heads, cfg.d_model // cfg.n_heads
  rs = cfg.rope_scaling
  freq = np_llama3_freq(hd, cfg.rope_theta, None if rs.rope_type == "default" else {
      k: getattr(rs, k) for k in LLAMA3 if k != "rope_type"})
  rms = lambda x, s: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * s

  def rope(x):
    ang = np.arange(x.shape[1])[:, None] * freq[None]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

  emb = np.asarray(model.embed.embedding[...], np.float64)
  x = emb[tokens]
  b, s, d = x.shape
  causal = np.tril(np.ones((s, s), bool))
  for blk in model.layers:
    y = rms(x, np.asarray(blk.attn_norm.scale[...], np.float64))
    q = rope((y @ _eff(blk.attn.q)).reshape(b, s, h, hd))
    k = rope((y @ _eff(blk.attn.k)).reshape(b, s, kvh, hd))
    v = (y @ _eff(blk.attn.v)).reshape(b, s, kvh, hd)
    k, v = np.repeat(k, h // kvh, axis=2), np.repeat(v, h // kvh, axis=2)   # HF repeat_kv
    att = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    att = np.where(causal, att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    x = x + np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, d) @ _eff(blk.attn.o)
    y = rms(x, np.asarray(blk.mlp_norm.scale[...], np.float64))
    g = y @ _eff(blk.mlp.gate)
    x = x + (g / (1 + np.exp(-g)) * (y @ _eff(blk.mlp.up))) @ _eff(blk.mlp.down)
  x = rms(x, np.asarray(model.final_norm.scale[...], np.float64))
  return x @ (emb.T if cfg.tie_embeddings else np.asarray(model.lm_head.kernel[...], np.float64))


def _close(got, want):
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_llama3_frequencies_match_definition():
  from lostjax.models.config import RopeScaling
  for theta, hd in ((10000.0, 8), (500000.0, 64)):
    s = dict(LLAMA3, original_max_position_embeddings=64 if hd == 8 else 8192)
    want = np_llama3_freq(hd, theta, s)
    bands = 2 * np.pi / theta ** (-np.arange(0, hd, 2) / hd)
    assert (bands < 16).any() and (bands > 64).any() and ((bands >= 16) & (bands <= 64)).any() or hd == 64
    got = np.asarray(rope_frequencies(hd, theta, RopeScaling(**s)), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(rope_frequencies(8, 1e4, RopeScaling()), np.float64),
                             np_llama3_freq(8, 1e4, None), rtol=2e-6)


# dense GQA is also checked against transformers (tests/test_export_modern.py); the default run takes LOST K/V
@pytest.mark.parametrize("kind", ["lost", pytest.param("dense", marks=pytest.mark.slow),
                                  pytest.param("lowrank", marks=pytest.mark.slow)])
def test_gqa_tied_llama3_forward_and_cache_vs_numpy(kind):
  cfg = LlamaConfig(**TINY, attn_kind=kind, mlp_kind=kind, attn_rank=4, mlp_rank=4, sparsity=0.25, gamma=0.3)
  model = random_model(cfg, 1)
  assert model.layers[0].attn.k.d_out == model.layers[0].attn.v.d_out == 16 and not hasattr(model, "lm_head")
  want = np_forward(model, TOKENS)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens):
    m = nnx.merge(graphdef, state)
    if kind != "dense":   # the cache path does not depend on the projections' kind (and LOST decode compiles slowly)
      return m(tokens), None, None
    cache = m.init_cache(tokens.shape[0], tokens.shape[1])
    prefill, cache = m(tokens[:, :32], cache=cache)                 # chunk path
    steps = []
    for t in range(32, tokens.shape[1]):                              # one-token path
      out, cache = m(tokens[:, t:t + 1], cache=cache)
      steps.append(out)
    return m(tokens), jnp.concatenate([prefill] + steps, axis=1), cache

  full, cached, cache = run(state, jnp.asarray(TOKENS))
  _close(full, want)
  if kind == "dense":   # (also checked in the default run: tests/test_export_modern.py's greedy decoding)
    assert cache.k[0].shape == (2, 2, 34, 8)                          # only the KV heads are cached
    _close(cached, want)


def test_counts_and_flops_closed_form():
  from train import flops
  from train.summary import activation_values_per_token_layer
  v, d, ff, L, kv = 50, 32, 40, 2, 16
  tied = LlamaConfig(**TINY)
  untied = LlamaConfig(**dict(TINY, tie_embeddings=False, n_kv_heads=0))
  for cfg, kv_dim, head in ((tied, kv, 0), (untied, d, v * d)):
    counts = count_params(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    layer = 2 * d * d + 2 * d * kv_dim + 3 * d * ff + 2 * d
    assert counts["total"] == v * d + head + L * layer + d
    assert counts["lm_head"] == head and counts["embedding"] == v * d
    assert flops.matmul_params(cfg) == L * (2 * d * d + 2 * d * kv_dim + 3 * d * ff) + d * v   # head computed
    assert activation_values_per_token_layer(cfg) == 7 * d + 2 * kv_dim + 4 * ff
  lost = LlamaConfig(**TINY, attn_kind="lost", attn_rank=4, sparsity=0.25)
  k = math.floor(0.25 * d)
  assert flops.matmul_params(lost) == L * (2 * (4 * 2 * d + k * d) + 2 * (4 * (d + kv) + k * kv) + 3 * d * ff) + d * v


def test_config_validation_and_defaults():
  base = LlamaConfig()
  assert (base.n_kv_heads, base.kv_heads, base.tie_embeddings, base.rope_scaling.rope_type) == (0, 8, False,
                                                                                                "default")
  for bad, words in ((dict(n_kv_heads=3), "n_kv_heads=3"), (dict(n_kv_heads=-1), "n_kv_heads=-1"),
                     (dict(tie_embeddings=1), "tie_embeddings"),
                     (dict(rope_scaling=dict(rope_type="yarn")), "rope_type='yarn'"),
                     (dict(rope_scaling=dict(rope_type="llama3", factor=0.0)), "factor"),
                     (dict(rope_scaling=dict(rope_type="llama3", low_freq_factor=4.0, high_freq_factor=1.0)),
                      "high_freq_factor"),
                     (dict(rope_scaling=dict(scale=2.0)), "scale")):
    with pytest.raises(ValueError, match=words):
      LlamaConfig(**bad)
  # an older run's config.json (no new fields) reads as the model it trained
  from train.configs.base import base_config
  from train.state import llama_config
  from train.workdir import upgrade_config
  import ml_collections
  old = base_config().to_dict()
  for key in ("n_kv_heads", "tie_embeddings", "rope_scaling"):
    del old["model"][key]
  cfg = ml_collections.ConfigDict(upgrade_config(old))
  assert llama_config(cfg) == llama_config(base_config())


def test_gqa_kv_cache_attention_vs_numpy():
  """The decode attention over a cache of kv_heads heads (chunk/prefill path, then one-token path), eagerly on
  small arrays, against numpy causal attention with K/V repeated per query group (HF repeat_kv)."""
  from lostjax.models.llama import KVCache, _cached_attention
  rng = np.random.default_rng(5)
  b, h, kvh, hd, w = 2, 6, 2, 4, 8
  q, k, v = (rng.normal(size=(b, 5, n, hd)).astype(np.float32) for n in (h, kvh, kvh))
  zeros = jnp.zeros((b, kvh, w, hd), jnp.float32)
  cache = KVCache((zeros,), (zeros,), jnp.zeros((b,), jnp.int32), jnp.zeros((), jnp.int32))
  out1, cache = _cached_attention(jnp.asarray(q[:, :4]), jnp.asarray(k[:, :4]), jnp.asarray(v[:, :4]), cache, 0)
  assert cache.k[0].shape == (b, kvh, w, hd)
  cache = cache._replace(index=cache.index + 4)
  out2, _ = _cached_attention(jnp.asarray(q[:, 4:]), jnp.asarray(k[:, 4:]), jnp.asarray(v[:, 4:]), cache, 0)
  kr, vr = np.repeat(k, h // kvh, axis=2), np.repeat(v, h // kvh, axis=2)
  att = np.einsum("bqhd,bkhd->bhqk", q, kr) / np.sqrt(hd)
  att = np.where(np.tril(np.ones((5, 5), bool)), att, -np.inf)
  att = np.exp(att - att.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", att / att.sum(-1, keepdims=True), vr)
  np.testing.assert_allclose(np.concatenate([np.asarray(out1), np.asarray(out2)], 1), want, rtol=1e-5, atol=1e-5)
