"""One-shot GPU benchmark for the LOST kernels (arXiv 2508.02668) and the LLaMA train step.

Sections (each time-boxed, each wrapped so that one failure does not lose the others; the JSON is
rewritten after every section, so a timeout still leaves the finished part):
  env        jax/torch versions, device, date
  peak       8192^3 bf16 matmul TFLOP/s (JAX, and PyTorch when CUDA is available): MFU denominator
  check      Pallas vs XLA gather_matmul on the GPU (forward, dx, dw errors) at 350M shapes
  sweep      Pallas tile sizes (bm, bn, bk) for the sparse branch, forward+backward
  layers     per-layer forward+backward: dense / low-rank / LOST (XLA variants, Pallas) and the sparse
             branch alone, 60M..1B shapes (d->d, d->ff; ff->d at 350M), tokens = 256*64, bf16
  model      lostjax.models.Llama train step (AdamW, bf16 compute, f32 master weights): tokens/s and
             MFU for dense and LOST at 130M/350M, seq 256 and 1024 (16384 tokens per step)
  torch      PyTorch LLaMA train step with the same dense config: Hugging Face LlamaForCausalLM when
             `transformers` is importable, else a minimal PyTorch LLaMA (recorded as such)

FLOPs per token (counted explicitly): 6 * N_matmul + 12 * L * d * seq, where N_matmul sums the
trainable matmul parameters (attention/MLP projections as built: dense d_in*d_out, LOST
r*(d_in+d_out) + k*d_out) plus the LM head; the input embedding is excluded. The attention term is the
usual non-causal convention (PaLM appendix B).

  python bench/layers_gpu.py               # on the GPU, < 8 min; JSON to $OUT/layers_gpu.json or stdout
  python bench/layers_gpu.py --smoke       # tiny shapes on CPU, < 1 min
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

# JAX and PyTorch share the GPU in this process: leave room for the PyTorch peer.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import layers as layer_bench  # noqa: E402  (bench/layers.py)
from lostjax.kernels import gather_matmul  # noqa: E402

RESULT: dict = {}
T_START = time.time()


def _now():
  return time.time() - T_START


def _err(e):
  return {"error": f"{type(e).__name__}: {str(e)[:400]}",
          "traceback_tail": traceback.format_exc()[-1200:]}


def _write(out_path):
  RESULT["elapsed_s"] = round(_now(), 1)
  text = json.dumps(RESULT, indent=1, default=str)
  if out_path:
    with open(out_path, "w") as f:
      f.write(text)
  return text


def section(name, budget_s, out_path):
  """Decorator: run fn(deadline) if time is left, store its result (or error) under RESULT[name]."""
  def deco(fn):
    def run(*args, **kwargs):
      if _now() > ARGS.total_budget_s - 5:
        RESULT[name] = {"skipped": f"total budget {ARGS.total_budget_s}s used"}
      else:
        deadline = min(_now() + budget_s, ARGS.total_budget_s)
        t0 = _now()
        try:
          RESULT[name] = fn(deadline, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
          RESULT[name] = _err(e)
        if isinstance(RESULT[name], dict):
          RESULT[name]["section_s"] = round(_now() - t0, 1)
      print(f"[{_now():6.1f}s] {name} done", file=sys.stderr, flush=True)
      _write(out_path)
    return run
  return deco


# ----------------------------------------------------------------------------- env / peak

def env_info():
  info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()], "python": sys.version.split()[0]}
  try:
    import jaxlib
    info["jaxlib"] = jaxlib.__version__
  except Exception:  # noqa: BLE001
    pass
  try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = bool(torch.cuda.is_available())
  except Exception as e:  # noqa: BLE001
    info["torch"] = f"unavailable: {e}"
  try:
    import transformers
    info["transformers"] = transformers.__version__
  except Exception as e:  # noqa: BLE001
    info["transformers"] = f"unavailable: {type(e).__name__}"
  return info


def _median_time(fn, reps, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(fn())
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def peak(deadline):
  n = ARGS.peak_n
  out = {"n": n}
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  t = _median_time(lambda: f(a, b), reps=10)
  out["jax_bf16_tflops"] = round(2 * n**3 / t / 1e12, 2)
  try:
    import torch
    if torch.cuda.is_available():
      ta = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
      tb = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
      for _ in range(3):
        ta @ tb
      torch.cuda.synchronize()
      ts = []
      for _ in range(10):
        t0 = time.perf_counter()
        ta @ tb
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
      out["torch_bf16_tflops"] = round(2 * n**3 / float(np.median(ts)) / 1e12, 2)
      del ta, tb
      torch.cuda.empty_cache()
  except Exception as e:  # noqa: BLE001
    out["torch"] = _err(e)["error"]
  return out


# ----------------------------------------------------------------------------- pallas check / sweep

def pallas_check(deadline):
  size = ARGS.check_size
  d, ff, _ = layer_bench.SIZES[size]
  rows = []
  for (d_in, d_out) in [(d, d), (d, ff), (ff, d)][:ARGS.check_layers]:
    for dtype in (jnp.bfloat16, jnp.float32):
      if _now() > deadline:
        break
      k = max(1, int(0.05 * d_in))
      rng = np.random.default_rng(0)
      idx = jnp.asarray(np.sort(rng.choice(d_in, k, replace=False)), jnp.int32)
      x = jax.random.normal(jax.random.key(0), (ARGS.tokens, d_in), dtype)
      w = (0.02 * jax.random.normal(jax.random.key(1), (k, d_out))).astype(dtype)
      dy = jax.random.normal(jax.random.key(2), (ARGS.tokens, d_out), dtype)
      row = {"d_in": d_in, "d_out": d_out, "k": k, "dtype": jnp.dtype(dtype).name}
      res = {}
      try:
        for impl in ("gather_xla", "pallas_gpu"):
          def y_dx_dw(x, w, dy, impl=impl):
            y, pullback = jax.vjp(lambda x_, w_: gather_matmul(x_, idx, w_, impl=impl), x, w)
            return (y,) + tuple(pullback(dy))
          res[impl] = jax.block_until_ready(jax.jit(y_dx_dw)(x, w, dy))
      except Exception as e:  # noqa: BLE001
        row.update(_err(e))
        rows.append(row)
        continue
      ref = [np.asarray(jnp.take(x, idx, axis=-1).astype(jnp.float32) @ w.astype(jnp.float32))]
      for name, i in (("y", 0), ("dx", 1), ("dw", 2)):
        a = np.asarray(res["pallas_gpu"][i], np.float32)
        b = np.asarray(res["gather_xla"][i], np.float32)
        row[f"max_abs_diff_{name}"] = float(np.max(np.abs(a - b)))
        row[f"max_abs_{name}"] = float(np.max(np.abs(b)))
      row["max_abs_err_y_vs_f32_ref"] = float(np.max(np.abs(np.asarray(res["pallas_gpu"][0],
                                                                         np.float32) - ref[0])))
      rows.append(row)
  return {"size": size, "tokens": ARGS.tokens, "rows": rows}


def pallas_sweep(deadline):
  d, ff, _ = layer_bench.SIZES[ARGS.check_size]
  out = []
  for (d_in, d_out) in [(d, d), (d, ff)]:
    params, idx = layer_bench.make_params(jax.random.key(0), d_in, d_out, 16, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (ARGS.tokens, d_in), jnp.bfloat16)
    ct = jax.random.normal(jax.random.key(2), (ARGS.tokens, d_out), jnp.bfloat16)
    fns = {}
    fns["gather_xla"] = layer_bench.fwd_bwd_step(lambda x_, p: gather_matmul(x_, idx, p["ws"], impl="gather_xla"))
    fns["pallas_gpu_default_blocks"] = layer_bench.fwd_bwd_step(
        lambda x_, p: gather_matmul(x_, idx, p["ws"], impl="pallas_gpu"))
    for blocks in ARGS.sweep_blocks:
      fns[str(blocks)] = layer_bench.fwd_bwd_step(
          lambda x_, p, blocks=blocks: gather_matmul(x_, idx, p["ws"], impl="pallas_gpu", blocks=blocks))
    p = {"ws": params["ws"]}
    row = {"d_in": d_in, "d_out": d_out, "k": int(idx.shape[0]), "ms_fwd_bwd": {}}
    for name, step in fns.items():
      if _now() > deadline:
        row["ms_fwd_bwd"][name] = "skipped (section budget)"
        continue
      try:
        row["ms_fwd_bwd"][name] = round(1e3 * _median_time(lambda: step(x, p, ct), ARGS.reps), 4)
      except Exception as e:  # noqa: BLE001
        row["ms_fwd_bwd"][name] = _err(e)["error"]
    # forward only, default blocks
    for impl in ("gather_xla", "pallas_gpu"):
      if _now() > deadline:
        break
      try:
        f = jax.jit(lambda x_, w_, impl=impl: gather_matmul(x_, idx, w_, impl=impl))
        row[f"ms_fwd_{impl}"] = round(1e3 * _median_time(lambda: f(x, params["ws"]), ARGS.reps), 4)
      except Exception as e:  # noqa: BLE001
        row[f"ms_fwd_{impl}"] = _err(e)["error"]
    out.append(row)
  return {"tokens": ARGS.tokens, "rows": out}


# ----------------------------------------------------------------------------- per-layer

def per_layer(deadline):
  rows, skipped = [], []
  plan = [(ARGS.check_size, "d->d"), (ARGS.check_size, "d->ff"), (ARGS.check_size, "ff->d")]
  plan += [(s, l) for s in ARGS.sizes for l in ("d->d", "d->ff") if s != ARGS.check_size]
  for size, layer in plan:
    if _now() > deadline:
      skipped.append(f"{size} {layer}")
      continue
    (name, d_in, d_out, rank), = layer_bench.layer_shapes(size, (layer,))
    r = layer_bench.bench_layer(size, d_in, d_out, rank, ARGS.tokens, jnp.dtype(ARGS.dtype),
                                ARGS.variants, ARGS.reps)
    for row in r:
      row["layer"] = name
    rows.extend(r)
  return {"tokens": ARGS.tokens, "dtype": ARGS.dtype, "block_summary": layer_bench.block_summary(rows),
          "rows": rows, "skipped": skipped}


# ----------------------------------------------------------------------------- model step (JAX)

def _linear_params(d_in, d_out, kind, rank, sparsity):
  if kind == "dense":
    return d_in * d_out
  if kind == "lowrank":
    return rank * (d_in + d_out)
  k = int(d_in * sparsity + 1e-9)
  return rank * (d_in + d_out) + k * d_out


def model_flops_per_token(cfg, seq):
  d, ff, L = cfg.d_model, cfg.d_ff, cfg.n_layers
  attn = 4 * _linear_params(d, d, cfg.attn_kind, cfg.attn_rank, cfg.sparsity)
  mlp = (2 * _linear_params(d, ff, cfg.mlp_kind, cfg.mlp_rank, cfg.sparsity)
         + _linear_params(ff, d, cfg.mlp_kind, cfg.mlp_rank, cfg.sparsity))
  n_matmul = L * (attn + mlp) + d * cfg.vocab_size
  return 6 * n_matmul + 12 * L * d * seq, n_matmul


def _mfu(flops_tok, tok_s):
  out = {"model_tflops": round(flops_tok * tok_s / 1e12, 2)}
  for key, peak_tf in (("spec_989", 989.0), ("issue_790", 790.0)):
    out[f"mfu_{key}"] = round(flops_tok * tok_s / (peak_tf * 1e12), 4)
  meas = RESULT.get("peak", {}).get("jax_bf16_tflops")
  if isinstance(meas, (int, float)) and meas > 0:
    out["mfu_measured_peak"] = round(flops_tok * tok_s / (meas * 1e12), 4)
  return out


def _fast_init(cfg, llama_cls, nnx):
  """Model state with the right shapes WITHOUT the per-layer SVD init (timing does not depend on values).

  Params ~ N(0, 0.02^2); LOST channel indices = sorted random subsets of the layer's input dim
  (d_ff for 'down', d_model otherwise).
  """
  abstract = nnx.eval_shape(lambda: llama_cls(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  leaves, treedef = jax.tree_util.tree_flatten(params)

  def draw(key):  # one compiled program for all leaves (not one per shape)
    keys = jax.random.split(key, len(leaves))
    return [(0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype) for k, s in zip(keys, leaves)]
  params = jax.tree_util.tree_unflatten(treedef, jax.jit(draw)(jax.random.key(0)))
  rng = np.random.default_rng(0)

  def fill_rest(path, s):
    name = jax.tree_util.keystr(path)
    if "idx" in name and jnp.issubdtype(s.dtype, jnp.integer):
      d_in = cfg.d_ff if "down" in name else cfg.d_model
      return jnp.asarray(np.sort(rng.choice(d_in, s.shape[0], replace=False)), s.dtype)
    return jnp.zeros(s.shape, s.dtype)
  rest = jax.tree_util.tree_map_with_path(fill_rest, rest)
  return graphdef, params, rest


def jax_train_step_bench(size, kind, seq, batch, sparse_impl="auto", attention_impl=None):
  """sparse_impl: a model.sparse_impl (sparse-path registry name, lostjax.kernels.registry), optionally with the
  suffix '-sep' (model.fuse_projections=False: q/k/v and gate/up one by one), then optionally '+contiguous_down'
  (model.lost_contiguous_down=True: down's sparse channels a slice)."""
  return _jax_train_step_bench(size, kind, seq, batch, sparse_impl, attention_impl, sparse_impl)


def _jax_train_step_bench(size, kind, seq, batch, sparse_impl, attention_impl, label):
  from flax import nnx

  from lostjax.models import Llama, preset
  contiguous = sparse_impl.endswith("+contiguous_down")  # model.lost_contiguous_down (LOST MLP)
  sparse_impl = sparse_impl.removesuffix("+contiguous_down")
  separate = sparse_impl.endswith("-sep")
  overrides = dict(dtype="bfloat16", param_dtype="float32", max_seq_len=max(1024, seq),
                   sparse_impl=sparse_impl.removesuffix("-sep"), attention_impl=attention_impl,
                   fuse_projections=not separate)
  if kind != "dense":
    overrides.update(attn_kind=kind, mlp_kind=kind, lost_contiguous_down=contiguous and kind == "lost")
  overrides.update(getattr(ARGS, "model_overrides", None) or {})  # e.g. n_layers=1 for smoke runs
  cfg = preset(size, **overrides)
  t0 = time.perf_counter()
  graphdef, params, rest = _fast_init(cfg, Llama, nnx)
  init_s = time.perf_counter() - t0
  dt, compile_s, loss = timed_adamw_steps(graphdef, params, rest, cfg.vocab_size, batch, seq, ARGS.model_steps,
                                          warmup=3)
  tok_s = batch * seq / dt
  flops_tok, n_matmul = model_flops_per_token(cfg, seq)
  row = {"framework": "jax", "size": size, "kind": kind, "seq": seq, "batch": batch,
         "sparse_impl": label, "attention_impl": attention_impl, "step_ms": round(1e3 * dt, 3),
         "tokens_per_s": round(tok_s, 1), "n_matmul_params": n_matmul,
         "flops_per_token": flops_tok, "init_s": round(init_s, 2), "compile_s": round(compile_s, 2),
         "loss": float(loss)}
  row.update(_mfu(flops_tok, tok_s))
  return row


def adamw_step(graphdef, params):
  """(jitted step(params, opt_state, rest, tokens) -> (params, opt_state, loss), initial opt_state): an AdamW
  LM step on the model `graphdef` (next-token cross-entropy)."""
  import optax
  from flax import nnx
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)

  def loss_fn(params, rest, tokens):
    logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state, rest, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, tx.init(params)


