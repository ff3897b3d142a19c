"""LLaMA decoder (RMSNorm, rotary embeddings, SwiGLU MLP, causal attention, embedding/LM head) in Flax NNX.

Every attention projection (q, k, v, o) and MLP projection (gate, up, down) is a linear layer of the kind chosen
per group in `LlamaConfig` (dense, low-rank or LOST); the embedding and the LM head stay dense. The options of
the later LLaMA-family checkpoints are each off by default: grouped-query attention (`n_kv_heads`; K/V
projections of kv_heads · head_dim columns, a KV cache of kv_heads heads), tied embeddings (`tie_embeddings`: the
head is Eᵀ) and the Llama-3 RoPE frequency scaling (`rope_scaling`, see `rope_frequencies`). Parameters carry
logical axis names (vocab, embed, heads, mlp, rank, sparse) as `out_sharding` metadata, which
`lostjax.sharding` maps onto a device mesh without touching this file.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lostjax import remat, sharding
from lostjax.layers import common, make_linear
from lostjax.models.config import LlamaConfig
from lostjax.models.mlp import Mlp, linear as _linear, project as _project
from lostjax.models.moe import MoeMlp, Routing, reduce_aux


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.eps = eps
    self.scale = common.param(jnp.ones((dim,), param_dtype), ("embed",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # the scale is read gathered (ZeRO-3), like every weight: its features must meet the activation's whole
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> jax.Array:
  """The rotary inverse frequencies f_i = θ^(-2i/head_dim), i < head_dim/2, float32 (the Hugging Face formula and
  float32 arithmetic), with the Llama-3 scaling of `scaling` (a `RopeScaling`) applied when its rope_type is
  'llama3' (formula in `lostjax.models.config.RopeScaling`)."""
  half = head_dim // 2
  freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  if scaling is None or scaling.rope_type == "default":
    return freq
  factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
  old_len = scaling.original_max_position_embeddings
  wavelen = 2 * jnp.pi / freq
  scaled = jnp.where(wavelen > old_len / low, freq / factor, freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled)


def rotary(x: jax.Array, positions: jax.Array, theta: float, scaling=None) -> jax.Array:
  """Rotary position embedding (RoFormer, arXiv 2104.09864) in the LLaMA/HF 'rotate half' layout.

  x: [batch, seq, heads, head_dim]; positions: [batch, seq]; scaling: a `RopeScaling` (None: plain RoPE).
  """
  half = x.shape[-1] // 2
  freq = rope_frequencies(x.shape[-1], theta, scaling)
  angles = positions[..., None].astype(jnp.float32) * freq           # [b, s, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class KVCache(NamedTuple):
  """Static-shape key/value cache for incremental decoding (`Llama.init_cache`, `Llama.__call__(..., cache=)`).

  A ring buffer of W slots per row: the token of time t (0-based over the left-padded sequence, the same for
  every row) is stored at slot t mod W. A query at time t attends to the keys of times t' with
  max(start, t - W + 1) <= t' <= t, so while t < W this is exact causal attention, and beyond it a sliding
  window of W tokens (RoPE positions keep their true values; only differences < W are ever seen).
  Keys and values are preallocated, one [batch, kv_heads, W, head_dim] buffer per layer (with grouped-query
  attention only the model.n_kv_heads key/value heads are stored): XLA updates separate
  buffers in place inside the decode loop, while one stacked [layers, ...] array was copied whole every step
  (measured on CPU: 15x slower at batch 8), and the heads-major layout needs no transpose for the one-token
  attention (8x faster per layer than the [batch, W, heads, head_dim] layout through dot_product_attention).
  """
  k: tuple           # n_layers x [batch, kv_heads, W, head_dim], rotary already applied
  v: tuple           # n_layers x [batch, kv_heads, W, head_dim]
  start: jax.Array   # [batch] int32: first real (non-padding) time of each row (its left-padding length)
  index: jax.Array   # [] int32: the time of the next token to be written


def _cached_attention(q, k, v, cache: KVCache, layer: int):
  """Attention of the new tokens (times index..index+s-1) over the cached window plus themselves.

  q: [b, s, h, hd]; k, v: [b, s, kv_heads, hd] (query head i reads key/value head i // (h / kv_heads)).
  Returns (out [b, s, h, hd], cache with this layer's new keys/values written into the ring).
  """
  s = q.shape[1]
  ck, cv = cache.k[layer], cache.v[layer]
  width = ck.shape[2]
  if s > width:
    raise ValueError(f"{s} new tokens do not fit a KV cache of {width} slots")
  if s == 1:  # one decode step: write first (the slot overwritten holds time t - W, outside the window)
    t = cache.index
    slot = jnp.mod(t, width)
    ck = jax.lax.dynamic_update_slice(ck, jnp.swapaxes(k, 1, 2).astype(ck.dtype), (0, 0, slot, 0))
    cv = jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v, 1, 2).astype(cv.dtype), (0, 0, slot, 0))
    key_t = t - jnp.mod(t - jnp.arange(width), width)                                # time held by each slot
    mask = (key_t >= cache.start[:, None, None]) | (key_t == t)                      # [b, 1, W]; own slot valid
    b, h, kvh, hd = q.shape[0], q.shape[2], ck.shape[1], q.shape[3]
    qg = q[:, 0].reshape(b, kvh, h // kvh, hd)                                       # query heads by KV head
    scores = jnp.einsum("bkgd,bkwd->bkgw", qg, ck.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None], scores * hd ** -0.5, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgw,bkwd->bkgd", probs.astype(q.dtype), cv.astype(q.dtype),
                     preferred_element_type=jnp.float32).reshape(b, 1, h, hd).astype(q.dtype)
  else:       # a chunk (prefill): the old window plus the chunk, so no query loses a key the chunk overwrites
    times_old = cache.index - 1 - jnp.mod(cache.index - 1 - jnp.arange(width), width)
    times_new = cache.index + jnp.arange(s)
    key_t = jnp.concatenate([times_old, times_new])                                  # [W + s]
    q_t = times_new[:, None]                                                         # [s, 1]
    mask = (key_t <= q_t) & (key_t > q_t - width)
    mask = mask[None] & ((key_t >= cache.start[:, None, None]) | (key_t == q_t)[None])  # padding sees itself
    keys = jnp.concatenate([jnp.swapaxes(ck, 1, 2).astype(q.dtype), k], axis=1)
    values = jnp.concatenate([jnp.swapaxes(cv, 1, 2).astype(q.dtype), v], axis=1)
    out = jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None], implementation="xla")
    slots = jnp.mod(times_new, width)
    ck = ck.at[:, :, slots].set(jnp.swapaxes(k, 1, 2).astype(ck.dtype))
    cv = cv.at[:, :, slots].set(jnp.swapaxes(v, 1, 2).astype(cv.dtype))
  replace = lambda buffers, new: buffers[:layer] + (new,) + buffers[layer + 1:]
  return out, cache._replace(k=replace(cache.k, ck), v=replace(cache.v, cv))


def _constrain_heads(x):
  """[batch, seq, heads, head_dim] activations: rows over the batch axes, heads over `tensor` (Megatron)."""
  return sharding.constrain(x, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))


def _constrain_embed(x):
  """[batch, seq, d_model] activations (the residual stream): rows over the batch axes, features whole."""
  return sharding.constrain_tokens(x, "activation_embed")


class Attention(nnx.Module):
  """Causal self-attention; with model.n_kv_heads < n_heads grouped-query attention (K/V of kv_dim columns)."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d = cfg.d_model
    self.cfg = cfg
    self.q = _linear(cfg, "attn", d, d, ("embed", "heads"), rngs)
    self.k = _linear(cfg, "attn", d, cfg.kv_dim, ("embed", "heads"), rngs)
    self.v = _linear(cfg, "attn", d, cfg.kv_dim, ("embed", "heads"), rngs)
    self.o = _linear(cfg, "attn", d, d, ("heads", "embed"), rngs)

  def _qkv(self, x):
    if self.cfg.kv_heads == self.cfg.n_heads or self.cfg.attn_kind != "dense":
      return _project(self.cfg, (self.q, self.k, self.v), x)
    # dense GQA: the stacked GEMM needs equal widths, so K and V (kv_dim wide) are computed together, Q alone
    return (self.q(x), *_project(self.cfg, (self.k, self.v), x))

  def __call__(self, x, positions, cache: KVCache | None = None, layer: int = 0):
    b, s, _ = x.shape
    h, kvh, hd = self.cfg.n_heads, self.cfg.kv_heads, self.cfg.head_dim
    q, k, v = self._qkv(x)
    q = _constrain_heads(rotary(q.reshape(b, s, h, hd), positions, self.cfg.rope_theta, self.cfg.rope_scaling))
    k = _constrain_heads(rotary(k.reshape(b, s, kvh, hd), positions, self.cfg.rope_theta, self.cfg.rope_scaling))
    v = _constrain_heads(v.reshape(b, s, kvh, hd))
    if cache is not None:  # decoding: (output, cache with this layer's keys/values added)
      out, cache = _cached_attention(q, k, v, cache, layer)
      return self.o(out.reshape(b, s, h * hd)), cache
    impl = self.cfg.attention_impl
    out = _constrain_heads(jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl))
    return self.o(out.reshape(b, s, h * hd))


class Block(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    pdt = common.resolve_dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    self.mlp = Mlp(cfg, rngs) if cfg.moe_experts == 0 else MoeMlp(cfg, rngs)

  def _mlp(self, h):
    """(MLP output, aux dict): the routed experts also return their routing and aux values, the dense MLP {}."""
    if isinstance(self.mlp, MoeMlp):
      return self.mlp(h)
    return self.mlp(h), {}

  def __call__(self, x, positions, cache: KVCache | None = None, layer: int = 0, *, return_aux: bool = False):
    if cache is not None:  # decoding (Llama.__call__ with a cache): also returns the updated cache
      h, cache = self.attn(self.attn_norm(x), positions, cache, layer)
      x = x + h
      return x + self._mlp(self.mlp_norm(x))[0], cache
    x = _constrain_embed(x + self.attn(self.attn_norm(x), positions))
    y, aux = self._mlp(self.mlp_norm(x))
    x = _constrain_embed(x + y)
    return (x, aux) if return_aux else x


def remat_block(block: Block, x: jax.Array, positions: jax.Array, policy: str = "nothing_saveable"):
  """block(x, positions, return_aux=True) under `jax.checkpoint` with the named `jax.checkpoint_policies` policy,
  its recomputation ordered after the block's cotangent (`lostjax.remat.checkpoint`).

  The block's variables go in as a plain state pytree and the block is rebuilt inside the checkpointed function,
  so nothing created outside the checkpoint's trace is written from inside it (the LOST channel indices, a
  non-trainable `SparseIndex`, are an input like the parameters; a forward pass changes no variable).
  """
  graphdef, state = nnx.split(block)

  def run(state, x, positions):
    return nnx.merge(graphdef, state)(x, positions, return_aux=True)

  return remat.checkpoint(run, getattr(jax.checkpoint_policies, policy))(state, x, positions)


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, init_std: float, param_dtype, rngs: nnx.Rngs):
    w = init_std * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)
    self.embedding = common.param(w.astype(param_dtype), ("vocab", "embed"))

  def __call__(self, tokens):
    return sharding.sharded_lookup(self.embedding, tokens)


