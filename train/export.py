"""Export a run to a Hugging Face `LlamaForCausalLM` (or, for a mixture of experts, `MixtralForCausalLM`) folder,
or import one as a lostjax run directory.

    python -m train.export --workdir=runs/quick --out=hf/quick [--overwrite] [--step=N]
    python -m train.export --from_hf=hf/quick --workdir=runs/imported [--method=dense|lost --rank=64
        --sparsity=0.05 --gamma=0.5] [--config=train/configs/llama.py:60m,dense --config.train.steps=...]

Weights (LLaMA, "LLaMA: Open and Efficient Foundation Language Models", arXiv 2302.13971; HF layout): lostjax
kernels are [d_in, d_out] (y = x W), HF `nn.Linear` weights are [d_out, d_in], so every projection is
transposed; embedding, norms and the rotary convention ('rotate half', inv_freq = θ^(-2i/head_dim)) are the same.
Low-rank and LOST layers are merged into the dense matrix they compute:
  low-rank:  W = A·B                                           (exact only when σ is the identity)
  LOST:      W = γ·A·B + (1−γ)·scatter_rows(I, W_s)             ("LOST: Low-rank and Sparse Pre-training for
             Large Language Models", arXiv 2508.02668; exact only when σ is the identity)
With another σ (e.g. SiLU, CoLA-style) y = σ(xA)B is not linear in x through one matrix, so export refuses.

Import builds the model from an HF Llama folder (config.json + model.safetensors, or a sharded
model.safetensors.index.json): `--method=dense` copies the weights; `--method=lost` splits every projection with
`lostjax.layers.lost.decompose` (SVD factors A, B of rank `--rank`, the top ⌊s·d_in⌋ input channels of the
residual as the sparse part; the model then computes γ·AB + (1−γ)·x_I W_s, LOST's starting point, not the dense
function). The run directory gets config.json (the `--config` training setup, default `train.configs.base`, with
the model section from HF) and a step-0 checkpoint holding the full train state, so `train.checkpoint.load_model`
loads it and `python -m train.main --config=train/configs/workdir.py:NEW_DIR --workdir=NEW_DIR` continues training
from it. A SentencePiece `tokenizer.model` in the HF folder is copied and becomes the run's tokenizer.

The options of later checkpoints map one to one (SmolLM, TinyLlama, Llama-3.x): `num_key_value_heads` ↔
`model.n_kv_heads` (grouped-query attention), `tie_word_embeddings` ↔ `model.tie_embeddings` (no lm_head.weight
is written; transformers ties it on load), `rope_type: llama3` with factor / low_freq_factor / high_freq_factor /
original_max_position_embeddings ↔ `model.rope_scaling` (read from transformers >= 5 `rope_parameters` or the older
`rope_scaling` + `rope_theta`; both are written). Attention/MLP biases, sliding windows, other RoPE types, a
head_dim other than hidden_size / heads and activations other than SiLU are refused with one line naming the key.

Mixture of experts ("Mixtral of Experts", arXiv 2401.04088): Mixtral's block computes p = softmax(x W_r) in
float32, takes the top-k of p and renormalises them to sum to one, then Σ g_e · SwiGLU_e(x) over every chosen
expert: exactly `lostjax.models.moe` in dropless mode (moe_capacity_factor = 0). Export writes the per-expert
layout of the released checkpoints (block_sparse_moe.gate, experts.{e}.w1 = gate, w2 = down, w3 = up), which
transformers >= 5 fuses on load; import reads it or transformers' fused experts.gate_up_proj / down_proj. A run in
capacity mode is refused: its dropped assignments have no Mixtral equivalent.

The load-balancing weight is a training setting (it does not change the function) and maps with a factor k =
top-k: router_aux_loss_coef = model.moe_aux_weight / k on export, moe_aux_weight = k · router_aux_loss_coef on
import (transformers' default 0.001 when the key is absent). Per layer l, with f_le the fraction of the T·k
assignments that go to expert e and P_le the mean router probability of e,
    lostjax:       moe_aux_weight · mean_l E·Σ_e f_le·P_le                       (1 for uniform routing)
    transformers:  router_aux_loss_coef · k·E·Σ_e F_e·P̄_e,  F, P̄ = f, P averaged over the layers   (k uniform)
(transformers' `load_balancing_loss_func` counts the assignments per token, summing to k, and pools the layers
before the product). With one MoE layer, or the same statistics in every layer, the two terms are equal; otherwise
lostjax's minus transformers' is moe_aux_weight · E·Σ_e cov_l(f_le, P_le) (covariance over the layers): lostjax
penalises each layer's imbalance, transformers the imbalance left after pooling the layers (layers that favour
different experts can cancel). transformers leaves padding out when given an attention mask (lostjax's packed
batches have none) and adds its term only with output_router_logits=True (written False, as in the released
Mixtral checkpoints).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

ATTN = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj"))
MLP = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
MIXTRAL_MLP = (("gate", "w1"), ("down", "w2"), ("up", "w3"))   # Mixtral's per-expert names of the SwiGLU
MIXTRAL_AUX_COEF = 0.001   # transformers' MixtralConfig default router_aux_loss_coef


# ----------------------------------------------------------------------------------------------------- export


def dense_weight(layer, name: str = "layer") -> np.ndarray:
  """The [d_in, d_out] float32 matrix a dense / low-rank / LOST layer multiplies by (error if not linear)."""
  from lostjax.layers import Dense, Lost, LowRank
  if isinstance(layer, Dense):
    return np.asarray(layer.kernel[...], np.float32)
  if isinstance(layer, (LowRank, Lost)) and layer.act is not None:
    raise ValueError(
        f"{name} is a {type(layer).__name__.lower()} layer with activation {layer.act.__name__!r} between its "
        f"factors: y = act(x A) B is not x W for any matrix W, so it cannot be written as a dense Hugging Face "
        f"Llama weight (only models with model.lowrank_act='identity' can be exported)")
  a = np.asarray(layer.a[...], np.float64)
  b = np.asarray(layer.b[...], np.float64)
  if isinstance(layer, LowRank):
    return (a @ b).astype(np.float32)
  w = layer.gamma * (a @ b)
  if layer.k:
    idx = np.asarray(layer.idx[...])
    w[idx] += (1.0 - layer.gamma) * np.asarray(layer.w_sparse[...], np.float64)
  return w.astype(np.float32)


def _expert_weights(experts, name: str) -> np.ndarray:
  """[E, d_in, d_out] float32: the dense matrix of each expert's copy of a stacked (nnx.vmap) linear layer."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(experts)
  n = jax.tree.leaves(state)[0].shape[0]
  out = []
  for e in range(n):
    one = nnx.merge(graphdef, jax.tree.map(lambda x: x[e], state))
    out.append(dense_weight(getattr(one, name), f"expert {e} {name}"))
  return np.stack(out)