def timed_adamw_steps(graphdef, params, rest, vocab_size, batch, seq, steps, warmup=2):
  """(seconds per step, compile seconds, last loss) of a jitted AdamW LM step on random tokens."""
  step, opt_state = adamw_step(graphdef, params)
  tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, vocab_size, jnp.int32)
  t0 = time.perf_counter()
  params, opt_state, loss = step(params, opt_state, rest, tokens)
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup - 1):
    params, opt_state, loss = step(params, opt_state, rest, tokens)
  jax.block_until_ready(loss)
  t0 = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state, rest, tokens)
  jax.block_until_ready(loss)
  return (time.perf_counter() - t0) / steps, compile_s, loss


def model_section(deadline, plan):
  rows = []
  attn = ARGS.attention_impl
  for size, kind, seq, sparse_impl in plan:
    if _now() > deadline:
      rows.append({"size": size, "kind": kind, "seq": seq, "sparse_impl": sparse_impl,
                   "skipped": "section budget"})
      continue
    batch = max(1, ARGS.model_tokens // seq)
    try:
      rows.append(jax_train_step_bench(size, kind, seq, batch, sparse_impl, attn))
    except Exception as e:  # noqa: BLE001
      if attn == "cudnn":  # retry once with XLA attention and keep that as the default afterwards
        try:
          attn = None
          row = jax_train_step_bench(size, kind, seq, batch, sparse_impl, attn)
          row["note"] = "cudnn attention failed: " + _err(e)["error"][:200]
          rows.append(row)
          continue
        except Exception as e2:  # noqa: BLE001  -- not an attention problem: keep cudnn for the rest
          attn, e = ARGS.attention_impl, e2
      rows.append({"size": size, "kind": kind, "seq": seq, "sparse_impl": sparse_impl, **_err(e)})
    jax.clear_caches()
  dense = {(r["size"], r["seq"]): r["tokens_per_s"] for r in rows
           if r.get("kind") == "dense" and r.get("sparse_impl") == "auto" and "tokens_per_s" in r}
  for r in rows:
    if "tokens_per_s" in r and (r["size"], r["seq"]) in dense:
      r["speedup_vs_dense"] = round(r["tokens_per_s"] / dense[(r["size"], r["seq"])], 4)
  return {"tokens_per_step": ARGS.model_tokens, "rows": rows}


# ----------------------------------------------------------------------------- torch peer

def _torch_minimal_llama(cfg):
  """Minimal PyTorch LLaMA (RMSNorm, rotary 'rotate-half', SDPA causal attention, SwiGLU, untied head)."""
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  class RMSNorm(nn.Module):
    def __init__(self, d, eps):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(d))
      self.eps = eps

    def forward(self, x):
      x32 = x.float()
      y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
      return (y * self.weight).type_as(x)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      d, ff = cfg.d_model, cfg.d_ff
      self.n1, self.n2 = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
      self.qkv = nn.Linear(d, 3 * d, bias=False)
      self.o = nn.Linear(d, d, bias=False)
      self.gu = nn.Linear(d, 2 * ff, bias=False)
      self.down = nn.Linear(ff, d, bias=False)

    def forward(self, x, cos, sin):
      b, s, d = x.shape
      h = cfg.n_heads
      q, k, v = self.qkv(self.n1(x)).view(b, s, 3, h, d // h).transpose(1, 3).unbind(2)

      def rot(t):
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1).type_as(t)
      a = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
      x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
      g, u = self.gu(self.n2(x)).chunk(2, dim=-1)
      return x + self.down(F.silu(g) * u)

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
      self.blocks = nn.ModuleList([Block() for _ in range(cfg.n_layers)])
      self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
      self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens):
      s = tokens.shape[1]
      half = cfg.head_dim // 2
      freq = 1.0 / (cfg.rope_theta ** (torch.arange(half, device=tokens.device).float() / half))
      ang = torch.arange(s, device=tokens.device).float()[:, None] * freq[None]
      cos, sin = ang.cos()[None, None], ang.sin()[None, None]
      x = self.embed(tokens)
      for blk in self.blocks:
        x = blk(x, cos, sin)
      return self.head(self.norm(x))

  return Model()


