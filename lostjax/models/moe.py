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
  * Dropless mode (capacity_factor = 0): every assignment is computed. The layer is compiled for a few static
    capacities (1.25 and 2 times the balanced load T·k/E, and T, which holds any routing) and `lax.switch` runs the
    smallest one that holds the busiest expert's load, so the result is exactly dropless while a balanced router
    pays about 1.25x the active compute (an expert that takes every token costs E/k times as much). This was
    faster on CPU than sorting the assignments into blocks with per-block gathered weights (docs/benchmarks/moe.md).
  * The experts are `nnx.vmap`-stacked `Mlp`s, so they use any linear kind (`make_linear`: dense, low-rank, LOST,
    each expert with its own LOST channel set) and carry the logical axis `expert` in front of every parameter
    (`lostjax.sharding` maps it to the `expert` mesh axis).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lostjax.layers import make_linear
from lostjax.models.config import LlamaConfig
from lostjax.models.mlp import Mlp  # the expert is the dense model's SwiGLU MLP

# Dropless mode: the capacities compiled, as multiples of the balanced load T·k/E; a last bucket of T never drops.
DROPLESS_BUCKETS = (1.25, 2.0)


class Plan(NamedTuple):
  """Where each assignment goes. Assignments are numbered i = j·T + t (choice j of token t).

  slot_src: [E·C] int32, the assignment computed in slot e·C + c of expert e (T·k = empty slot).
  kept: [T·k] bool, whether assignment i is computed.
  """
  slot_src: jax.Array
  kept: jax.Array
  rows: int


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Per-expert capacity min(T, ⌈cf·T·k/E⌉) (an expert gets at most one assignment per token)."""
  return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def dropless_capacities(num_tokens: int, top_k: int, num_experts: int) -> tuple[int, ...]:
  """The static capacities of dropless mode, ascending; the last is T (enough for any routing)."""
  caps = {capacity(num_tokens, top_k, num_experts, m) for m in DROPLESS_BUCKETS}
  return tuple(sorted(caps | {num_tokens}))


def dispatch_plan(ids: jax.Array, num_experts: int, rows: int) -> Plan:
  """Slots for the expert assignments `ids` [T, k] with `rows` slots per expert (see the module docstring)."""
  t, k = ids.shape
  n, e = t * k, num_experts
  flat = ids.T.reshape(-1).astype(jnp.int32)                 # i = j·T + t: first choices first
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)    # by expert, priority order kept within an expert
  expert_sorted = flat[order]
  counts = jnp.bincount(flat, length=e)
  starts = jnp.cumsum(counts) - counts
  rank = jnp.arange(n, dtype=jnp.int32) - starts[expert_sorted]   # position of the assignment in its expert
  keep_sorted = rank < rows
  slot = jnp.where(keep_sorted, expert_sorted * rows + rank, e * rows)   # out of range: dropped
  slot_src = jnp.full((e * rows,), n, jnp.int32).at[slot].set(order, mode="drop")
  kept = jnp.zeros((n,), bool).at[order].set(keep_sorted)
  return Plan(slot_src, kept, rows)


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
    t, k, e = b * s, self.top_k, self.num_experts
    x2 = x.reshape(t, d)
    probs, ids, gates = self.route(x2)
    graphdef, state = nnx.split(self.experts)

    def run(rows, state, x2, ids, gates):
      """The routed experts' output [T, d] (float32) with `rows` slots per expert, and the kept mask."""
      plan = dispatch_plan(ids, e, rows)
      n = t * k
      valid = plan.slot_src < n
      token = jnp.where(valid, plan.slot_src % t, t)            # row t of the padded input is zeros
      flat_gates = jnp.concatenate([gates.T.reshape(-1), jnp.zeros((1,), gates.dtype)])
      gate = jnp.where(valid, flat_gates[plan.slot_src], 0.0)
      x_pad = jnp.concatenate([x2, jnp.zeros((1, d), x2.dtype)])
      ys = jax.vmap(lambda st, xb: nnx.merge(graphdef, st)(xb))(state, x_pad[token].reshape(e, rows, d))
      contrib = ys.reshape(-1, d).astype(jnp.float32) * gate[:, None]
      return jnp.zeros((t + 1, d), jnp.float32).at[token].add(contrib)[:t], plan.kept

    if self.capacity_factor > 0:
      y, kept = run(capacity(t, k, e, self.capacity_factor), state, x2, ids, gates)
    else:   # dropless: the smallest compiled capacity that holds the busiest expert's load
      caps = dropless_capacities(t, k, e)
      load = jnp.max(jnp.bincount(ids.reshape(-1), length=e))
      branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), load.astype(jnp.int32))
      y, kept = jax.lax.switch(branch, [functools.partial(run, c) for c in caps], state, x2, ids, gates)
    aux = {
        "aux_loss": load_balancing_loss(probs, ids),
        "dropped_frac": jnp.mean((~kept).astype(jnp.float32)),
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
