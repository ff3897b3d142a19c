"""Train-step throughput on the current JAX backend: lostjax dense vs LOST, the PyTorch/HF peer, matmul peak.

Train-step benchmark. In ONE process, round-robin (each timing round runs every variant once, so the ratios share
the machine's noise):
  * lostjax train steps built exactly like `train.trainer.train` builds them (`train.state.create_train_state`, the optimizer from
    `train.optimizer` (AdamW + global-norm clip 1.0, warmup-cosine schedule), `train.step.make_train_step`,
    `jax.jit(..., donate_argnums=(0,))`; synthetic uniform tokens. Variants: tiny and 60m presets, dense and LOST
    (60M LOST: r=128, s=0.05 -> k=25 channels for d_in=512, 68 for d_in=1376), plus 60m low-rank (r=128, no
    sparse branch) as a diagnostic for the cost of the sparse gather/scatter;
  * the same 60M dense config as a Hugging Face `transformers.LlamaForCausalLM` training step in PyTorch
    (eager, fp32, sdpa attention, untied head, cross-entropy on the T next tokens, clip_grad_norm_(1.0),
    torch.optim.AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0) — the defaults the GaLore/FRUGAL
    C4 scripts run with);
  * a plain 2048^3 fp32 matmul in JAX and in PyTorch (the FLOP/s denominator);
  * a 60M LM-head + softmax-cross-entropy forward/backward alone (JAX), to see its share of the step.

FLOPs per step (stated, counted explicitly from the built parameter trees):
  flops = tokens * (6 * N_matmul + 12 * L * d * T)
  N_matmul: every parameter that multiplies an activation once per token — all 2-D Params except the input
  embedding table (dense projections d_in*d_out, LOST/low-rank factors r*(d_in + d_out), LOST sparse rows
  k*d_out, the LM head d*V). 6 = 2 (forward) + 4 (backward dX and dW). The attention term counts QK^T and AV
  over the full T x T square (no causal halving; PaLM appendix B convention). Norms, RoPE, SwiGLU, softmax,
  the sparse gather/scatter and the optimizer are not counted, so "achieved FLOP/s" is a lower bound on the
  hardware rate. The torch model gets the same formula (its nn.Linear weights incl. lm_head).

  python bench/train_step.py                       # batch 4 x seq 256, 2 warm-up + 4 timed rounds, ~5 min idle
  python bench/train_step.py --batch 8 --steps 7   # more tokens per step / more samples
  python bench/train_step.py --variants tiny/dense,tiny/lost --no-torch   # quick smoke
  Variant syntax: <size>/<method>[-sep][@<sparse_impl>][%<field>=<value>...][+<xla_option>=<value>...]; "+" compiles
  the step with
  XLA compiler options (e.g. 60m/dense+xla_cpu_use_onednn=true), "%<field>=<value>" sets a model config field
  (e.g. 60m/lost%lost_contiguous_down=true); "-sep" computes q/k/v and gate/up one by one
  (model.fuse_projections=False) instead of together; <sparse_impl> is a sparse-path name of
  lostjax.kernels.registry (auto, gather_xla, gather_onehot_grad, fused_concat, fused_onehot, pallas_gpu,
  pallas_tpu), e.g. 60m/lost@gather_xla.

Prints one JSON object (also written to --out if given).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train import cpu_malloc  # noqa: E402

# As train.main does, before numpy/JAX start threads (LOSTJAX_MALLOC_TUNING=off to compare without).
MALLOC_TUNED = cpu_malloc.tune()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from train.configs.llama import get_config  # noqa: E402
from train.step import make_train_step  # noqa: E402
from train import state as state_lib  # noqa: E402

DEFAULT_VARIANTS = "tiny/dense,tiny/lost,60m/dense,60m/lost,60m/lowrank"


# ----------------------------------------------------------------------------- lostjax


def _matmul_params(params) -> int:
  """Sum of sizes of 2-D Params except the input embedding table (see the module docstring)."""
  n = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if np.ndim(leaf) == 2 and "embedding" not in keys:
      n += int(np.size(leaf))
  return n


def build_lostjax(size: str, method: str, batch: int, seq: int, seed: int = 0):
  """(step_fn, state, rest, batch, info): the jitted, donating train step exactly as trainer.train builds it."""
  method, *opts = method.split("+")                # e.g. "dense+xla_cpu_use_onednn=true": XLA compiler options
  method, *fields = method.split("%")              # e.g. "lost%lost_contiguous_down=true": model config fields
  method, _, sparse_impl = method.partition("@")   # e.g. "lost@fused_onehot" sets model.sparse_impl
  separate = method.endswith("-sep")               # e.g. "dense-sep": model.fuse_projections=False
  method = method.removesuffix("-sep")
  cfg = get_config(f"{size},{method}")
  if sparse_impl:
    cfg.model.sparse_impl = sparse_impl
  for name, _, value in (f.partition("=") for f in fields):
    cfg.model[name] = type(cfg.model[name])(value.lower() == "true" if isinstance(cfg.model[name], bool) else value)
  cfg.model.fuse_projections = not separate
  cfg.train.global_batch = batch
  cfg.train.seq_len = seq
  cfg.train.steps = 1000
  cfg.mesh.num_devices = 1
  cfg.train.seed = seed
  t0 = time.perf_counter()
  run = state_lib.create_train_state(cfg, mesh=state_lib.make_mesh(cfg))
  model_cfg, graphdef, state, rest = run.model_cfg, run.graphdef, run.state, run.rest
  params, tx, schedule = state["params"], run.tx, run.schedule
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  step_fn = jax.jit(make_train_step(graphdef, tx, schedule, cfg), donate_argnums=(0,))
  rng = np.random.default_rng(seed)
  data = {"tokens": jnp.asarray(rng.integers(0, model_cfg.vocab_size, (batch, seq + 1)), jnp.int32),
          "ids": jnp.arange(batch, dtype=jnp.int32)}
  if opts:  # the same step compiled with XLA options (DebugOptions fields), for in-process A/B timings
    options = {k: {"true": True, "false": False}.get(v.lower(), v) for k, _, v in (o.partition("=") for o in opts)}
    step_fn = step_fn.lower(state, rest, data).compile(compiler_options=options)
  n_mm = _matmul_params(params)
  n_total = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
  flops_per_token = 6 * n_mm + 12 * model_cfg.n_layers * model_cfg.d_model * seq
  info = {"params_total": n_total, "params_matmul": n_mm, "flops_per_token": flops_per_token,
          "flops_per_step": flops_per_token * batch * seq, "init_s": round(init_s, 2),
          "d_model": model_cfg.d_model, "d_ff": model_cfg.d_ff, "n_layers": model_cfg.n_layers,
          "vocab": model_cfg.vocab_size, "rank": model_cfg.attn_rank if method != "dense" else None,
          "sparsity": model_cfg.sparsity if method == "lost" else None}
  return step_fn, state, rest, data, info


class JaxRunner:
  def __init__(self, size, method, batch, seq):
    self.step_fn, self.state, self.rest, self.data, self.info = build_lostjax(size, method, batch, seq)

  def __call__(self):
    self.state, metrics = self.step_fn(self.state, self.rest, self.data)
    jax.block_until_ready((self.state, metrics))
    self.loss = float(metrics["loss"])


class LmHeadRunner:
  """60M LM head + softmax cross-entropy, forward and backward (dx and dW) on [batch*seq, d] activations."""

  def __init__(self, batch, seq, d=512, vocab=32000):
    import optax
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    self.h = jax.random.normal(k1, (batch * seq, d), jnp.float32)
    self.w = 0.02 * jax.random.normal(k2, (d, vocab), jnp.float32)
    self.y = jax.random.randint(k3, (batch * seq,), 0, vocab)

    def loss(h, w, y):
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(h @ w, y))
    self.fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    self.info = {"flops_per_step": 6 * d * vocab * batch * seq}

  def __call__(self):
    jax.block_until_ready(self.fn(self.h, self.w, self.y))


class JaxMatmul:
  def __init__(self, n=2048):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    self.a = jax.random.normal(k1, (n, n), jnp.float32)
    self.b = jax.random.normal(k2, (n, n), jnp.float32)
    self.fn = jax.jit(jnp.dot)
    self.info = {"flops_per_step": 2 * n ** 3}

  def __call__(self):
    jax.block_until_ready(self.fn(self.a, self.b))


# ----------------------------------------------------------------------------- PyTorch / Hugging Face


class TorchHFRunner:
  """transformers.LlamaForCausalLM, 60M GaLore/LOST shape (configs/llama_60m.json), eager fp32 AdamW step."""

  def __init__(self, size, batch, seq, threads=0):
    import torch
    import torch.nn.functional as F
    self.threads = threads  # 0: torch's default (physical cores); else set for this runner's calls only
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM
    from lostjax.models import preset
    c = preset(size)
    hf = HFConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                  num_attention_heads=c.n_heads, num_hidden_layers=c.n_layers, max_position_embeddings=1024,
                  rms_norm_eps=c.norm_eps, tie_word_embeddings=False, hidden_act="silu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    self.model = LlamaForCausalLM._from_config(hf, attn_implementation="sdpa", dtype=torch.float32)
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    init_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, c.vocab_size, (batch, seq + 1), generator=g)
    self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    self.torch, self.F = torch, F
    n_mm = sum(m.weight.numel() for m in self.model.modules() if isinstance(m, torch.nn.Linear))
    n_total = sum(p.numel() for p in self.model.parameters())
    fpt = 6 * n_mm + 12 * c.n_layers * c.d_model * seq
    self.info = {"impl": f"transformers {__import__('transformers').__version__} LlamaForCausalLM, "
                         f"attn={self.model.config._attn_implementation}, eager fp32, AdamW(foreach default)",
                 "params_total": n_total, "params_matmul": n_mm, "flops_per_token": fpt,
                 "flops_per_step": fpt * batch * seq, "init_s": round(init_s, 2),
                 "torch_threads": threads or torch.get_num_threads()}

  def __call__(self):
    torch, F = self.torch, self.F
    default_threads = torch.get_num_threads()
    if self.threads:
      torch.set_num_threads(self.threads)
    try:
      self._step(torch, F)
    finally:
      torch.set_num_threads(default_threads)

  def _step(self, torch, F):
    self.opt.zero_grad(set_to_none=True)
    logits = self.model(input_ids=self.x).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), self.y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.loss = loss.item()


class TorchMatmul:
  def __init__(self, n=2048):
    import torch
    g = torch.Generator().manual_seed(1)
    self.a = torch.randn(n, n, generator=g)
    self.b = torch.randn(n, n, generator=g)
    self.torch = torch
    self.info = {"flops_per_step": 2 * n ** 3}

  def __call__(self):
    self.torch.mm(self.a, self.b)


# ----------------------------------------------------------------------------- driver


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (the first one compiles)")
  p.add_argument("--steps", type=int, default=4, help="timed rounds; each round runs every variant once")
  p.add_argument("--variants", default=DEFAULT_VARIANTS,
                 help="comma list of <preset>/<dense|lowrank|lost>[-sep][@<model.sparse_impl>], e.g. 60m/lost@gather_xla")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch/HF peer and the torch matmul")
  p.add_argument("--no-lmhead", action="store_true", help="skip the 60M LM-head-alone timing")
  p.add_argument("--torch-1thread", type=int, default=1,
                 help="1: also time the HF step with torch.set_num_threads(1) (diagnostic for CPU contention)")
  p.add_argument("--out", default="", help="also write the JSON here")
  args = p.parse_args(argv)

  t_start = time.perf_counter()
  result = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "backend": jax.default_backend(), "devices": str(jax.devices()),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "malloc_tuned": MALLOC_TUNED,
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq,
            "warmup": args.warmup, "timed_rounds": args.steps,
            "flops_formula": "tokens * (6 * N_matmul + 12 * n_layers * d_model * seq); N_matmul = all 2-D "
                             "params except the input embedding (LOST: r*(d_in+d_out) + k*d_out per projection)"}
  runners, kinds = {}, {}
  runners["jax_matmul_2048"] = JaxMatmul()
  kinds["jax_matmul_2048"] = "matmul"
  if not args.no_torch:
    import torch
    result["torch"] = torch.__version__
    result["torch_threads"] = torch.get_num_threads()
    runners["torch_matmul_2048"] = TorchMatmul()
    kinds["torch_matmul_2048"] = "matmul"
  for v in [v.strip() for v in args.variants.split(",") if v.strip()]:
    size, method = v.split("/")
    runners[f"lostjax/{v}"] = JaxRunner(size, method, args.batch, args.seq)
    kinds[f"lostjax/{v}"] = "jax_step"
  if not args.no_torch:
    runners["torch_hf/60m/dense"] = TorchHFRunner("60m", args.batch, args.seq)
    kinds["torch_hf/60m/dense"] = "torch_step"
    if args.torch_1thread:
      runners["torch_hf/60m/dense@1thread"] = TorchHFRunner("60m", args.batch, args.seq, threads=1)
      kinds["torch_hf/60m/dense@1thread"] = "torch_step"
  if not args.no_lmhead:
    runners["lostjax_lm_head_ce/60m"] = LmHeadRunner(args.batch, args.seq)
    kinds["lostjax_lm_head_ce/60m"] = "component"

  # Warm-up (compilation included in the first call), timed separately.
  warm = {}
  for name, r in runners.items():
    ts = []
    for _ in range(max(args.warmup, 1)):
      t0 = time.perf_counter()
      r()
      ts.append(time.perf_counter() - t0)
    warm[name] = {"first_call_s": round(ts[0], 3), "warmup_s": [round(t, 3) for t in ts[1:]]}

  # Timed rounds: every variant once per round (matmuls 3x per round), so ratios share the noise.
  # Process CPU time (user+sys of all threads) is recorded too: less sensitive to other processes on the
  # machine than wall time, though spinning thread pools inflate it under contention.
  times = {name: [] for name in runners}
  cpu = {name: [] for name in runners}
  for _ in range(args.steps):
    for name, r in runners.items():
      for _ in range(3 if kinds[name] == "matmul" else 1):
        c0, t0 = time.process_time(), time.perf_counter()
        r()
        times[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)

  out = {}
  for name, r in runners.items():
    ts = times[name]
    med = statistics.median(ts)
    row = dict(getattr(r, "info", {}))
    row.update(warm[name])
    row.update({"median_s": round(med, 4), "min_s": round(min(ts), 4), "max_s": round(max(ts), 4),
                "n": len(ts), "cpu_s_median": round(statistics.median(cpu[name]), 4),
                "flops_per_s_median": row["flops_per_step"] / med,
                "flops_per_s_best": row["flops_per_step"] / min(ts)})
    if kinds[name] in ("jax_step", "torch_step"):
      row["tokens_per_s_median"] = round(args.batch * args.seq / med, 1)
      row["tokens_per_s_best"] = round(args.batch * args.seq / min(ts), 1)
      row["final_loss"] = getattr(r, "loss", None)
    out[name] = row

  peak_jax = out["jax_matmul_2048"]["flops_per_s_median"]
  peak_torch = out.get("torch_matmul_2048", {}).get("flops_per_s_median")
  for name, row in out.items():
    if kinds[name] in ("jax_step", "component"):
      row["frac_of_jax_matmul"] = round(row["flops_per_s_median"] / peak_jax, 3)
    if kinds[name] == "torch_step":
      row["frac_of_torch_matmul"] = round(row["flops_per_s_median"] / peak_torch, 3)
      row["frac_of_jax_matmul"] = round(row["flops_per_s_median"] / peak_jax, 3)
    for k in ("flops_per_s_median", "flops_per_s_best"):
      row[k] = f"{row[k] / 1e9:.1f} GFLOP/s"
  result["results"] = out

  def tps(name):
    return out[name]["tokens_per_s_median"] if name in out else None

  ratios = {}
  if tps("lostjax/60m/dense") and tps("torch_hf/60m/dense"):
    ratios["lostjax_dense_over_torch_hf_60m"] = round(tps("lostjax/60m/dense") / tps("torch_hf/60m/dense"), 3)
    ratios["target_lostjax_dense_over_torch"] = 1.0
  if tps("lostjax/60m/lost") and tps("lostjax/60m/dense"):
    ratios["lost_over_dense_60m"] = round(tps("lostjax/60m/lost") / tps("lostjax/60m/dense"), 3)
    ratios["target_lost_over_dense_60m"] = 1.4
    f_d, f_l = out["lostjax/60m/dense"]["flops_per_step"], out["lostjax/60m/lost"]["flops_per_step"]
    ratios["lost_over_dense_60m_flop_ratio_ideal"] = round(f_d / f_l, 3)
  if tps("lostjax/60m/lowrank") and tps("lostjax/60m/dense"):
    ratios["lowrank_over_dense_60m"] = round(tps("lostjax/60m/lowrank") / tps("lostjax/60m/dense"), 3)
  if tps("lostjax/tiny/lost") and tps("lostjax/tiny/dense"):
    ratios["lost_over_dense_tiny"] = round(tps("lostjax/tiny/lost") / tps("lostjax/tiny/dense"), 3)
  if "lostjax_lm_head_ce/60m" in out:
    head = out["lostjax_lm_head_ce/60m"]["median_s"]
    for v in ("dense", "lost", "lowrank"):
      if f"lostjax/60m/{v}" in out:
        ratios[f"lm_head_ce_share_of_60m_{v}_step"] = round(head / out[f"lostjax/60m/{v}"]["median_s"], 3)
  result["ratios"] = ratios
  result["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  result["wall_s"] = round(time.perf_counter() - t_start, 1)
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