def hf_state_dict(model) -> dict[str, np.ndarray]:
  """HF tensor names -> float32 numpy arrays ([out, in] for linear weights): `LlamaForCausalLM` for a dense-MLP
  model, `MixtralForCausalLM` (the per-expert w1/w2/w3 layout of the released Mixtral checkpoints) for a dropless
  mixture of experts. A tied model has no lm_head.weight (transformers ties it to the embedding on load)."""
  from lostjax.models.moe import MoeMlp
  cfg = model.cfg
  if cfg.moe_experts and cfg.moe_capacity_factor > 0:
    raise ValueError(f"model.moe_capacity_factor={cfg.moe_capacity_factor}: capacity mode drops the assignments "
                     f"beyond an expert's capacity, and a Mixtral model computes every assignment (it has no "
                     f"equivalent of dropped tokens); only dropless MoE runs (moe_capacity_factor=0) export")
  out = {"model.embed_tokens.weight": np.asarray(model.embed.embedding[...], np.float32)}
  for i, block in enumerate(model.layers):
    pre = f"model.layers.{i}."
    for ours, theirs in ATTN:
      out[f"{pre}self_attn.{theirs}.weight"] = dense_weight(getattr(block.attn, ours), f"layers.{i}.attn.{ours}").T
    if isinstance(block.mlp, MoeMlp):
      moe = f"{pre}block_sparse_moe."
      out[moe + "gate.weight"] = np.asarray(block.mlp.router.kernel[...], np.float32).T
      stacked = {ours: _expert_weights(block.mlp.experts, ours) for ours, _ in MLP}
      for e in range(block.mlp.num_experts):
        for ours, theirs in MIXTRAL_MLP:
          out[f"{moe}experts.{e}.{theirs}.weight"] = stacked[ours][e].T
    elif all(hasattr(block.mlp, ours) for ours, _ in MLP):
      for ours, theirs in MLP:
        out[f"{pre}mlp.{theirs}.weight"] = dense_weight(getattr(block.mlp, ours), f"layers.{i}.mlp.{ours}").T
    else:
      raise ValueError(f"layer {i} has an MLP of type {type(block.mlp).__name__}, not the dense SwiGLU "
                       f"(gate/up/down) of a Hugging Face Llama")
    out[f"{pre}input_layernorm.weight"] = np.asarray(block.attn_norm.scale[...], np.float32)
    out[f"{pre}post_attention_layernorm.weight"] = np.asarray(block.mlp_norm.scale[...], np.float32)
  out["model.norm.weight"] = np.asarray(model.final_norm.scale[...], np.float32)
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.asarray(model.lm_head.kernel[...], np.float32).T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_rope(mcfg) -> tuple[dict, dict | None]:
  """(rope_parameters, rope_scaling) entries of config.json: the transformers >= 5 key and the older one."""
  rs = mcfg.rope_scaling
  if rs.rope_type == "default":
    return {"rope_type": "default", "rope_theta": mcfg.rope_theta}, None
  scaling = {"rope_type": rs.rope_type, "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
             "high_freq_factor": rs.high_freq_factor,
             "original_max_position_embeddings": rs.original_max_position_embeddings}
  return {**scaling, "rope_theta": mcfg.rope_theta}, scaling


