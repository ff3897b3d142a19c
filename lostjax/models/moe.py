"""Mixture-of-experts SwiGLU MLP: token-choice top-k routing, capacity or dropless dispatch, load-balancing loss.

Routing and auxiliary loss follow
  * "Switch Transformers: Scaling to Trillion Parameter Models with Simple and Efficient Sparsity"
    (Fedus, Zoph, Shazeer; arXiv 2101.03961), §2.1 (capacity factor, dropped tokens pass through the residual)
    and eq. 4-6 (load-balancing loss), and
  * "GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding" (Lepikhin et al.;
    arXiv 2006.16668), §2.2 / Algorithm 1 (top-2 gating, per-expert capacity, first choices served first).
The routing decisions are also returned (`Llama.route`) because "Where to find Grokking in LLM Pretraining?
Monitor Memorization-to-Generalization without Test" (Li, Fan, Zhou; arXiv 2506.21551) reads generalisation off
the experts a sample is routed through (`lostjax.metrics.pathways`).

For the tokens x_t (t < T, flattened batch × sequence) of one layer with E experts and top-k routing:

  p_t   = softmax(x_t W_r)                       router in float32, W_r: [d_model, E]
  S_t   = top-k(p_t)                              the k experts with the largest probabilities
  g_t,e = p_t,e / Σ_{e' ∈ S_t} p_t,e'   (e ∈ S_t)  renormalised gates (they sum to 1 over the chosen experts)
  y_t   = Σ_{e ∈ S_t, kept} g_t,e · SwiGLU_e(x_t)  SwiGLU_e(x) = down_e(silu(gate_e(x)) ⊙ up_e(x))
  aux   = E · Σ_e f_e · P_e,   f_e = |{(t, j): S_t[j] = e}| / (T·k),   P_e = (1/T) Σ_t p_t,e

Choices (the papers leave them open or differ between them):
  * Gates are renormalised over the top-k (GShard renormalises its top-2; Switch's top-1 gate is the raw
    probability, which with k = 1 here becomes 1). With renormalisation the output scale does not depend on k or on
    how peaked the router is; the router still learns through the relative gate values and the aux loss.
  * f_e counts all T·k assignments (a fraction summing to 1; GShard counts only first choices). The loss is 1 for
    perfectly uniform routing, for every k. f carries no gradient; P does. Padded tokens are routed and counted
    like the others (the model has no mask).
  * Capacity mode (capacity_factor > 0): expert e keeps at most C = min(T, ⌈cf·T·k/E⌉) assignments; assignments
    are served in the order (choice j, token t): all first choices before any second choice (GShard), tokens in
    sequence order within a choice. A dropped assignment contributes nothing (the token keeps the residual and
    its other, kept experts — gates are not renormalised again). `dropped_frac` = dropped assignments / (T·k).
  * Dropless mode (capacity_factor = 0): every assignment is computed. The assignments are sorted by expert and
    each expert's list is padded to a multiple of a block of B = ⌈T·k/(4E)⌉ rows (at most T·k + E·(B−1) rows,
    ≈ 1.25·T·k); each block gathers the weights of its expert (a copy of ≤ 5E experts' weights per layer) and
    all blocks run as one batched call. No work is spent on experts' unused capacity.
  * The experts are `nnx.vmap`-stacked `Mlp`s, so they use any linear kind (`make_linear`: dense, low-rank, LOST,
    each expert with its own LOST channel set) and carry the logical axis `expert` in front of every parameter
    (`lostjax.sharding` maps it to the `expert` mesh axis).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lostjax.layers import make_linear
from lostjax.models.config import LlamaConfig

# Dropless mode: blocks per expert at perfect balance (B = ⌈T·k / (BLOCKS_PER_EXPERT·E)⌉ rows per block).
BLOCKS_PER_EXPERT = 4


class Plan(NamedTuple):
  """Where each assignment goes. Assignments are numbered i = j·T + t (choice j of token t).

  slot_src: [S] int32, the assignment computed in slot s (T·k = empty slot); S = groups × rows.
  group_expert: [groups] int32, the expert of each group of rows (capacity mode: arange(E)).
  kept: [T·k] bool, whether assignment i is computed.
  """
  slot_src: jax.Array
  group_expert: jax.Array
  kept: jax.Array
  groups: int
  rows: int


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Per-expert capacity min(T, ⌈cf·T·k/E⌉) (an expert gets at most one assignment per token)."""
  return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def dispatch_plan(ids: jax.Array, num_experts: int, capacity_factor: float) -> Plan:
  """Slots for the expert assignments `ids` [T, k] (see the module docstring for the order and the modes)."""
  t, k = ids.shape
  n, e = t * k, num_experts
  flat = ids.T.reshape(-1).astype(jnp.int32)                 # i = j·T + t: first choices first
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)    # by expert, priority order kept within an expert
  expert_sorted = flat[order]
  counts = jnp.bincount(flat, length=e)
  starts = jnp.cumsum(counts) - counts
  rank = jnp.arange(n, dtype=jnp.int32) - starts[expert_sorted]   # position of the assignment in its expert
  if capacity_factor > 0:
    rows, groups = capacity(t, k, e, capacity_factor), e
    keep_sorted = rank < rows
    slot = jnp.where(keep_sorted, expert_sorted * rows + rank, groups * rows)   # out of range: dropped
    group_expert = jnp.arange(e, dtype=jnp.int32)
  else:
    rows = max(1, math.ceil(n / (BLOCKS_PER_EXPERT * e)))
    groups = (n + e * (rows - 1)) // rows                     # ≥ Σ_e ⌈count_e / rows⌉ for any counts
    padded = (counts + rows - 1) // rows * rows
    ends = jnp.cumsum(padded)
    slot = (ends - padded)[expert_sorted] + rank
    keep_sorted = jnp.ones((n,), bool)
    group_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(groups) * rows, side="right"), e - 1)
    group_expert = group_expert.astype(jnp.int32)
  slot_src = jnp.full((groups * rows,), n, jnp.int32).at[slot].set(order, mode="drop")
  kept = jnp.zeros((n,), bool).at[order].set(keep_sorted)
  return Plan(slot_src, group_expert, kept, groups, rows)