def torch_train_step_bench(size, seq, batch, compile_model=False):
  """compile_model: False (eager), True (`torch.compile`, inductor) or a torch.compile backend name."""
  import torch
  import torch.nn.functional as F

  from lostjax.models import preset
  cfg = preset(size, max_seq_len=max(1024, seq), **(getattr(ARGS, "model_overrides", None) or {}))
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  impl = "minimal_torch_llama"
  try:
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM
    hf = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                  num_attention_heads=cfg.n_heads, num_hidden_layers=cfg.n_layers,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf)
    impl = "hf_LlamaForCausalLM_sdpa"
    fwd = lambda m, t: m(input_ids=t).logits
  except Exception as e:  # noqa: BLE001
    hf_error = f"{type(e).__name__}: {str(e)[:200]}"
    model = _torch_minimal_llama(cfg)
    fwd = lambda m, t: m(t)
  else:
    hf_error = None
  model = model.to(dev)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                          **({"fused": True} if dev == "cuda" else {}))
  if compile_model:
    run_model = torch.compile(model, backend=compile_model if isinstance(compile_model, str) else "inductor")
  else:
    run_model = model
  tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)
  amp_dtype = torch.bfloat16

  def step():
    with torch.autocast(device_type=dev, dtype=amp_dtype):
      logits = fwd(run_model, tokens[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  for _ in range(2):
    loss = step()
  sync()
  warm_s = time.perf_counter() - t0
  n = ARGS.model_steps
  t0 = time.perf_counter()
  for _ in range(n):
    loss = step()
  sync()
  dt = (time.perf_counter() - t0) / n
  tok_s = batch * seq / dt
  flops_tok, n_matmul = model_flops_per_token(cfg, seq)
  row = {"framework": "torch", "impl": impl, "compiled": compile_model, "size": size, "kind": "dense",
         "seq": seq, "batch": batch, "precision": "autocast bf16, f32 master weights, fused AdamW",
         "step_ms": round(1e3 * dt, 3), "tokens_per_s": round(tok_s, 1), "n_matmul_params": n_matmul,
         "flops_per_token": flops_tok, "warmup_s": round(warm_s, 2), "loss": float(loss.detach())}
  if hf_error:
    row["transformers_error"] = hf_error
  row.update(_mfu(flops_tok, tok_s))
  del model, opt
  if dev == "cuda":
    torch.cuda.empty_cache()
  return row


def torch_section(deadline, plan):
  rows = []
  for size, seq, compiled in plan:
    if _now() > deadline:
      rows.append({"size": size, "seq": seq, "compiled": compiled, "skipped": "section budget"})
      continue
    try:
      rows.append(torch_train_step_bench(size, seq, max(1, ARGS.model_tokens // seq), compiled))
    except Exception as e:  # noqa: BLE001
      rows.append({"size": size, "seq": seq, "compiled": compiled, **_err(e)})
  jax_rows = RESULT.get("model", {}).get("rows", [])
  jax_dense = {(r["size"], r["seq"]): r["tokens_per_s"] for r in jax_rows
               if r.get("kind") == "dense" and r.get("sparse_impl") == "auto" and "tokens_per_s" in r}
  for r in rows:
    if "tokens_per_s" in r and (r["size"], r["seq"]) in jax_dense:
      r["jax_dense_over_torch"] = round(jax_dense[(r["size"], r["seq"])] / r["tokens_per_s"], 4)
  return {"rows": rows}


# ----------------------------------------------------------------------------- main

def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, < 1 min)")
  ap.add_argument("--total-budget-s", type=float, default=450.0)
  ap.add_argument("--only", default="", help="comma list of sections to run (default: all)")
  ap.add_argument("--budgets", default="",
                  help="per-section seconds overriding the defaults, e.g. 'layers=90,model=330,torch=120'")
  ap.add_argument("--sizes", default="", help="per-layer section sizes, e.g. '1b,350m' (default 350m,60m,130m,1b)")
  args = ap.parse_args(argv)
  sizes_arg, budgets_arg = args.sizes, args.budgets
  all_variants = [v for v in layer_bench.LAYER_VARIANTS + layer_bench.SPARSE_VARIANTS
                  if not v.endswith("_tpu")]  # the TPU kernel is timed by bench/sparse_tpu.py
  if args.smoke:
    args.tokens, args.dtype, args.reps, args.peak_n = 128, "float32", 2, 256
    args.sizes, args.check_size, args.check_layers = ["tiny"], "tiny", 1
    args.variants = all_variants
    args.sweep_blocks = [(16, 16, 16), (32, 32, 16)]
    args.model_tokens, args.model_steps = 64, 2
    args.model_plan = [("tiny", "dense", 32, "auto"), ("tiny", "lost", 32, "auto"),
                       ("tiny", "lost", 32, "fused_concat"), ("tiny", "lost", 32, "fused_onehot"),
                       ("tiny", "dense", 32, "auto-sep"),
                       ("tiny", "lost", 32, "fused_concat-sep")]
    args.torch_plan = [("tiny", 32, False)]
    args.attention_impl = None
    args.budgets_map = dict(peak=20, check=40, sweep=40, layers=60, model=90, torch=60)
  else:
    args.tokens, args.dtype, args.reps, args.peak_n = 256 * 64, "bfloat16", 20, 8192
    args.sizes, args.check_size, args.check_layers = ["350m", "60m", "130m", "1b"], "350m", 3
    args.variants = all_variants
    args.sweep_blocks = [(64, 64, 32), (64, 128, 32), (128, 128, 32), (128, 64, 64), (32, 64, 16),
                         (128, 128, 64)]
    args.model_tokens, args.model_steps = 16384, 10
    # 'auto' is the model default (gather_xla on GPU, lostjax.kernels.registry.AUTO); 'pallas_gpu',
    # 'gather_onehot_grad' and 'fused_concat' (one GEMM per layer, q/k/v and gate/up sharing one down-projection
    # GEMM and one gather; 'fused_onehot': the selection inside that GEMM as one-hot columns, no gather/scatter)
    # are the candidates to re-time in the whole model; '-sep' rows time q/k/v and gate/up one by one.
    args.model_plan = [("350m", "dense", 1024, "auto"), ("350m", "lost", 1024, "auto"),
                       ("350m", "lost", 1024, "fused_concat"), ("350m", "lost", 1024, "fused_onehot"),
                       ("350m", "lost", 1024, "gather_onehot_grad"),
                       ("350m", "lost", 1024, "pallas_gpu"), ("350m", "dense", 1024, "auto-sep"),
                       ("350m", "dense", 256, "auto"), ("350m", "lost", 256, "auto"),
                       ("130m", "dense", 256, "auto"), ("130m", "lost", 256, "auto"),
                       ("130m", "dense", 1024, "auto"), ("130m", "lost", 1024, "auto"),
                       ("350m", "lost", 256, "pallas_gpu")]
    args.torch_plan = [("350m", 1024, False), ("350m", 256, False), ("130m", 256, False),
                       ("130m", 1024, False), ("350m", 1024, True)]
    args.attention_impl = "cudnn"
    args.budgets_map = dict(peak=20, check=30, sweep=40, layers=110, model=170, torch=80)
  args.only = [s for s in args.only.split(",") if s]
  for item in filter(None, budgets_arg.split(",")):
    name, _, val = item.partition("=")
    if name not in args.budgets_map:
      raise SystemExit(f"--budgets: unknown section {name!r}; expected one of {sorted(args.budgets_map)}")
    args.budgets_map[name] = float(val)
  args.budgets = args.budgets_map
  if sizes_arg:
    args.sizes = [s for s in sizes_arg.split(",") if s]
    args.check_size = args.sizes[0]
  return args


def main(argv=None):
  global ARGS, T_START
  ARGS = parse(argv)
  T_START = time.time()
  out_dir = os.environ.get("OUT")
  out_path = os.path.join(out_dir, "layers_gpu.json") if out_dir else None
  RESULT.clear()
  RESULT["command"] = "python bench/layers_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
  RESULT["env"] = env_info()
  b = ARGS.budgets
  sections = [
      ("peak", lambda: section("peak", b["peak"], out_path)(peak)()),
      ("check", lambda: section("check", b["check"], out_path)(pallas_check)()),
      ("sweep", lambda: section("sweep", b["sweep"], out_path)(pallas_sweep)()),
      ("layers", lambda: section("layers", b["layers"], out_path)(per_layer)()),
      ("model", lambda: section("model", b["model"], out_path)(model_section)(ARGS.model_plan)),
      ("torch", lambda: section("torch", b["torch"], out_path)(torch_section)(ARGS.torch_plan)),
  ]
  for name, run in sections:
    if ARGS.only and name not in ARGS.only:
      continue
    run()
  text = _write(out_path)
  if not out_path:
    print(text)
  else:
    print(f"wrote {out_path}", file=sys.stderr)
  return RESULT


if __name__ == "__main__":
  main()