def hf_config(mcfg, eos_id: int | None = None, bos_id: int | None = None) -> dict:
  """config.json of the HF model equal to a lostjax model: LlamaForCausalLM, or MixtralForCausalLM for MoE."""
  rope_parameters, rope_scaling = hf_rope(mcfg)
  out = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": mcfg.vocab_size, "hidden_size": mcfg.d_model, "intermediate_size": mcfg.d_ff,
      "num_hidden_layers": mcfg.n_layers, "num_attention_heads": mcfg.n_heads,
      "num_key_value_heads": mcfg.kv_heads, "head_dim": mcfg.head_dim,
      "max_position_embeddings": mcfg.max_seq_len, "rms_norm_eps": mcfg.norm_eps,
      "rope_theta": mcfg.rope_theta, "rope_parameters": rope_parameters,
      "rope_scaling": rope_scaling, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "tie_word_embeddings": bool(mcfg.tie_embeddings), "initializer_range": mcfg.init_std, "torch_dtype": "float32",
      "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
  }
  if mcfg.moe_experts:
    del out["mlp_bias"]
    out.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "num_local_experts": mcfg.moe_experts, "num_experts_per_tok": mcfg.moe_top_k,
                "router_aux_loss_coef": mcfg.moe_aux_weight / mcfg.moe_top_k, "output_router_logits": False,
                "router_jitter_noise": 0.0, "sliding_window": None, "attention_dropout": 0.0})
  return out


def _check_out(out: str, overwrite: bool) -> None:
  if not out:
    raise ValueError("--out is required (the Hugging Face folder to write)")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ValueError(f"--out={out!r} exists and is not empty; refusing to overwrite it (pass --overwrite)")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out!r} exists and is not a directory")


