"""LLaMA decoder (RMSNorm, rotary embeddings, SwiGLU MLP, causal attention, untied embedding/LM head) in Flax NNX.

Every attention projection (q, k, v, o) and MLP projection (gate, up, down) is a linear layer of the kind chosen
per group in `LlamaConfig` (dense, low-rank or LOST); the embedding and the LM head stay dense. Parameters carry
logical axis names (vocab, embed, heads, mlp, rank, sparse) as `out_sharding` metadata, which
`lostjax.sharding` maps onto a device mesh without touching this file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lostjax.layers import common, make_linear
from lostjax.layers.group import grouped_call
from lostjax.models.config import LlamaConfig


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.eps = eps
    self.scale = common.param(jnp.ones((dim,), param_dtype), ("embed",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (RoFormer, arXiv 2104.09864) in the LLaMA/HF 'rotate half' layout.

  x: [batch, seq, heads, head_dim]; positions: [batch, seq].
  """
  half = x.shape[-1] // 2
  freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions[..., None].astype(jnp.float32) * freq           # [b, s, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _linear(cfg: LlamaConfig, group: str, d_in: int, d_out: int, axes, rngs):
  kind = cfg.attn_kind if group == "attn" else cfg.mlp_kind
  rank = cfg.attn_rank if group == "attn" else cfg.mlp_rank
  return make_linear(kind, d_in, d_out, rngs=rngs, axes=axes, rank=rank, sparsity=cfg.sparsity,
                     gamma=cfg.gamma, activation=cfg.lowrank_act, init_std=cfg.init_std,
                     lowrank_init=cfg.lowrank_init, score=cfg.lost_score,
                     residual_rank=cfg.lost_residual_rank or None, sparse_values=cfg.lost_sparse_values,
                     sparse_impl=cfg.sparse_impl, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def _project(cfg: LlamaConfig, layers, x):
  """The projections reading x: together (one GEMM / one gather for the shared work) or one by one."""
  if cfg.fuse_projections:
    return grouped_call(layers, x)
  return tuple(layer(x) for layer in layers)


class Attention(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d = cfg.d_model
    self.cfg = cfg
    self.q = _linear(cfg, "attn", d, d, ("embed", "heads"), rngs)
    self.k = _linear(cfg, "attn", d, d, ("embed", "heads"), rngs)
    self.v = _linear(cfg, "attn", d, d, ("embed", "heads"), rngs)
    self.o = _linear(cfg, "attn", d, d, ("heads", "embed"), rngs)

  def __call__(self, x, positions):
    b, s, _ = x.shape
    h, hd = self.cfg.n_heads, self.cfg.head_dim
    q, k, v = _project(self.cfg, (self.q, self.k, self.v), x)
    q = rotary(q.reshape(b, s, h, hd), positions, self.cfg.rope_theta)
    k = rotary(k.reshape(b, s, h, hd), positions, self.cfg.rope_theta)
    v = v.reshape(b, s, h, hd)
    impl = self.cfg.attention_impl
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    return self.o(out.reshape(b, s, h * hd))


class Mlp(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.gate = _linear(cfg, "mlp", cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
    self.up = _linear(cfg, "mlp", cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
    self.down = _linear(cfg, "mlp", cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs)

  def __call__(self, x):
    gate, up = _project(self.cfg, (self.gate, self.up), x)
    return self.down(jax.nn.silu(gate) * up)


class Block(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    pdt = common.resolve_dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    self.mlp = Mlp(cfg, rngs)

  def __call__(self, x, positions):
    x = x + self.attn(self.attn_norm(x), positions)
    return x + self.mlp(self.mlp_norm(x))


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, init_std: float, param_dtype, rngs: nnx.Rngs):
    w = init_std * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)
    self.embedding = common.param(w.astype(param_dtype), ("vocab", "embed"))

  def __call__(self, tokens):
    return jnp.take(self.embedding[...], tokens, axis=0)


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
    self.lm_head = make_linear("dense", cfg.d_model, cfg.vocab_size, rngs=rngs, axes=("embed", "vocab"),
                               init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if tokens.shape[1] > self.cfg.max_seq_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed(tokens).astype(self.dtype)
    for block in self.layers:
      if self.cfg.remat:
        x = nnx.remat(lambda blk, y: blk(y, positions))(block, x)
      else:
        x = block(x, positions)
    x = self.final_norm(x)
    return self.lm_head(x).astype(jnp.float32)
