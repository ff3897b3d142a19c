"""Export a run to a Hugging Face `LlamaForCausalLM` folder, or import one as a lostjax run directory.

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
Grouped-query attention, biases, rope scaling and tied embeddings other than a plain copy are refused with a
clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

ATTN = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj"))
MLP = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))


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


def hf_state_dict(model) -> dict[str, np.ndarray]:
  """HF LlamaForCausalLM tensor names -> float32 numpy arrays ([out, in] for linear weights)."""
  out = {"model.embed_tokens.weight": np.asarray(model.embed.embedding[...], np.float32)}
  for i, block in enumerate(model.layers):
    pre = f"model.layers.{i}."
    for ours, theirs in ATTN:
      out[f"{pre}self_attn.{theirs}.weight"] = dense_weight(getattr(block.attn, ours), f"layers.{i}.attn.{ours}").T
    if not all(hasattr(block.mlp, ours) for ours, _ in MLP):
      raise ValueError(f"layer {i} has an MLP of type {type(block.mlp).__name__}, not the dense SwiGLU "
                       f"(gate/up/down) of a Hugging Face Llama")
    for ours, theirs in MLP:
      out[f"{pre}mlp.{theirs}.weight"] = dense_weight(getattr(block.mlp, ours), f"layers.{i}.mlp.{ours}").T
    out[f"{pre}input_layernorm.weight"] = np.asarray(block.attn_norm.scale[...], np.float32)
    out[f"{pre}post_attention_layernorm.weight"] = np.asarray(block.mlp_norm.scale[...], np.float32)
  out["model.norm.weight"] = np.asarray(model.final_norm.scale[...], np.float32)
  out["lm_head.weight"] = np.asarray(model.lm_head.kernel[...], np.float32).T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config(mcfg, eos_id: int | None = None, bos_id: int | None = None) -> dict:
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": mcfg.vocab_size, "hidden_size": mcfg.d_model, "intermediate_size": mcfg.d_ff,
      "num_hidden_layers": mcfg.n_layers, "num_attention_heads": mcfg.n_heads,
      "num_key_value_heads": mcfg.n_heads, "head_dim": mcfg.head_dim,
      "max_position_embeddings": mcfg.max_seq_len, "rms_norm_eps": mcfg.norm_eps,
      "rope_theta": mcfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": mcfg.rope_theta},
      "rope_scaling": None, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "tie_word_embeddings": False, "initializer_range": mcfg.init_std, "torch_dtype": "float32",
      "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
  }


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


def _check_hf(hf: dict) -> None:
  if hf.get("model_type") != "llama":
    raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; only 'llama' can be imported")
  heads = hf["num_attention_heads"]
  if hf.get("num_key_value_heads", heads) != heads:
    raise ValueError(f"grouped-query attention (num_key_value_heads={hf['num_key_value_heads']} != "
                     f"num_attention_heads={heads}) is not supported by lostjax's Llama")
  if hf.get("head_dim", hf["hidden_size"] // heads) != hf["hidden_size"] // heads:
    raise ValueError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads is not supported")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ValueError(f"{key}=true is not supported (lostjax linears have no bias)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (lostjax's MLP is SwiGLU with SiLU)")
  rope = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else (
      (hf.get("rope_parameters") or {}).get("rope_type", "default"))
  if rope_type != "default":
    raise ValueError(f"rope scaling {rope_type!r} is not supported (plain RoPE only)")


def _rope_theta(hf: dict) -> float:
  params = hf.get("rope_parameters") or {}
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def import_hf(hf_dir: str, workdir: str, *, method: str = "dense", rank: int = 0, sparsity: float = 0.05,
              gamma: float = 0.5, base=None, overwrite: bool = False, seed: int = 0) -> dict:
  """Writes a lostjax run directory (config.json + step-0 checkpoint) from an HF Llama folder."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lostjax import sharding
  from lostjax.layers import decompose
  from train import checkpoint as ckpt_lib
  from train import objectives
  from train import state as state_lib
  from train.configs.base import base_config

  if method not in ("dense", "lost"):
    raise ValueError(f"--method must be 'dense' or 'lost', got {method!r}")
  if not workdir:
    raise ValueError("--workdir is required (the lostjax run directory to write)")
  if os.path.isdir(workdir) and os.listdir(workdir) and not overwrite:
    raise ValueError(f"--workdir={workdir!r} exists and is not empty; refusing to overwrite it (pass --overwrite)")
  hf, tensors = read_hf(hf_dir)
  _check_hf(hf)
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  if method == "lost":
    rank = rank or d // 4
    if rank <= 0 or rank >= min(d, hf["intermediate_size"]):
      raise ValueError(f"--rank={rank} must be in (0, {min(d, hf['intermediate_size'])})")

  cfg = base_config() if base is None else base
  m = cfg.model
  m.preset = "hf"
  m.update(vocab_size=hf["vocab_size"], d_model=d, d_ff=hf["intermediate_size"], n_heads=heads,
           n_layers=hf["num_hidden_layers"], max_seq_len=hf.get("max_position_embeddings", 2048),
           rope_theta=_rope_theta(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
           attn_kind=method, mlp_kind=method, lowrank_act="identity")
  if "moe_experts" in m:
    m.moe_experts = 0   # an HF Llama has one dense SwiGLU MLP per block
  if method == "lost":
    m.update(attn_rank=rank, mlp_rank=rank, sparsity=float(sparsity), gamma=float(gamma))
  cfg.train.seq_len = min(cfg.train.seq_len, m.max_seq_len)
  cfg.train.seed = seed
  os.makedirs(workdir, exist_ok=True)
  if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
    shutil.copyfile(os.path.join(hf_dir, "tokenizer.model"), os.path.join(workdir, "tokenizer.model"))
    cfg.data.tokenizer = "sentencepiece"
    cfg.data.tokenizer_path = os.path.abspath(os.path.join(workdir, "tokenizer.model"))
  if cfg.objectives.get("saf", {}).get("enabled", False):
    raise ValueError("objectives.saf.enabled=True needs the data to size its store; import without it and "
                     "start the SAF run from the imported weights")
  mcfg = state_lib.llama_config(cfg)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  run = state_lib.create_train_state(cfg, mesh=mesh, model_cfg=mcfg)
  params, rest = run.state["params"], run.rest
  if hf.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  values = {("embed", "embedding"): tensors["model.embed_tokens.weight"],
            ("final_norm", "scale"): tensors["model.norm.weight"], ("lm_head", "kernel"): tensors["lm_head.weight"].T}
  for i in range(mcfg.n_layers):
    pre = f"model.layers.{i}."
    values[("layers", i, "attn_norm", "scale")] = tensors[pre + "input_layernorm.weight"]
    values[("layers", i, "mlp_norm", "scale")] = tensors[pre + "post_attention_layernorm.weight"]
    for group, names, hf_group in (("attn", ATTN, "self_attn"), ("mlp", MLP, "mlp")):
      for ours, theirs in names:
        w = tensors[f"{pre}{hf_group}.{theirs}.weight"].T          # [d_in, d_out]
        if method == "dense":
          values[("layers", i, group, ours, "kernel")] = w
        else:
          dec = decompose(jnp.asarray(w), rank, sparsity, score=mcfg.lost_score)
          for leaf in ("a", "b", "w_sparse", "idx"):
            values[("layers", i, group, ours, leaf)] = np.asarray(getattr(dec, leaf))

  def fill(state):
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

  params, rest = fill(params), fill(rest)
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
  return {"workdir": workdir, "method": method, "n_layers": mcfg.n_layers, "d_model": d,
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
