"""Independent checks of the LLaMA forward (lostjax.models.Llama), random weights copied into each oracle:

* a float64 numpy transcription of the decoder written here from the LLaMA definition (RMSNorm, rotate-half
  RoPE, causal softmax attention with 1/√d_head scaling, SwiGLU MLP, untied LM head);
* Hugging Face `transformers.LlamaForCausalLM` (CPU, float32, eager attention), when installed (`oracles` extra);
* a LOST model against the same numpy decoder fed with W_eff = γ·A·B + (1−γ)·scatter_rows(I, W_s) per projection
  (LOST, arXiv 2508.02668; identity activation between the factors).
Logits must agree within 1e-4 relative to the logits' scale. A large RMSNorm eps (0.05) makes its placement visible.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lostjax.models import Llama, LlamaConfig

TINY = dict(vocab_size=50, d_model=16, d_ff=40, n_heads=2, n_layers=2, max_seq_len=32, norm_eps=0.05,
            rope_theta=10000.0)
TOKENS = np.random.default_rng(0).integers(0, 50, (2, 7))
PROJ = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


def _randomize(model, seed):
  """Replaces every parameter by a random draw (O(1) activations and logits); norm scales around 1."""
  rng = np.random.default_rng(seed)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  for path, var in nnx.to_flat_state(params):
    shape = var[...].shape
    if path[-1] == "scale":
      value = 1.0 + 0.2 * rng.normal(size=shape)
    else:
      value = rng.normal(size=shape) / np.sqrt(shape[0] if path[-1] in ("kernel", "a") else shape[-1])
    var[...] = jnp.asarray(value, jnp.float32)
  nnx.update(model, params)
  return model


def _np(x):
  return np.asarray(x, np.float64)


def dense_weights(model):
  """Per layer: {name: kernel [d_in, d_out] float64}, the effective dense matrix of every projection."""
  def eff(layer):
    if hasattr(layer, "kernel"):
      return _np(layer.kernel[...])
    w = _np(layer.a[...]) @ _np(layer.b[...])
    if not hasattr(layer, "w_sparse"):
      return w
    g = layer.gamma
    sparse = np.zeros_like(w)
    sparse[np.asarray(layer.idx[...])] = _np(layer.w_sparse[...])   # scatter_rows(I, W_s)
    return g * w + (1 - g) * sparse
  layers = []
  for blk in model.layers:
    w = {n: eff(getattr(blk.attn, n)) for n in PROJ["attn"]}
    w.update({n: eff(getattr(blk.mlp, n)) for n in PROJ["mlp"]})
    w["attn_norm"], w["mlp_norm"] = _np(blk.attn_norm.scale[...]), _np(blk.mlp_norm.scale[...])
    layers.append(w)
  return dict(embed=_np(model.embed.embedding[...]), layers=layers, final_norm=_np(model.final_norm.scale[...]),
              lm_head=_np(model.lm_head.kernel[...]))


def np_llama(w, tokens, cfg):
  """float64 numpy LLaMA decoder."""
  h, hd, eps = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.norm_eps

  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale

  def rope(x):   # x [b, s, h, hd]; pairs (i, i + hd/2) rotated by pos * theta^(-2i/hd)
    half = hd // 2
    freq = cfg.rope_theta ** (-np.arange(half) * 2.0 / hd)
    ang = np.arange(x.shape[1])[:, None] * freq[None, :]           # [s, half]
    cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

  x = w["embed"][tokens]
  b, s, d = x.shape
  causal = np.tril(np.ones((s, s), bool))
  for lw in w["layers"]:
    y = rms(x, lw["attn_norm"])
    q, k, v = (rope((y @ lw[n]).reshape(b, s, h, hd)) if n != "v" else (y @ lw[n]).reshape(b, s, h, hd)
               for n in ("q", "k", "v"))
    att = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    att = np.where(causal[None, None], att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    x = x + np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, d) @ lw["o"]
    y = rms(x, lw["mlp_norm"])
    gate = y @ lw["gate"]
    x = x + (gate / (1 + np.exp(-gate)) * (y @ lw["up"])) @ lw["down"]
  return rms(x, w["final_norm"]) @ w["lm_head"]


def hf_llama(w, tokens, cfg):
  """The same weights in transformers.LlamaForCausalLM (float32, CPU); torch Linear weights are [d_out, d_in]."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hc = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                                num_hidden_layers=cfg.n_layers, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                                max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False,
                                attention_bias=False, mlp_bias=False, hidden_act="silu")
  hc._attn_implementation = "eager"
  model = transformers.LlamaForCausalLM(hc).eval()
  t = lambda a: torch.tensor(np.asarray(a, np.float32))
  sd = {"model.embed_tokens.weight": t(w["embed"]), "model.norm.weight": t(w["final_norm"]),
        "lm_head.weight": t(w["lm_head"].T)}
  names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
  for i, lw in enumerate(w["layers"]):
    sd.update({f"model.layers.{i}.{hf}.weight": t(lw[n].T) for n, hf in names.items()})
    sd[f"model.layers.{i}.input_layernorm.weight"] = t(lw["attn_norm"])
    sd[f"model.layers.{i}.post_attention_layernorm.weight"] = t(lw["mlp_norm"])
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.double().numpy()


def _close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.abs(want).max() > 1.0   # logits of order one: the relative bound is meaningful
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_dense_llama_vs_numpy_and_transformers():
  cfg = LlamaConfig(**TINY)
  model = _randomize(Llama(cfg, rngs=nnx.Rngs(0)), 1)
  got = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(TOKENS)))
  w = dense_weights(model)
  want = np_llama(w, TOKENS, cfg)
  hf = hf_llama(w, TOKENS, cfg)
  _close(got, want)
  _close(hf, want)   # the numpy transcription itself agrees with Hugging Face
  _close(got, hf)
  # causality: changing the last token leaves the logits of earlier positions unchanged
  tok2 = TOKENS.copy()
  tok2[:, -1] = (tok2[:, -1] + 1) % cfg.vocab_size
  np.testing.assert_allclose(np_llama(w, tok2, cfg)[:, :-1], want[:, :-1], rtol=1e-12)


@pytest.mark.parametrize("sparse_impl", ["auto", pytest.param("xla", marks=pytest.mark.slow)])
def test_lost_llama_vs_numpy_w_eff(sparse_impl):
  cfg = LlamaConfig(**TINY, attn_kind="lost", mlp_kind="lost", attn_rank=4, mlp_rank=4, sparsity=0.25, gamma=0.3,
                    sparse_impl=sparse_impl)
  model = _randomize(Llama(cfg, rngs=nnx.Rngs(2)), 3)
  q = model.layers[0].attn.q
  assert q.k == 4 and q.gamma == 0.3 and len(set(np.asarray(q.idx[...]).tolist())) == 4
  got = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(TOKENS)))
  w = dense_weights(model)
  want = np_llama(w, TOKENS, cfg)
  _close(got, want)
  _close(got, hf_llama(w, TOKENS, cfg))   # W_eff loaded as dense weights into the reference implementation
