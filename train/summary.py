"""`--summary_only`: exact parameter counts, optimizer-state size and a device-memory estimate, without training.

Nothing is allocated: the model and the optimizer state are built with `nnx.eval_shape`/`jax.eval_shape`.

Memory estimate per device (bytes), for the chosen config and mesh:
  params         = parameter bytes / fsdp·tensor shards (param_dtype)
  grads          = same as params (float32 gradients of float32 parameters)
  optimizer      = optimizer-state bytes / fsdp·tensor shards (exact, from `optim.state_size`)
  activations    ≈ microbatch tokens per device × n_layers × (saved values per token per layer) × act bytes
                   + logits (float32 [tokens, vocab], twice for the softmax/cross-entropy backward),
  where the saved values per token per layer (no rematerialisation) are counted from the decoder's dataflow:
  attention 2 norms' inputs + q, k, v, attention output, o input (≈ 7·d) plus the MLP gate, up, SiLU and product
  (4·d_ff) and its input (d); LOST/low-rank layers add their rank-r (and k-column gather) intermediates.
  With model.remat=True only each block's input (d per token per layer) is kept, plus one block's worth.
This is an estimate for planning (XLA's buffer assignment can fuse or add temporaries); compare with
`jax.jit(step).lower(...).compile().memory_analysis()` on the target device when it matters.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from lostjax.layers.lost import num_sparse_channels
from lostjax.models import Llama, count_params
from lostjax.layers.common import resolve_dtype


def _vocab(cfg) -> int | None:
  if cfg.model.vocab_size:
    return None
  from train.data.tokenizers import make_tokenizer
  return make_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path).vocab_size


def activation_values_per_token_layer(mc) -> int:
  d, ff = mc.d_model, mc.d_ff
  # Mixture of experts: each token's top_k experts keep their SwiGLU values, plus per assignment the dispatched
  # input and the expert output (2·d) and per token the router probabilities (E); dropless padding is ignored.
  m = mc.moe_top_k if mc.moe_experts else 1
  base = 7 * d + m * 4 * ff + d + (2 * m * d + mc.moe_experts if mc.moe_experts else 0)
  extra = 0
  for kind, rank, shapes, copies in ((mc.attn_kind, mc.attn_rank, [(d, d)] * 4, 1),
                                     (mc.mlp_kind, mc.mlp_rank, [(d, ff), (d, ff), (ff, d)], m)):
    if kind in ("lowrank", "lost"):
      extra += copies * len(shapes) * rank
    if kind == "lost":
      extra += copies * sum(num_sparse_channels(din, mc.sparsity) for din, _ in shapes)
  return base + extra


def summarize(cfg) -> dict:
  import optim
  from train import optimizer as optim_lib
  from train.state import llama_config

  mc = llama_config(cfg, vocab_size=_vocab(cfg))
  abstract = nnx.eval_shape(lambda: Llama(mc, rngs=nnx.Rngs(0)))
  counts = count_params(abstract)
  params = nnx.state(abstract, nnx.Param)
  tx = optim_lib.build_optimizer(cfg.optim, optim_lib.lr_schedule(cfg.optim, cfg.train.steps))
  size = optim.state_size(tx, params)
  n_dev = cfg.mesh.num_devices or jax.device_count()
  t = cfg.train
  data = cfg.mesh.data if cfg.mesh.data > 0 else n_dev // (cfg.mesh.fsdp * cfg.mesh.tensor)
  model_shards = cfg.mesh.fsdp * cfg.mesh.tensor
  batch_shards = max(data * cfg.mesh.fsdp, 1)
  pbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
  act_bytes = np.dtype(resolve_dtype(mc.dtype)).itemsize
  tokens = (t.global_batch // t.grad_accum) * t.seq_len / batch_shards
  per_layer = activation_values_per_token_layer(mc)
  if mc.remat:
    act = tokens * (mc.n_layers * mc.d_model + per_layer) * act_bytes
  else:
    act = tokens * mc.n_layers * per_layer * act_bytes
  logits = 2 * tokens * mc.vocab_size * 4
  mem = {
      "params": pbytes / model_shards,
      "grads": pbytes / model_shards,
      "optimizer": size.bytes / model_shards,
      "activations": act + logits,
  }
  mem["total"] = sum(mem.values())
  gib = 2.0 ** 30
  return {
      "model": {"preset": cfg.model.get("preset", ""), "attn_kind": mc.attn_kind, "mlp_kind": mc.mlp_kind,
                "d_model": mc.d_model, "n_layers": mc.n_layers, "vocab_size": mc.vocab_size},
      "params": counts,
      "optimizer": {"name": cfg.optim.name, "state_elements": size.elements, "state_bytes": size.bytes,
                    "moment_elements": size.moment_elements, "moment_bytes": size.moment_bytes},
      "memory_estimate_per_device_bytes": {k: int(v) for k, v in mem.items()},
      "memory_estimate_per_device_gib": {k: round(v / gib, 4) for k, v in mem.items()},
      "devices": n_dev,
      "batch": {"global_batch": t.global_batch, "seq_len": t.seq_len, "grad_accum": t.grad_accum,
                "tokens_per_step": t.global_batch * t.seq_len},
  }