class Llama(nnx.Module):
  """tokens [batch, seq] int32 -> logits [batch, seq, vocab] (float32)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = common.resolve_dtype(cfg.param_dtype)
    self.dtype = common.resolve_dtype(cfg.dtype)
    # Parameters carry logical names only: lostjax.sharding applies the mesh placement (jit out_shardings).
    self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, param_dtype=pdt, rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    if not cfg.tie_embeddings:   # tied: the head is the embedding (see `head`), no lm_head Param
      self.lm_head = make_linear("dense", cfg.d_model, cfg.vocab_size, rngs=rngs, axes=("embed", "vocab"),
                                 init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

  def head(self, x: jax.Array) -> jax.Array:
    """float32 logits of the final-normed hidden states: x W_head, or x Eᵀ with model.tie_embeddings."""
    if self.cfg.tie_embeddings:
      dt = self.dtype
      return sharding.gathered_call(lambda w, x: common.matmul(x.astype(dt), w.astype(dt).T), (self.embed.embedding,),
                                    x).astype(jnp.float32)
    return self.lm_head(x).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *, cache: KVCache | None = None,
               return_aux: bool = False):
    """Logits [batch, seq, vocab]; with a `cache` (from `init_cache`): (logits, updated cache), see `decode`.

    return_aux=True: (logits, aux), aux = {} for a dense MLP, else float32 scalars `moe_aux_loss` (already times
    model.moe_aux_weight; mean over layers) and `moe_dropped_frac` (lostjax.models.moe.reduce_aux).
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if cache is not None:
      return self.decode(tokens, cache, positions)
    if tokens.shape[1] > self.cfg.max_seq_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = _constrain_embed(self.embed(tokens).astype(self.dtype))
    aux = []
    for block in self.layers:
      if self.cfg.remat:
        x, a = remat_block(block, x, positions, self.cfg.remat_policy)
      else:
        x, a = block(x, positions, return_aux=True)
      aux.append(a)
    x = self.final_norm(x)
    logits = sharding.constrain_tokens(self.head(x), "activation_vocab")
    return (logits, reduce_aux(self.cfg, aux)) if return_aux else logits

  def route(self, tokens: jax.Array, positions: jax.Array | None = None) -> Routing:
    """The routing of every token at every layer (MoE models): `Routing(ids, gates, probs)` with expert ids
    (int32) and renormalised gates [layers, batch, seq, top_k] and router probabilities [layers, batch, seq, E]."""
    if not self.cfg.moe_experts:
      raise ValueError("Llama.route needs a mixture-of-experts model (model.moe_experts > 0), got moe_experts=0")
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed(tokens).astype(self.dtype)
    per_layer = []
    for block in self.layers:
      x, a = block(x, positions, return_aux=True)
      per_layer.append(a)
    return Routing(*(jnp.stack([a[k] for a in per_layer]) for k in ("expert_ids", "expert_gates", "router_probs")))

  def init_cache(self, batch: int, length: int, start: jax.Array | None = None, dtype=None) -> KVCache:
    """An empty KVCache of `length` slots per row (a ring buffer: see `KVCache`).

    start: [batch] int32, the number of left-padding tokens of each row (default 0); dtype: the cache's dtype
    (default: the model's compute dtype).
    """
    if not isinstance(length, int) or length <= 0:
      raise ValueError(f"cache length must be a positive int, got {length!r}")
    shape = (batch, self.cfg.kv_heads, length, self.cfg.head_dim)
    dt = self.dtype if dtype is None else common.resolve_dtype(dtype)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32).reshape(batch)
    zeros = lambda: tuple(jnp.zeros(shape, dt) for _ in range(self.cfg.n_layers))
    return KVCache(zeros(), zeros(), start, jnp.zeros((), jnp.int32))

  def decode(self, tokens: jax.Array, cache: KVCache, positions: jax.Array | None = None):
    """tokens [batch, s] at times cache.index .. cache.index+s-1 -> (logits [batch, s, vocab], new cache).

    The prompt is fed once (prefill, left-padded: row b's real tokens start at time cache.start[b]), then one
    token per call. Default RoPE positions are time - start (each row counts from its first real token).
    """
    s = tokens.shape[1]
    if positions is None:
      times = cache.index + jnp.arange(s, dtype=jnp.int32)
      positions = jnp.maximum(times[None, :] - cache.start[:, None], 0)
    x = self.embed(tokens).astype(self.dtype)
    for i, block in enumerate(self.layers):
      x, cache = block(x, positions, cache=cache, layer=i)
    x = self.final_norm(x)
    return self.head(x), cache._replace(index=cache.index + s)