def load_balancing_loss(probs: jax.Array, ids: jax.Array) -> jax.Array:
  """E · Σ_e f_e · P_e for router probabilities [T, E] and chosen experts [T, k] (1.0 when uniform)."""
  e = probs.shape[-1]
  f = jnp.bincount(ids.reshape(-1), length=e).astype(jnp.float32) / ids.size
  return e * jnp.sum(jax.lax.stop_gradient(f) * jnp.mean(probs.astype(jnp.float32), axis=0))


class MoeMlp(nnx.Module):
  """x [batch, seq, d_model] -> (y, aux): routed SwiGLU experts (see the module docstring).

  aux: `aux_loss` (unweighted E·Σ f·P), `dropped_frac`, and per token `expert_ids` / `expert_gates`
  [batch, seq, k] and `router_probs` [batch, seq, E] (float32).
  """

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    from lostjax.models.llama import Mlp  # the expert is the dense model's SwiGLU MLP (llama imports this module)
    if cfg.moe_experts < 1 or cfg.moe_top_k > cfg.moe_experts:
      raise ValueError(f"MoeMlp needs 1 <= model.moe_top_k <= model.moe_experts, got top_k={cfg.moe_top_k}, "
                       f"experts={cfg.moe_experts}")
    self.cfg = cfg
    self.num_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
    self.capacity_factor = float(cfg.moe_capacity_factor)
    self.router = make_linear("dense", cfg.d_model, cfg.moe_experts, rngs=rngs, axes=("embed", None),
                              init_std=cfg.init_std, dtype="float32", param_dtype=cfg.param_dtype)

    @nnx.split_rngs(splits=cfg.moe_experts)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "expert"})
    def experts(r):
      return Mlp(cfg, r)

    self.experts = experts(rngs)

  def route(self, x2: jax.Array):
    """x2 [T, d] -> (probs [T, E], ids [T, k] int32, gates [T, k]) in float32."""
    probs = jax.nn.softmax(self.router(x2.astype(jnp.float32)), axis=-1)
    top, ids = jax.lax.top_k(probs, self.top_k)
    return probs, ids.astype(jnp.int32), top / jnp.sum(top, axis=-1, keepdims=True)

  def __call__(self, x: jax.Array):
    b, s, d = x.shape
    t, k = b * s, self.top_k
    x2 = x.reshape(t, d)
    probs, ids, gates = self.route(x2)
    plan = dispatch_plan(ids, self.num_experts, self.capacity_factor)
    n = t * k
    valid = plan.slot_src < n
    token = jnp.where(valid, plan.slot_src % t, t)            # row t of the padded input is zeros
    gate = jnp.where(valid, jnp.concatenate([gates.T.reshape(-1), jnp.zeros((1,), gates.dtype)])[plan.slot_src], 0)
    x_pad = jnp.concatenate([x2, jnp.zeros((1, d), x2.dtype)])
    xs = x_pad[token].reshape(plan.groups, plan.rows, d)
    graphdef, state = nnx.split(self.experts)
    if self.capacity_factor <= 0:   # dropless: each block of rows runs with its expert's weights
      state = jax.tree.map(lambda v: v[plan.group_expert], state)
    ys = jax.vmap(lambda st, xb: nnx.merge(graphdef, st)(xb))(state, xs)
    contrib = ys.reshape(-1, d).astype(jnp.float32) * gate[:, None]
    y = jnp.zeros((t + 1, d), jnp.float32).at[token].add(contrib)[:t]
    aux = {
        "aux_loss": load_balancing_loss(probs, ids),
        "dropped_frac": jnp.mean((~plan.kept).astype(jnp.float32)),
        "expert_ids": ids.reshape(b, s, k),
        "expert_gates": gates.reshape(b, s, k),
        "router_probs": probs.reshape(b, s, self.num_experts),
    }
    return y.reshape(b, s, d).astype(x.dtype), aux


def reduce_aux(cfg: LlamaConfig, per_layer: list[dict]) -> dict:
  """The model-level aux values from the per-layer dicts: {} for a dense model, else float32 scalars
  `moe_aux_loss` = moe_aux_weight · mean over layers of E·Σ f·P, and `moe_dropped_frac` (mean over layers)."""
  layers = [a for a in per_layer if "aux_loss" in a]
  if not layers:
    return {}
  mean = lambda key: jnp.mean(jnp.stack([a[key] for a in layers])).astype(jnp.float32)
  return {"moe_aux_loss": jnp.float32(cfg.moe_aux_weight) * mean("aux_loss"), "moe_dropped_frac": mean("dropped_frac")}


class Routing(NamedTuple):
  """Per-token routing of every layer: ids / gates [layers, batch, seq, top_k], probs [layers, batch, seq, E]."""
  ids: jax.Array
  gates: jax.Array
  probs: jax.Array
