"""Model FLOPs per token and per-device peak FLOP/s, for the MFU logged beside tokens/s.

FLOPs per token of one training step (forward + backward), the convention of BENCHMARKS.md (PaLM, "PaLM: Scaling
Language Modeling with Pathways", arXiv 2204.02311, appendix B):
    flops_per_token = 6 · N_matmul + 12 · L · d · T
where N_matmul counts the weights every token multiplies: each attention/MLP projection as built (dense d_in·d_out,
with grouped-query attention K and V of d_out = n_kv_heads·head_dim;
low-rank r·(d_in + d_out); LOST r·(d_in + d_out) + k·d_out with k = ⌊s·d_in⌋ kept input channels), the LM head
d·V (also when tied to the embedding: the product is computed either way; not the input lookup), and for a mixture of experts only the top_k routed experts' MLPs plus the
router d·E. The attention term 12·L·d·T counts the full T×T score and value products (no causal halving; the
same with grouped-query attention, whose every query head still scores T keys). Not counted: norms, RoPE (with
or without the Llama-3 frequency scaling, which only changes its constant frequencies), SwiGLU, softmax,
gathers, the optimizer.

MFU = tokens/s · flops_per_token / (devices · peak FLOP/s per device). Peak: `train.peak_flops_per_device` when > 0,
else `PEAK_FLOPS` by the device kind (dense bf16 matmul peak from the vendors' data sheets), else none (CPU: MFU is
not logged).
"""

from __future__ import annotations

from lostjax.layers.lost import num_sparse_channels

# Dense bf16 peak FLOP/s per device (one chip; one GPU), keyed by a lower-case substring of jax's device_kind.
# Longer keys are matched first ("v5 lite" before "v5").
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,   # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,        # v5p reports "TPU v5"
    "tpu v6 lite": 918e12,   # v6e (Trillium)
    "tpu v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,          # SXM
    "h200": 989e12,
}


# `--device=<name>` of --summary_only: memory per device (one TPU chip, one GPU) in GiB, the HBM capacity on the
# vendors' spec sheets (Google Cloud TPU system architecture pages; NVIDIA A100/H100/H200/B200/L4/T4 and AMD MI300X
# data sheets). NVIDIA's "80 GB" HBM stacks hold 80 GiB; the runtime keeps a little for itself, which the fit
# check's 10 % headroom (train/summary.py FIT_FRACTION) covers. A device's own memory_stats() is exact.
DEVICES = {
    "v4": (32, "TPU v4, 32 GiB HBM2 per chip"),
    "v5e": (16, "TPU v5e, 16 GiB HBM2 per chip"),
    "v5p": (95, "TPU v5p, 95 GiB HBM2e per chip"),
    "v6e": (32, "TPU v6e (Trillium), 32 GiB HBM per chip"),
    "a100-40": (40, "NVIDIA A100 40GB, HBM2"),
    "a100-80": (80, "NVIDIA A100 80GB, HBM2e"),
    "h100": (80, "NVIDIA H100 SXM/PCIe, 80 GB HBM3"),
    "h100-nvl": (94, "NVIDIA H100 NVL, 94 GB HBM3"),
    "h200": (141, "NVIDIA H200, 141 GB HBM3e"),
    "b200": (180, "NVIDIA B200 (HGX), 180 GB HBM3e"),
    "l4": (24, "NVIDIA L4, 24 GB GDDR6"),
    "t4": (16, "NVIDIA T4, 16 GB GDDR6"),
    "mi300x": (192, "AMD Instinct MI300X, 192 GB HBM3"),
}
# Device memory per device in bytes (HBM), for --summary_only's fit check when the device does not report it:
# the device_kind substrings jax reports, each mapped to its entry of DEVICES (longer keys are matched first).
DEVICE_MEMORY = {kind: DEVICES[name][0] * 2**30 for kind, name in {
    "tpu v4": "v4",
    "tpu v5 lite": "v5e",
    "tpu v5e": "v5e",
    "tpu v5p": "v5p",
    "tpu v5": "v5p",
    "tpu v6 lite": "v6e",
    "tpu v6e": "v6e",
    "a100": "a100-80",     # the 40 GB part reports its own limit through memory_stats()
    "h100": "h100",
    "h200": "h200",
}.items()}


def named_device_memory(name: str) -> tuple[float, str]:
  """(bytes, description) of a `--device` name; ValueError naming the closest known name."""
  from train.cli import did_you_mean
  key = (name or "").strip().lower()
  if key not in DEVICES:
    raise ValueError(f"unknown --device={name!r} (known: {', '.join(DEVICES)}){did_you_mean(key, DEVICES)}")
  gib, what = DEVICES[key]
  return gib * 2.0 ** 30, what


def _lookup(table: dict, device_kind: str):
  kind = (device_kind or "").lower()
  for key in sorted(table, key=len, reverse=True):
    if key in kind:
      return table[key]
  return None


def peak_flops(device_kind: str, override: float = 0.0) -> float | None:
  """Peak FLOP/s per device: `override` if > 0, else the table entry for `device_kind`, else None (e.g. CPU)."""
  if isinstance(override, bool) or not isinstance(override, (int, float)) or override < 0:
    raise ValueError(f"train.peak_flops_per_device must be a number >= 0 (0 = look up), got {override!r}")
  if override > 0:
    return float(override)
  return _lookup(PEAK_FLOPS, device_kind)


def device_memory(device_kind: str) -> float | None:
  """HBM bytes per device for a known accelerator kind, else None."""
  return _lookup(DEVICE_MEMORY, device_kind)


def _proj(kind: str, d_in: int, d_out: int, rank: int, sparsity: float) -> int:
  if kind == "dense":
    return d_in * d_out
  if kind == "lowrank":
    return rank * (d_in + d_out)
  if kind == "lost":
    return rank * (d_in + d_out) + num_sparse_channels(d_in, sparsity) * d_out
  if kind == "sltrain":   # the forward multiplies by the dense W = A·B + S
    return d_in * d_out
  raise ValueError(f"unknown linear kind {kind!r} for the FLOP count")


def matmul_params(mc) -> int:
  """N_matmul: weights each token multiplies (projections as built, active experts, router, LM head)."""
  d, ff = mc.d_model, mc.d_ff
  kv = getattr(mc, "kv_dim", d)   # grouped-query attention: K and V are kv_heads · head_dim wide
  attn = 2 * _proj(mc.attn_kind, d, d, mc.attn_rank, mc.sparsity) + 2 * _proj(mc.attn_kind, d, kv, mc.attn_rank,
                                                                               mc.sparsity)
  mlp = 2 * _proj(mc.mlp_kind, d, ff, mc.mlp_rank, mc.sparsity) + _proj(mc.mlp_kind, ff, d, mc.mlp_rank, mc.sparsity)
  if mc.moe_experts:
    mlp = mc.moe_top_k * mlp + d * mc.moe_experts
  return mc.n_layers * (attn + mlp) + d * mc.vocab_size


def flops_per_token(mc, seq_len: int) -> float:
  """Training FLOPs per token: 6 · N_matmul + 12 · L · d · seq_len."""
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
  return 6.0 * matmul_params(mc) + 12.0 * mc.n_layers * mc.d_model * seq_len