def write_tokenizer(data_cfg, out: str, max_len: int) -> str:
  """Writes HF tokenizer files when the run's tokenizer has an HF form; returns a sentence saying what was done."""
  name = data_cfg.tokenizer
  if name != "sentencepiece":
    return (f"no tokenizer files written: the run's tokenizer {name!r} (UTF-8 bytes 0..255 + EOS 256) has no "
            f"Hugging Face tokenizer class with the same ids; encode text as UTF-8 bytes yourself")
  import sentencepiece as spm
  path = os.path.expanduser(data_cfg.tokenizer_path)
  sp = spm.SentencePieceProcessor(model_file=path)
  shutil.copyfile(path, os.path.join(out, "tokenizer.model"))
  piece = lambda i: sp.id_to_piece(i) if i >= 0 else None
  tok_cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
             "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
             "pad_token": None, "model_max_length": max_len, "legacy": True, "add_prefix_space": True,
             "clean_up_tokenization_spaces": False}
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(tok_cfg, f, indent=2)
  return ("tokenizer.model + tokenizer_config.json (LlamaTokenizer, no BOS/EOS added, as in training) written; "
          "decoding is exact, but transformers' converted tokenizer may split runs of spaces differently")


def write_hf(model, out: str, data_cfg=None, *, overwrite: bool = False) -> dict:
  """Writes config.json, model.safetensors (and tokenizer files for `data_cfg`, a run's `data` section) of an HF
  LlamaForCausalLM equal to `model`; returns a summary. Nothing is written when the model cannot be exported."""
  from safetensors.numpy import save_file
  _check_out(out, overwrite)
  tensors = hf_state_dict(model)   # before writing anything: a non-exportable model fails here
  os.makedirs(out, exist_ok=True)
  eos = bos = None
  tokenizer = data_cfg.tokenizer if data_cfg is not None else None
  if tokenizer == "byte":
    eos = 256
  elif tokenizer == "sentencepiece":
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.expanduser(data_cfg.tokenizer_path))
    eos, bos = (sp.eos_id() if sp.eos_id() >= 0 else None), (sp.bos_id() if sp.bos_id() >= 0 else None)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_config(model.cfg, eos, bos), f, indent=2)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  # safetensors creates the file owner-only (0600); give it config.json's permissions (the umask's, e.g. 0644)
  shutil.copymode(os.path.join(out, "config.json"), os.path.join(out, "model.safetensors"))
  note = (write_tokenizer(data_cfg, out, model.cfg.max_seq_len) if data_cfg is not None
          else "no tokenizer files written: no tokenizer given")
  return {"out": out, "tensors": len(tensors), "params": int(sum(v.size for v in tensors.values())),
          "tokenizer": note}


def export(workdir: str, out: str, *, overwrite: bool = False, step: int | None = None) -> dict:
  """`write_hf` of a run directory's latest (or `step`) checkpoint, with the run's tokenizer."""
  from train.checkpoint import load_model
  _check_out(out, overwrite)
  model, cfg = load_model(workdir, step)
  return write_hf(model, out, cfg.data, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------------- import


def read_hf(hf_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config dict, tensors) of an HF Llama folder with safetensors weights (single file or sharded index)."""
  from safetensors.numpy import load_file
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"--from_hf={hf_dir!r} has no config.json: not a Hugging Face model folder")
  with open(path) as f:
    hf = json.load(f)
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index) as f:
      files = [os.path.join(hf_dir, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
  else:
    raise ValueError(f"--from_hf={hf_dir!r} has no model.safetensors (or model.safetensors.index.json); "
                     f"only safetensors weights are read")
  tensors = {}
  for fn in files:
    tensors.update({k: v.astype(np.float32) for k, v in load_file(fn).items()})
  return hf, tensors


ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def hf_rope_settings(hf: dict) -> tuple[float, dict]:
  """(rope_theta, model.rope_scaling dict) of an HF config (transformers >= 5 `rope_parameters`, or the older
  `rope_theta` + `rope_scaling`); refuses RoPE variants other than the default and 'llama3'."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope = scaling or params
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "llama3"):
    raise ValueError(f"rope_type={rope_type!r} is not supported (plain RoPE and 'llama3' scaling only)")
  if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (full-width RoPE only)")
  if rope_type == "default":
    return theta, {"rope_type": "default"}
  missing = [k for k in ROPE_KEYS if k not in rope]
  if missing:
    raise ValueError(f"rope_type='llama3' without {missing[0]} in its rope settings")
  return theta, {"rope_type": "llama3", **{k: (int if k.startswith("original") else float)(rope[k]) for k in ROPE_KEYS}}


