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
  * Dropless mode on a device mesh: the tokens are dispatched in groups, one per batch shard (the rows a device
    holds), each group with its own slots and the capacities computed from its T/G tokens; the branch is chosen
    by the busiest expert of any group. Every assignment is still computed, so the result is the one-group result
    (up to the order of float additions), while each device routes, dispatches and combines only its own rows:
    the [E, slots, d] dispatched tokens are redistributed to the experts' devices (all-to-all) and back. With one
    group on every device the small preset's train step on 8 devices kept 10x the memory (docs/benchmarks/sharding.md).
    Capacity mode keeps one group, so which assignments are dropped does not depend on the mesh.
  * Dropless mode keeps only its inputs for the backward pass and recomputes the chosen capacity there
    (`lostjax.remat.switch`): differentiating `lax.switch` keeps the intermediates of every branch (E·Σ capacities
    slots per layer, 7.25 times the balanced load for top-2), at the price of the routed experts' forward twice.
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

from lostjax import remat, sharding
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
    """x2 [..., d] -> (probs [..., E], ids [..., k] int32, gates [..., k]) in float32."""
    probs = jax.nn.softmax(self.router(x2.astype(jnp.float32)), axis=-1)
    top, ids = jax.lax.top_k(probs, self.top_k)
    return probs, ids.astype(jnp.int32), top / jnp.sum(top, axis=-1, keepdims=True)

  def _groups(self, b: int) -> int:
    """How many groups the tokens are dispatched in: in dropless mode the batch shards of the current mesh
    (`lostjax.sharding.batch_divisor`; each device routes, dispatches and combines its own rows) when they divide
    the batch, else 1. Capacity mode keeps one group, so which assignments are dropped does not depend on the mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if self.capacity_factor > 0 or mesh.empty or mesh.size == 1:
      return 1
    g = sharding.batch_divisor(mesh)
    return g if b % g == 0 else 1

  def __call__(self, x: jax.Array):
    b, s, d = x.shape
    k, e = self.top_k, self.num_experts
    g = self._groups(b)
    t = b * s // g                                              # tokens per group
    xg = sharding.constrain(x.reshape(g, t, d), ("activation_batch", None, "activation_embed"))
    probs, ids, gates = self.route(xg)                         # [g, t, E], [g, t, k], [g, t, k]
    graphdef, state = nnx.split(self.experts)

    def run(rows, state, xg, ids, gates):
      """The routed experts' output [g, t, d] (float32) with `rows` slots per expert and group, and the kept mask
      [g, t·k]."""
      plan = jax.vmap(lambda i: dispatch_plan(i, e, rows))(ids)
      n = t * k
      valid = plan.slot_src < n                                   # [g, E·rows]
      token = jnp.where(valid, plan.slot_src % t, t)              # row t of the padded input is zeros
      flat_gates = jnp.concatenate([jnp.swapaxes(gates, 1, 2).reshape(g, n), jnp.zeros((g, 1), gates.dtype)], 1)
      gate = jnp.where(valid, jnp.take_along_axis(flat_gates, plan.slot_src, axis=1), 0.0)
      x_pad = jnp.concatenate([xg, jnp.zeros((g, 1, d), xg.dtype)], axis=1)
      xs = jax.vmap(lambda xp, tok: xp[tok])(x_pad, token)        # [g, E·rows, d]
      # to the experts: [E, g·rows, d], experts over the expert axis, the groups' slots over the other batch axes
      xs = jnp.swapaxes(xs.reshape(g, e, rows, d), 0, 1).reshape(e, g * rows, d)
      xs = sharding.constrain(xs, ("activation_expert", "activation_batch", None))
      ys = jax.vmap(lambda st, xb: nnx.merge(graphdef, st)(xb))(state, xs)
      ys = sharding.constrain(ys, ("activation_expert", "activation_batch", None))
      ys = jnp.swapaxes(ys.reshape(e, g, rows, d), 0, 1).reshape(g, e * rows, d)   # back to the groups
      ys = sharding.constrain(ys, ("activation_batch", None, None))
      contrib = ys.astype(jnp.float32) * gate[..., None]
      combine = lambda tok, c: jnp.zeros((t + 1, d), jnp.float32).at[tok].add(c)[:t]
      return jax.vmap(combine)(token, contrib), plan.kept

    if self.capacity_factor > 0:
      y, kept = run(capacity(t, k, e, self.capacity_factor), state, xg, ids, gates)
    else:   # dropless: the smallest compiled capacity that holds the busiest expert's load in any group
      caps = dropless_capacities(t, k, e)
      load = jnp.max(jax.vmap(lambda i: jnp.bincount(i.reshape(-1), length=e))(ids))
      branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), load.astype(jnp.int32))
      # lax.switch would keep every capacity's intermediates for the backward (E·Σ capacities slots per layer, 7.25x
      # the balanced load for top-2): remat.switch keeps the inputs and recomputes the chosen capacity there.
      y, kept = remat.switch(branch, [functools.partial(run, c) for c in caps], state, xg, ids, gates)
    aux = {
        "aux_loss": load_balancing_loss(probs.reshape(b * s, e), ids.reshape(b * s, k)),
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
