"""LLaMA model configuration and the GaLore/LOST size presets."""

from __future__ import annotations

import dataclasses
import math

from lostjax.layers import KINDS
from lostjax.kernels.registry import canonical_name

# model.remat_policy names: the policies of jax.checkpoint_policies that take no arguments (what the forward pass
# of a rematerialised block keeps for the backward; everything else is recomputed).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable",
                  "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")

# name: (d_model, d_ff, n_heads, n_layers, default rank for low-rank/LOST layers)
# 60M…1B are the GaLore/LOST C4 shapes (configs/llama_*.json, vocab 32000); 7B is LLaMA-7B. The tiny presets are
# for tests and CPU runs.
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 176, 4, 2, 16),
    "small": (256, 688, 4, 4, 64),
    "20m": (384, 1024, 6, 6, 96),
    "60m": (512, 1376, 8, 8, 128),
    "130m": (768, 2048, 12, 12, 256),
    "350m": (1024, 2736, 16, 24, 256),
    "1b": (2048, 5461, 32, 24, 512),
    "7b": (4096, 11008, 32, 32, 1024),
}


ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (`model.rope_scaling`). rope_type 'default': plain RoPE, the other fields unused.

  'llama3' (the Llama 3.1 / 3.2 long-context scaling, as Hugging Face transformers' `rope_type: llama3`): with
  L = original_max_position_embeddings and each frequency f_i = θ^(-2i/head_dim) of wavelength λ_i = 2π / f_i,
    λ_i < L / high_freq_factor:  f_i unchanged;
    λ_i > L / low_freq_factor:   f_i / factor;
    otherwise:                   (1 − a) · f_i / factor + a · f_i,   a = (L / λ_i − low_freq_factor) /
                                                                          (high_freq_factor − low_freq_factor).
  """
  rope_type: str = "default"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"model.rope_scaling.rope_type={self.rope_type!r}; expected one of {ROPE_TYPES}")
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"model.rope_scaling.{name} must be a finite float > 0, got {v!r}")
      object.__setattr__(self, name, float(v))
    v = self.original_max_position_embeddings
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise ValueError(f"model.rope_scaling.original_max_position_embeddings must be a positive int, got {v!r}")
    if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(f"model.rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                       f"low_freq_factor={self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  d_model: int = 512
  d_ff: int = 1376
  n_heads: int = 8
  n_layers: int = 8
  # Grouped-query attention ("GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
  # Checkpoints", arXiv 2305.13245): n_kv_heads key/value heads, each shared by n_heads / n_kv_heads query heads
  # (query head i reads key/value head i // (n_heads / n_kv_heads), as Hugging Face's repeat_kv). 0 = n_heads
  # (multi-head attention).
  n_kv_heads: int = 0
  # The LM head is the transposed token embedding (logits = x Eᵀ; one [vocab, d_model] matrix, no lm_head Param).
  tie_embeddings: bool = False
  max_seq_len: int = 1024
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()   # see RopeScaling; rope_type 'default' = plain RoPE
  norm_eps: float = 1e-6
  init_std: float = 0.02
  # Linear kind per projection group ('dense' | 'lowrank' | 'lost') and its rank.
  attn_kind: str = "dense"
  mlp_kind: str = "dense"
  attn_rank: int = 128
  mlp_rank: int = 128
  # LOST / low-rank options, shared by all non-dense projections.
  sparsity: float = 0.05
  gamma: float = 0.5
  lowrank_act: str = "identity"
  lowrank_init: str = "svd"
  lost_score: str = "l2"
  lost_residual_rank: int = 0      # 0: all remaining singular components
  lost_sparse_values: str = "original"
  # LOST sparse branch: a name of the sparse-path registry (lostjax.kernels.registry, docs/sparse_paths.md):
  # 'auto' | 'gather_xla' | 'gather_onehot_grad' | 'fused_concat' | 'fused_onehot' | 'pallas_gpu' | 'pallas_tpu'.
  # 'auto' is resolved per backend there (CPU: fused_concat; GPU, TPU: gather_xla). Names written by older runs
  # ('xla', 'xla_onehot', 'pallas', 'fused') are legacy aliases that build the same model.
  sparse_impl: str = "auto"
  # q/k/v and gate/up read the same input: compute them together (lostjax.layers.group: one GEMM for dense
  # kernels and for the low-rank down-projections, one gather for LOST channel sets). Same parameters either way.
  fuse_projections: bool = True
  # LOST MLP (mlp_kind='lost', no experts): permute the d_ff channels once at init so that down's sparse channels
  # are the first k (lostjax.layers.lost.move_sparse_channels_first; gate/up output columns permuted to match).
  # The same function and initial values up to that order; down's gather becomes a slice.
  lost_contiguous_down: bool = False
  # Numerics: parameters in param_dtype, matmuls in dtype (bf16 compute with float32 master weights).
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Rematerialisation of each decoder block in the backward pass (jax.checkpoint); remat_policy names what the
  # forward keeps (REMAT_POLICIES, from jax.checkpoint_policies): 'nothing_saveable' keeps only each block's input.
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention_impl: str = "xla"     # passed to jax.nn.dot_product_attention ('xla' | 'cudnn' | None = auto)
  # Mixture of experts (lostjax.models.moe; docs/moe_pathways.md). 0 experts = the dense SwiGLU MLP. Otherwise each
  # block's MLP is `moe_experts` SwiGLU experts of width d_ff (linear kind mlp_kind), top-k routed per token.
  # capacity_factor 0 = dropless; > 0: each expert takes at most ceil(cf * tokens * top_k / experts) assignments.
  # aux_weight scales the Switch/GShard load-balancing loss (mean over layers) returned by Llama(return_aux=True).
  moe_experts: int = 0
  moe_top_k: int = 2
  moe_capacity_factor: float = 0.0
  moe_aux_weight: float = 0.01

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_ff", "n_heads", "n_layers", "max_seq_len"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"model.{name} must be a positive int, got {v!r}")
    if self.d_model % self.n_heads:
      raise ValueError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
    kv = self.n_kv_heads
    if isinstance(kv, bool) or not isinstance(kv, int) or kv < 0 or (kv and self.n_heads % kv):
      raise ValueError(f"model.n_kv_heads={kv!r} must be 0 (= n_heads) or a positive divisor of "
                       f"model.n_heads={self.n_heads}")
    if not isinstance(self.tie_embeddings, bool):
      raise ValueError(f"model.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
    if isinstance(self.rope_scaling, dict):   # from a run config (ConfigDict.to_dict / config.json)
      unknown = set(self.rope_scaling) - {f.name for f in dataclasses.fields(RopeScaling)}
      if unknown:
        raise ValueError(f"unknown model.rope_scaling field(s) {sorted(unknown)}")
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    elif not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"model.rope_scaling must be a dict of RopeScaling fields, got {self.rope_scaling!r}")
    if (self.d_model // self.n_heads) % 2:
      raise ValueError(f"head dim {self.d_model // self.n_heads} must be even for rotary embeddings")
    for name in ("attn_kind", "mlp_kind"):
      if getattr(self, name) not in KINDS:
        raise ValueError(f"unknown linear kind model.{name}={getattr(self, name)!r}; expected one of {KINDS}")
    if not isinstance(self.remat, bool):
      raise ValueError(f"model.remat must be a bool, got {self.remat!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown model.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
    if not isinstance(self.fuse_projections, bool):
      raise ValueError(f"model.fuse_projections must be a bool, got {self.fuse_projections!r}")
    if not isinstance(self.lost_contiguous_down, bool):
      raise ValueError(f"model.lost_contiguous_down must be a bool, got {self.lost_contiguous_down!r}")
    if self.lost_contiguous_down and (self.mlp_kind != "lost" or self.moe_experts):
      raise ValueError(f"model.lost_contiguous_down=True needs the dense-MLP LOST model (mlp_kind='lost', "
                       f"moe_experts=0), got mlp_kind={self.mlp_kind!r}, moe_experts={self.moe_experts}")
    try:  # a legacy name (config.json of an older run) is stored as its registry name: the same model
      object.__setattr__(self, "sparse_impl", canonical_name(self.sparse_impl))
      # (no backend query here: building a config must not start JAX, e.g. before jax.distributed.initialize;
      # the backend check runs when a layer is built)
    except ValueError as e:
      raise ValueError(f"model.sparse_impl: {e}") from None
    for name in ("moe_experts", "moe_top_k"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "moe_experts" else 1):
        raise ValueError(f"model.{name} must be a {'non-negative' if name == 'moe_experts' else 'positive'} int, "
                         f"got {v!r}")
    if self.moe_experts and self.moe_top_k > self.moe_experts:
      raise ValueError(f"model.moe_top_k={self.moe_top_k} exceeds model.moe_experts={self.moe_experts}")
    for name in ("moe_capacity_factor", "moe_aux_weight"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"model.{name} must be a finite float >= 0, got {v!r}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def kv_heads(self) -> int:
    """Key/value heads (n_kv_heads, or n_heads when 0)."""
    return self.n_kv_heads or self.n_heads

  @property
  def kv_dim(self) -> int:
    """Width of the K and V projections: kv_heads · head_dim."""
    return self.kv_heads * self.head_dim


def preset(name: str, **overrides) -> LlamaConfig:
  """A LlamaConfig for a named size ('tiny', 'small', '20m', '60m', '130m', '350m', '1b', '7b')."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
  d, ff, h, n, r = PRESETS[name]
  base = dict(d_model=d, d_ff=ff, n_heads=h, n_layers=n, attn_rank=r, mlp_rank=r)
  if name in ("tiny", "small"):
    base["vocab_size"] = 256 + 1  # byte tokenizer + EOS
  base.update(overrides)
  return LlamaConfig(**base)