def _check_hf(hf: dict) -> None:
  """One-line refusal, naming the key, of every HF setting lostjax's Llama does not compute."""
  if hf.get("model_type") not in ("llama", "mixtral"):
    raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; only 'llama' and 'mixtral' can be "
                     f"imported")
  heads = hf["num_attention_heads"]
  kv = hf.get("num_key_value_heads") or heads
  if heads % kv:
    raise ValueError(f"num_key_value_heads={kv} does not divide num_attention_heads={heads}")
  if (hf.get("head_dim") or hf["hidden_size"] // heads) != hf["hidden_size"] // heads:
    raise ValueError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads is not supported")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ValueError(f"{key}=true is not supported (lostjax linears have no bias)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (lostjax's MLP is SwiGLU with SiLU)")
  if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
    raise ValueError(f"sliding_window={hf['sliding_window']} is not supported (lostjax attends to the whole causal "
                     f"context)")
  coef = hf.get("router_aux_loss_coef", MIXTRAL_AUX_COEF)
  if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < float("inf"):
    raise ValueError(f"router_aux_loss_coef={coef!r} must be a finite non-negative number")
  if hf.get("router_jitter_noise"):
    raise ValueError(f"router_jitter_noise={hf['router_jitter_noise']} is not supported (lostjax's router is "
                     f"deterministic)")
  hf_rope_settings(hf)


class _Tensors(dict):
  """The tensors of an HF folder; a missing name is a one-line ValueError naming it."""

  def __init__(self, tensors: dict, hf_dir: str):
    super().__init__(tensors)
    self.hf_dir = hf_dir

  def __missing__(self, key):
    raise ValueError(f"--from_hf={self.hf_dir!r} has no tensor {key!r}")


def _mixtral_layer(tensors: dict, pre: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(router kernel [d, E], {gate|up|down: [E, d_in, d_out]}) of one Mixtral layer, from either layout: the
  per-expert `block_sparse_moe.experts.{e}.w1/w2/w3` of the released checkpoints, or transformers' fused
  `mlp.experts.gate_up_proj` [E, 2·ff, d] / `mlp.experts.down_proj` [E, d, ff]."""
  fused = pre + "mlp.experts.gate_up_proj"
  if fused in tensors:
    gate_up, down = tensors[fused], tensors[pre + "mlp.experts.down_proj"]
    ff = gate_up.shape[1] // 2
    experts = {"gate": gate_up[:, :ff], "up": gate_up[:, ff:], "down": down}
    router = tensors[pre + "mlp.gate.weight"]
  else:
    moe = pre + "block_sparse_moe."
    router = tensors[moe + "gate.weight"]
    experts = {ours: np.stack([tensors[f"{moe}experts.{e}.{theirs}.weight"] for e in range(router.shape[0])])
               for ours, theirs in MIXTRAL_MLP}
  return router.T, {k: np.swapaxes(v, 1, 2) for k, v in experts.items()}


def hf_run_config(hf: dict, *, method: str = "dense", rank: int = 0, sparsity: float = 0.05, gamma: float = 0.5,
                  base=None):
  """The run config (`base`, default `train.configs.base`, with its model section from the HF config) of an
  import, and the LOST rank used. Refuses what lostjax's Llama does not compute (one line naming the key)."""
  from train.configs.base import base_config
  if method not in ("dense", "lost"):
    raise ValueError(f"--method must be 'dense' or 'lost', got {method!r}")
  _check_hf(hf)
  d, heads, ff = hf["hidden_size"], hf["num_attention_heads"], hf["intermediate_size"]
  kv_heads = hf.get("num_key_value_heads") or heads
  kv_dim = kv_heads * (d // heads)
  if method == "lost":   # one rank for every projection: below the narrowest (K/V are kv_dim wide under GQA)
    narrowest = min(d, ff, kv_dim)
    rank = rank or min(d // 4, narrowest // 2)
    if rank <= 0 or rank >= narrowest:
      raise ValueError(f"--rank={rank} must be in (0, {narrowest}) (min of hidden_size={d}, intermediate_size={ff}"
                       f" and the K/V width num_key_value_heads * head_dim={kv_dim})")
  theta, rope_scaling = hf_rope_settings(hf)
  moe = hf["model_type"] == "mixtral"
  cfg = base_config() if base is None else base
  m = cfg.model
  m.preset = "hf"
  m.update(vocab_size=hf["vocab_size"], d_model=d, d_ff=ff, n_heads=heads,
           n_kv_heads=0 if kv_heads == heads else kv_heads, tie_embeddings=bool(hf.get("tie_word_embeddings")),
           n_layers=hf["num_hidden_layers"], max_seq_len=hf.get("max_position_embeddings", 2048),
           rope_theta=theta, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
           attn_kind=method, mlp_kind=method, lowrank_act="identity")
  m.rope_scaling.update(rope_scaling)
  # an HF Llama has one dense SwiGLU MLP per block; a Mixtral one dropless top-k MoE (softmax, top-k, renormalised)
  m.update(moe_experts=hf["num_local_experts"] if moe else 0, moe_capacity_factor=0.0)
  if moe:   # the load-balancing weight: transformers' per-token assignment count sums to k (module docstring)
    m.update(moe_top_k=hf["num_experts_per_tok"],
             moe_aux_weight=hf["num_experts_per_tok"] * float(hf.get("router_aux_loss_coef", MIXTRAL_AUX_COEF)))
  if method == "lost":
    m.update(attn_rank=rank, mlp_rank=rank, sparsity=float(sparsity), gamma=float(gamma))
  cfg.train.seq_len = min(cfg.train.seq_len, m.max_seq_len)
  return cfg, rank


def hf_values(tensors: dict, mcfg, hf_dir: str, *, method: str, rank: int, sparsity: float) -> dict:
  """lostjax leaf path (tuple) -> array: the HF tensors in lostjax's layout ([d_in, d_out] kernels; with
  method='lost' every projection split by `lostjax.layers.decompose`, per expert for a Mixtral)."""
  import jax.numpy as jnp

  from lostjax.layers import decompose
  tensors = _Tensors(tensors, hf_dir)
  values = {("embed", "embedding"): tensors["model.embed_tokens.weight"],
            ("final_norm", "scale"): tensors["model.norm.weight"]}
  if not mcfg.tie_embeddings:
    values[("lm_head", "kernel")] = tensors["lm_head.weight"].T
  for i in range(mcfg.n_layers):
    pre = f"model.layers.{i}."
    values[("layers", i, "attn_norm", "scale")] = tensors[pre + "input_layernorm.weight"]
    values[("layers", i, "mlp_norm", "scale")] = tensors[pre + "post_attention_layernorm.weight"]
    weights = {("attn", ours): tensors[f"{pre}self_attn.{theirs}.weight"].T for ours, theirs in ATTN}
    if mcfg.moe_experts:
      router, experts = _mixtral_layer(tensors, pre)
      values[("layers", i, "mlp", "router", "kernel")] = router
      weights.update({("mlp", "experts", ours): w for ours, w in experts.items()})
    else:
      weights.update({("mlp", ours): tensors[f"{pre}mlp.{theirs}.weight"].T for ours, theirs in MLP})
    for key, w in weights.items():                         # w: [d_in, d_out], or [E, d_in, d_out] for experts
      if method == "dense":
        values[("layers", i, *key, "kernel")] = w
        continue
      stack = w if w.ndim == 3 else w[None]
      decs = [decompose(jnp.asarray(we), rank, sparsity, score=mcfg.lost_score) for we in stack]
      for leaf in ("a", "b", "w_sparse", "idx"):
        leaves = np.stack([np.asarray(getattr(dec, leaf)) for dec in decs])
        values[("layers", i, *key, leaf)] = leaves if w.ndim == 3 else leaves[0]
    if method == "lost" and mcfg.lost_contiguous_down:
      _down_channels_first(values, i)
  return values


def _down_channels_first(values: dict, i: int) -> None:
  """Layer i's MLP values in the order `model.lost_contiguous_down` builds (as `Mlp` does at init with
  `lostjax.layers.lost.move_sparse_channels_first` and `permute_outputs`): down's sparse channels first."""
  from lostjax.layers.lost import sparse_first_permutation
  key = lambda proj, leaf: ("layers", i, "mlp", proj, leaf)
  idx = np.asarray(values[key("down", "idx")])
  a = np.asarray(values[key("down", "a")])
  perm = np.asarray(sparse_first_permutation(idx, a.shape[0]))
  values[key("down", "a")] = a[perm]
  values[key("down", "idx")] = np.arange(idx.shape[0], dtype=idx.dtype)
  for proj in ("gate", "up"):
    for leaf in ("b", "w_sparse"):
      values[key(proj, leaf)] = np.asarray(values[key(proj, leaf)])[:, perm]


def fill_state(state, values: dict):
  """An nnx State (params or the static variables) with every leaf replaced by values[path] (shape-checked)."""
  import jax.numpy as jnp
  from flax import nnx
  flat = []
  for path, var in nnx.to_flat_state(state):
    key = tuple(int(p) if isinstance(p, int) else p for p in path)
    if key not in values:
      raise ValueError(f"no Hugging Face weight for lostjax leaf {'/'.join(map(str, path))}")
    v = np.asarray(values[key])
    if v.shape != tuple(var.shape):
      raise ValueError(f"Hugging Face weight for {'/'.join(map(str, path))} has shape {v.shape}, "
                       f"expected {tuple(var.shape)}")
    flat.append((path, var.replace(jnp.asarray(v, var.dtype))))
  return nnx.from_flat_state(flat)


def load_hf(hf_dir: str, *, method: str = "dense", rank: int = 0, sparsity: float = 0.05, gamma: float = 0.5,
            base=None):
  """(model, run config): a `lostjax.models.Llama` holding an HF Llama / Mixtral folder's weights, in memory
  (what `import_hf` checkpoints, without the train state)."""
  from flax import nnx

  from lostjax.models import Llama
  from train import state as state_lib
  hf, tensors = read_hf(hf_dir)
  cfg, rank = hf_run_config(hf, method=method, rank=rank, sparsity=sparsity, gamma=gamma, base=base)
  mcfg = state_lib.llama_config(cfg)
  values = hf_values(tensors, mcfg, hf_dir, method=method, rank=rank, sparsity=sparsity)
  # every leaf is replaced: the model is built abstract (no initialisation)
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
  return nnx.merge(graphdef, fill_state(params, values), fill_state(rest, values)), cfg


def import_hf(hf_dir: str, workdir: str, *, method: str = "dense", rank: int = 0, sparsity: float = 0.05,
              gamma: float = 0.5, base=None, overwrite: bool = False, seed: int = 0) -> dict:
  """Writes a lostjax run directory (config.json + step-0 checkpoint) from an HF Llama or Mixtral folder."""
  import jax

  from lostjax import sharding
  from train import checkpoint as ckpt_lib
  from train import objectives
  from train import state as state_lib

  if method not in ("dense", "lost"):
    raise ValueError(f"--method must be 'dense' or 'lost', got {method!r}")
  if not workdir:
    raise ValueError("--workdir is required (the lostjax run directory to write)")
  if os.path.isdir(workdir) and os.listdir(workdir) and not overwrite:
    raise ValueError(f"--workdir={workdir!r} exists and is not empty; refusing to overwrite it (pass --overwrite)")
  hf, tensors = read_hf(hf_dir)
  cfg, rank = hf_run_config(hf, method=method, rank=rank, sparsity=sparsity, gamma=gamma, base=base)
  cfg.train.seed = seed
  if cfg.objectives.get("saf", {}).get("enabled", False):
    raise ValueError("objectives.saf.enabled=True needs the data to size its store; import without it and "
                     "start the SAF run from the imported weights")
  mcfg = state_lib.llama_config(cfg)
  values = hf_values(tensors, mcfg, hf_dir, method=method, rank=rank, sparsity=sparsity)
  os.makedirs(workdir, exist_ok=True)
  if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
    shutil.copyfile(os.path.join(hf_dir, "tokenizer.model"), os.path.join(workdir, "tokenizer.model"))
    cfg.data.tokenizer = "sentencepiece"
    cfg.data.tokenizer_path = os.path.abspath(os.path.join(workdir, "tokenizer.model"))
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  run = state_lib.create_train_state(cfg, mesh=mesh, model_cfg=mcfg)
  params, rest = fill_state(run.state["params"], values), fill_state(run.rest, values)
  with open(os.path.join(workdir, "config.json"), "w") as f:   # as train.trainer.prepare_workdir writes it
    json.dump(cfg.to_dict(), f, indent=2, default=str)
  shutil.rmtree(os.path.join(workdir, ckpt_lib.CKPT_DIR), ignore_errors=True)  # only with --overwrite
  with jax.set_mesh(mesh):   # optimizer and objective state of the imported weights (e.g. MESA's EMA copy)
    state = dict(run.state, params=params, opt=jax.jit(run.tx.init)(params),
                 obj=objectives.init_state(cfg.objectives, params, num_train_examples=0,
                                           seq_len=cfg.train.seq_len, vocab_size=mcfg.vocab_size))
  ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep_ckpts)
  try:
    ckpt.save(0, state, rest, {"epoch": 0, "position": 0})
  finally:
    ckpt.close()
  return {"workdir": workdir, "method": method, "n_layers": mcfg.n_layers, "d_model": mcfg.d_model,
          "n_kv_heads": mcfg.kv_heads, "tie_embeddings": mcfg.tie_embeddings, "moe_experts": mcfg.moe_experts,
          "tokenizer": cfg.data.tokenizer}


# ----------------------------------------------------------------------------------------------------- CLI


def _flags(argv=None):
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()  # own FlagValues: main(argv) can run in-process beside other CLIs
  flags.DEFINE_string("workdir", None, "Run directory to export (or to write, with --from_hf).", flag_values=fv)
  flags.DEFINE_string("out", None, "Hugging Face folder to write.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Allow writing into a non-empty --out (or --workdir with --from_hf).",
                    flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).", flag_values=fv)
  flags.DEFINE_string("from_hf", None, "Import this Hugging Face Llama folder into --workdir.", flag_values=fv)
  flags.DEFINE_enum("method", "dense", ["dense", "lost"], "Imported model: dense copy or LOST decomposition.",
                    flag_values=fv)
  flags.DEFINE_integer("rank", 0, "LOST rank (default d_model // 4).", flag_values=fv)
  flags.DEFINE_float("sparsity", 0.05, "LOST sparsity s (k = floor(s * d_in) channels).", flag_values=fv)
  flags.DEFINE_float("gamma", 0.5, "LOST gamma.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "train.seed of the imported run.", flag_values=fv)
  config_flags.DEFINE_config_file("config", None, "Training setup for the imported run (model section replaced).",
                                  flag_values=fv, lock_config=False, sys_argv=argv)
  return fv


def main(argv) -> int:
  from absl import logging

  from train.cli import parse
  f = _flags(argv)
  status = parse(f, argv, __doc__)
  if status is not None:
    return status
  logging.set_verbosity(logging.WARNING)
  try:
    if f.from_hf:
      out = import_hf(f.from_hf, f.workdir, method=f.method, rank=f.rank, sparsity=f.sparsity, gamma=f.gamma,
                      base=f.config, overwrite=f.overwrite, seed=f.seed)
    else:
      if not f.workdir:
        raise ValueError("--workdir is required")
      out = export(f.workdir, f.out, overwrite=f.overwrite, step=f.step)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
