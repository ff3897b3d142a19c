"""G-Rank: decentralised learning-to-rank by gossiping click logs, as a vectorised JAX simulation.

Paper: A. Gold, J. Pouwelse, "G-Rank: Unsupervised Continuous Learn-to-Rank for Edge Devices in a P2P Network",
arXiv:2301.12530 (TU Delft MSc thesis; official notebook "awrgold/G-Rank"). Implemented:

- Nodes hold click logs: entries (origin node, query term, clicked item). A node's view of another node j's log
  is a prefix of j's entries; the state is the watermark matrix W[i, j] = number of j's entries node i knows
  (W[i, i] = own log length). Gossip sends the entries the receiver has not seen, so a merge is W[r] <-
  max(W[r], W[s]) and the "gossip progress" pointer of the paper is implicit (message size = sum_j
  max(0, W[s, j] - W[r, j]) entries).
- Similarity S_i(n_j) (the "modified Jaccard" of the paper):
    kt = |top-K query terms of n_i ∩ top-K query terms of n_j|     (K = 10; by click count, ties: lower term id)
    km = |items clicked by both for shared query terms|
    ku = |union of all items clicked by n_i and n_j|
    similarity="paper":  S = (kt + km^2) / ku        (the thesis' formula)
    similarity="code":   S = (km + kt^2) / ku        (what the notebook computes)
  S = 0 if the nodes share no query term; each node's row (itself included) is divided by its max, so S ∈ [0, 1].
- Ranking of query Q at node i: score(k) = sum_j C_jk (S_i(n_j) + F) where C_jk counts node j's clicks on item k
  for Q known to i and F ∈ {0, 1} ("offset") lets zero-similarity clicks count. The list holds the clicked items by
  descending score (ties: lower item id). With probability 0.5 two random positions are swapped (exploration).
- Push gossip: every benign node sends its knowledge to 1 random contact per round (Sybils, from the attack round
  on, to `sybil_fanout` contacts);
  pull gossip: every benign node fetches the knowledge of 1 random contact. Contacts are nodes whose entries a node
  knows, plus explicit links (bootstrap, the other side of every gossip exchange). Similarities are then
  recomputed.
- Sybil attacks: Sybils join at `join_round` (bootstrapped by a random benign node, which links to them) and at
  `attack_round` each writes `num_spam` fake clicks: "targeted" = the target item (by default the least popular
  item of term 0, the bottom of the list) for the target term; "inflation" = random terms and items. The paper's
  "epic" Sybil attack is the targeted one with num_sybils = 3 x num_nodes (`grank_scenario`).
- Evaluation per round: list distance (sum over shared items of |position in the node's list - position in the
  true list|, Spearman's footrule; the true list orders a term's items by the global benign click count), the share
  of queries whose shown top-n contains the term's most clicked item, the share of benign nodes whose top-1 for the
  target term is the target item (attack runs only; NaN without Sybils), the mean gossip message size (entries)
  and the known fraction of all entries.

Deliberate deviations from the notebook (to vectorise it; all documented in docs/metrics_retrieval_grank.md):
- A synthetic catalogue: `num_terms` tags with `items_per_term` items each, Zipf popularity per tag (the
  notebook uses a 39-tag music library). A query for tag t returns and clicks only items of tag t.
- Rounds are synchronous: each benign node issues one query per round (uniform random tag) and clicks the top
  shown result with probability `follow_prob`, else an item drawn from the tag's popularity (the notebook clicks
  the lowest-id tag match). Sybils issue no benign queries.
- Bootstrap: node i learns the initial log of one random node (the notebook copies a random 10% sample), so every
  node's view stays a prefix of each origin's log. Similarities are recomputed for every node every round
  (the notebook updates only the rows of senders), and all nodes accept gossip (the notebook has half refuse pushes).
- The notebook overwrites the score with count x similarity before sorting, so its F has no effect; that is
  offset=0 here. Unseen queries (no click known) give an empty list instead of string matches.

Cost per round is O(N^2 (T G / 32 + G)) in fused, row-chunked JAX kernels (no N x N x L tensor); timings of
1,000 nodes x 100 rounds: bench/grank.py, BENCHMARKS.md.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

SIMILARITIES = ("paper", "code")
GOSSIP = ("push", "pull")
ATTACKS = ("none", "targeted", "inflation")
SCENARIOS = ("baseline", "targeted_sybil", "epic_sybil", "clicklog_inflation")


@dataclasses.dataclass(frozen=True)
class GRankConfig:
  """Simulation parameters (defaults follow the notebook where it has one)."""
  num_nodes: int = 100              # benign nodes
  num_terms: int = 39               # query terms (the notebook's 39 tags)
  items_per_term: int = 16          # items per term
  rounds: int = 100                 # each round every benign node searches once and gossips once
  top_k_terms: int = 10             # K of the top-K query terms in kt
  similarity: str = "paper"         # "paper": (kt + km^2)/ku; "code": (km + kt^2)/ku
  offset: float = 0.0               # F in score = sum_j C (S + F)
  gossip: str = "pull"              # "pull" (the notebook default) or "push"
  follow_prob: float = 0.5          # probability a benign user clicks the top shown result
  swap_prob: float = 0.5            # probability of swapping two random positions of the shown list
  zipf: float = 1.0                 # popularity exponent of the items of a term
  top_n: int = 5                    # shown results checked for the most popular item
  attack: str = "none"              # "none", "targeted", "inflation"
  num_sybils: int = 0
  join_round: Optional[int] = None  # default rounds // 4
  attack_round: Optional[int] = None  # default rounds // 2
  num_spam: int = 100               # fake clicks per Sybil
  sybil_fanout: int = 2             # pushes per Sybil per round (push gossip only)
  target_term: int = 0
  target_item: Optional[int] = None  # default: the least popular item of target_term
  chunk_size: int = 128             # rows per similarity/ranking block (memory ~ chunk x N x num_terms x 4 B)

  def validate(self) -> "GRankConfig":
    ints = dict(num_nodes=1, num_terms=1, items_per_term=2, rounds=1, top_k_terms=1, top_n=1, num_sybils=0,
                num_spam=1, sybil_fanout=1, chunk_size=1)
    for name, low in ints.items():
      val = getattr(self, name)
      if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < low:
        raise ValueError(f"GRankConfig.{name} must be an int >= {low}, got {val!r}")
    for name, options in (("similarity", SIMILARITIES), ("gossip", GOSSIP), ("attack", ATTACKS)):
      if getattr(self, name) not in options:
        raise ValueError(f"GRankConfig.{name} must be one of {options}, got {getattr(self, name)!r}")
    for name in ("follow_prob", "swap_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"GRankConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
    if not (np.isfinite(self.offset) and self.offset >= 0):
      raise ValueError(f"GRankConfig.offset (F) must be finite and >= 0, got {self.offset!r}")
    if not (np.isfinite(self.zipf) and self.zipf >= 0):
      raise ValueError(f"GRankConfig.zipf must be finite and >= 0, got {self.zipf!r}")
    if self.attack != "none" and self.num_sybils == 0:
      raise ValueError(f"GRankConfig.attack={self.attack!r} needs num_sybils >= 1")
    if not 0 <= self.target_term < self.num_terms:
      raise ValueError(f"GRankConfig.target_term must be in [0, {self.num_terms}), got {self.target_term}")
    if self.target_item is not None and not 0 <= self.target_item < self.items_per_term:
      raise ValueError(f"GRankConfig.target_item must be in [0, {self.items_per_term}), got {self.target_item}")
    if self.capacity >= 2 ** 15:
      raise ValueError(f"GRankConfig: a log of {self.capacity} entries (num_terms + rounds or num_spam) exceeds the "
                       f"int16 click counters; use fewer than {2 ** 15} entries per node")
    join, attack = self.resolved_rounds()
    if not 0 <= join <= attack < self.rounds:
      raise ValueError(f"GRankConfig needs 0 <= join_round <= attack_round < rounds, got join_round={join}, "
                       f"attack_round={attack}, rounds={self.rounds}")
    return self

  def resolved_rounds(self):
    join = self.rounds // 4 if self.join_round is None else self.join_round
    attack = self.rounds // 2 if self.attack_round is None else self.attack_round
    return join, attack

  @property
  def total_nodes(self) -> int:
    return self.num_nodes + self.num_sybils

  @property
  def capacity(self) -> int:
    """Entries per origin log: the initial one click per term plus one per round (Sybils: the spam)."""
    return max(self.num_terms + self.rounds, self.num_spam if self.num_sybils else 0)


def grank_scenario(name: str, num_nodes: int = 100, **overrides) -> GRankConfig:
  """The notebook's scenarios: baseline, targeted_sybil (10% Sybils, 100 spam), epic_sybil (3x Sybils),
  clicklog_inflation (10% Sybils, 1000 random spam clicks). `overrides` replace any other field."""
  if name not in SCENARIOS:
    raise ValueError(f"scenario must be one of {SCENARIOS}, got {name!r}")
  fields = dict(num_nodes=num_nodes)
  if name == "targeted_sybil":
    fields.update(attack="targeted", num_sybils=max(1, num_nodes // 10), num_spam=100)
  elif name == "epic_sybil":
    fields.update(attack="targeted", num_sybils=3 * num_nodes, num_spam=100)
  elif name == "clicklog_inflation":
    fields.update(attack="inflation", num_sybils=max(1, num_nodes // 10), num_spam=1000)
  fields.update(overrides)
  return GRankConfig(**fields).validate()


class GRankState(NamedTuple):
  """Simulation state (N nodes, L = log capacity, T terms, G items per term, TW = ceil(T / 32))."""
  length: jax.Array      # [N] own log length
  e_term: jax.Array      # [N, L] term of each own entry (-1 = empty)
  e_item: jax.Array      # [N, L] item (within its term) of each own entry
  pb: jax.Array          # [N, L+1, IW] uint32 bitset of the items (id t*G + g) clicked in the first l entries
  pres: jax.Array        # [N, L+1, TW] uint32 terms searched in the first l entries
  topk: jax.Array        # [N, L+1, TW] uint32 top-K terms of the first l entries
  last: jax.Array        # [N, L+1, T] row of `ct` holding the term's click counts after the first l entries
  ct: jax.Array          # [N, L+1, G] int16 click counts of entry e's term after entry e (row e+1); row 0 = 0
  tcount: jax.Array      # [N, T] own term counts
  known: jax.Array       # [N, N] W[i, j]: how many of j's entries i knows
  link: jax.Array        # [N, N] explicit contacts
  sim: jax.Array         # [N, N] similarity S_i(n_j), rows max-normalised
  gclicks: jax.Array     # [T, G] benign clicks per (term, item): the "true" ranking
  active: jax.Array      # [N] node has joined


@dataclasses.dataclass(frozen=True)
class GRankResult:
  config: GRankConfig
  list_distance: np.ndarray      # [rounds] mean footrule distance of benign queries' lists to the true list
  popular_share: np.ndarray      # [rounds] share of benign queries whose shown top-n has the most clicked item
  target_share: np.ndarray       # [rounds] share of benign nodes ranking the target item first (NaN: no Sybils)
  message_size: np.ndarray       # [rounds] mean entries per gossip message
  knowledge: np.ndarray          # [rounds] mean share of all entries a benign node knows
  popularity: np.ndarray         # [T, G] item popularity used by benign clicks
  target: tuple                  # (target_term, target_item)
  state: GRankState              # final state (jax arrays)


# ------------------------------------------------------------------------------------------ bit helpers
def _pack(bits):
  """[..., T] bool -> [..., ceil(T/32)] uint32 bitmask."""
  t = bits.shape[-1]
  words = -(-t // 32)
  bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, words * 32 - t)])
  bits = bits.reshape(bits.shape[:-1] + (words, 32)).astype(jnp.uint32)
  return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _popcount(x):
  return jax.lax.population_count(x).astype(jnp.int32)


def top_terms_mask(counts, k: int):
  """[..., T] counts -> bool mask of the top-k terms (count desc, ties: lower term id; zero counts never)."""
  t = counts.shape[-1]
  ci, cj = counts[..., :, None], counts[..., None, :]
  lower = jnp.arange(t)[None, :] < jnp.arange(t)[:, None]          # [i, j]: j < i
  rank = jnp.sum((cj > ci) | ((cj == ci) & lower), axis=-1)
  return (rank < k) & (counts > 0)


# ------------------------------------------------------------------------------------------ state updates
@functools.partial(jax.jit, static_argnames=("k",))
def _append(state: GRankState, rows, term, item, k: int) -> GRankState:
  """Append one entry (term[m], item[m]) to the own log of node rows[m] (rows: distinct node ids).

  Only the given rows are read and written, so appending for a few nodes (the Sybils' spam) is cheap."""
  cap = state.e_term.shape[1]
  num_terms, g = state.last.shape[2], state.ct.shape[2]
  e = state.length[rows]
  onehot_t = jnp.arange(num_terms)[None, :] == term[:, None]
  flat = term * g + item
  bit = jnp.left_shift(jnp.uint32(1), (flat % 32).astype(jnp.uint32))
  word = jnp.arange(state.pb.shape[2])[None, :] == (flat // 32)[:, None]
  new_pb = state.pb[rows, e] | jnp.where(word, bit[:, None], jnp.uint32(0))
  tcount = state.tcount[rows] + onehot_t.astype(jnp.int32)
  old_last = state.last[rows, e]
  new_last = jnp.where(onehot_t, e[:, None] + 1, old_last)
  prev = state.ct[rows, jnp.take_along_axis(old_last, term[:, None], axis=1)[:, 0]]
  new_ct = prev + (jnp.arange(g)[None, :] == item[:, None]).astype(prev.dtype)
  row = jnp.where(e < cap, e + 1, cap + 1)          # a full log drops the entry (capacity is sized to avoid it)
  col = jnp.where(e < cap, e, cap)
  length = jnp.minimum(e + 1, cap)
  return state._replace(
      length=state.length.at[rows].set(length),
      e_term=state.e_term.at[rows, col].set(term, mode="drop"),
      e_item=state.e_item.at[rows, col].set(item, mode="drop"),
      pb=state.pb.at[rows, row].set(new_pb, mode="drop"),
      pres=state.pres.at[rows, row].set(_pack(tcount > 0), mode="drop"),
      topk=state.topk.at[rows, row].set(_pack(top_terms_mask(tcount, k)), mode="drop"),
      last=state.last.at[rows, row].set(new_last, mode="drop"),
      ct=state.ct.at[rows, row].set(new_ct, mode="drop"),
      tcount=state.tcount.at[rows].set(tcount),
      known=state.known.at[rows, rows].set(length))


def _row_blocks(fn, n: int, chunk: int):
  """Apply fn(rows [c]) -> [c, ...] over all n rows in blocks of `chunk` (lax.map), concatenated."""
  chunk = min(chunk, n)
  blocks = -(-n // chunk)
  rows = jnp.minimum(jnp.arange(blocks * chunk).reshape(blocks, chunk), n - 1)
  out = jax.lax.map(fn, rows)
  return jax.tree.map(lambda x: x.reshape((blocks * chunk,) + x.shape[2:])[:n], out)


def similarity_matrix(state: GRankState, form: str = "paper", chunk_size: int = 128) -> jax.Array:
  """S_i(n_j) for all pairs from the state's logs and watermarks, rows divided by their max ([N, N] float32)."""
  if form not in SIMILARITIES:
    raise ValueError(f"similarity form must be one of {SIMILARITIES}, got {form!r}")
  return _similarity(state, form=form, chunk_size=int(chunk_size))


@functools.partial(jax.jit, static_argnames=("form", "chunk_size"))
def _similarity(state: GRankState, *, form: str, chunk_size: int) -> jax.Array:
  n = state.known.shape[0]
  cols = jnp.arange(n)

  def block(rows):
    w = state.known[rows]                          # [c, N]
    own = state.known[rows, rows]
    pb_i, pb_j = state.pb[rows, own][:, None], state.pb[cols[None, :], w]
    kt = jnp.sum(_popcount(state.topk[rows, own][:, None] & state.topk[cols[None, :], w]), axis=-1)
    shared = jnp.sum(_popcount(state.pres[rows, own][:, None] & state.pres[cols[None, :], w]), axis=-1) > 0
    km = jnp.sum(_popcount(pb_i & pb_j), axis=-1)   # an item is clicked only for its own term
    ku = jnp.sum(_popcount(pb_i | pb_j), axis=-1)
    kt, km, ku = kt.astype(jnp.float32), km.astype(jnp.float32), ku.astype(jnp.float32)
    num = kt + km * km if form == "paper" else km + kt * kt
    s = jnp.where(shared & (ku > 0), num / jnp.maximum(ku, 1.0), 0.0)
    top = jnp.max(s, axis=1, keepdims=True)
    return jnp.where(top > 0, s / jnp.where(top > 0, top, 1.0), 0.0)

  return _row_blocks(block, n, chunk_size)


def grank_scores(state: GRankState, queries, offset: float = 0.0, chunk_size: int = 128):
  """Scores sum_j C_jk (S_i(n_j) + F) of every item of node i's query term queries[i], and which items have a
  known click. Returns (scores [N, G] float32, clicked [N, G] bool)."""
  return _scores(state, jnp.asarray(queries, jnp.int32), jnp.float32(offset), chunk_size=int(chunk_size))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _scores(state: GRankState, queries, offset, *, chunk_size: int):
  n = state.known.shape[0]
  cols = jnp.arange(n)

  def block(rows):
    w = state.known[rows]
    idx = state.last[cols[None, :], w, queries[rows][:, None]]          # [c, N]
    cnt = state.ct[cols[None, :], idx].astype(jnp.float32)             # [c, N, G]
    weight = state.sim[rows] + offset
    return jnp.einsum("cn,cng->cg", weight, cnt), jnp.sum(cnt, axis=1) > 0

  return _row_blocks(block, n, chunk_size)


def ranked_lists(scores, clicked):
  """Item order per node: clicked items by descending score (ties: lower id), then unclicked items by id."""
  return jnp.lexsort((-scores, (~clicked).astype(jnp.int32)), axis=-1)


def gossip_step(known, link, active, fanout, key, scheme: str = "push"):
  """One synchronous gossip round on the watermark matrix.

  Every node i picks up to fanout[i] distinct random contacts (link or known entries, active, not itself).
  push: each target r receives max(W[r], W[i]); pull: i takes max(W[i], W[target]). Either way the contacted
  node links back to i (it now knows i exists, as the notebook's gossip updates the sender's known nodes).
  Returns (known, link, targets [N, F] (-1 = none), message sizes [N, F] in entries (-1 = none))."""
  if scheme not in GOSSIP:
    raise ValueError(f"gossip scheme must be one of {GOSSIP}, got {scheme!r}")
  known, link = jnp.asarray(known, jnp.int32), jnp.asarray(link, bool)
  n = known.shape[0]
  if known.shape != (n, n) or link.shape != (n, n) or np.shape(active) != (n,) or np.shape(fanout) != (n,):
    raise ValueError(f"gossip_step needs known/link [N, N] and active/fanout [N], got {known.shape}, "
                     f"{link.shape}, {np.shape(active)}, {np.shape(fanout)}")
  return _gossip(known, link, jnp.asarray(active, bool), jnp.asarray(fanout, jnp.int32), key, scheme=scheme,
                 max_fanout=_static_fanout(fanout))


def _static_fanout(fanout) -> int:
  try:
    return max(1, int(np.max(np.asarray(fanout))))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    raise ValueError("gossip_step needs a concrete fanout array (its max sets a static shape)") from None


@functools.partial(jax.jit, static_argnames=("scheme", "max_fanout"))
def _gossip(known, link, active, fanout, key, *, scheme: str, max_fanout: int):
  n = known.shape[0]
  free = (link | (known > 0)) & ~jnp.eye(n, dtype=bool) & active[None, :]
  picks, oks = [], []
  for f, k in enumerate(jax.random.split(key, max_fanout)):
    # uniform pick among the remaining contacts: the floor(u * count)-th True of the row (one draw per node)
    count = jnp.sum(free, axis=1)
    r = jnp.minimum(jnp.floor(jax.random.uniform(k, (n,)) * count).astype(jnp.int32), count - 1)
    pick = jnp.argmax(jnp.cumsum(free, axis=1, dtype=jnp.int32) > r[:, None], axis=1).astype(jnp.int32)
    ok_f = (count > 0) & (f < fanout)
    picks.append(pick)
    oks.append(ok_f)
    free = free & ~((jnp.arange(n)[None, :] == pick[:, None]) & ok_f[:, None])
  tgt, ok = jnp.stack(picks, axis=1), jnp.stack(oks, axis=1)
  tgt = jnp.where(ok, tgt, -1)
  src = jnp.broadcast_to(jnp.arange(n)[:, None], tgt.shape)
  safe = jnp.where(ok, tgt, 0)
  if scheme == "push":
    size = jnp.sum(jnp.maximum(known[src] - known[safe], 0), axis=-1)
    recv = jnp.where(ok, tgt, n).reshape(-1)                  # n is out of range -> dropped
    new_known = known.at[recv].max(known[src.reshape(-1)], mode="drop")
    new_link = link.at[recv, src.reshape(-1)].set(True, mode="drop")
  else:
    size = jnp.sum(jnp.maximum(known[safe] - known[src], 0), axis=-1)
    pulled = jnp.where(ok[..., None], known[safe], 0)        # [N, F, N]
    new_known = jnp.maximum(known, jnp.max(pulled, axis=1))
    new_link = link.at[jnp.where(ok, tgt, n).reshape(-1), src.reshape(-1)].set(True, mode="drop")
  return new_known, new_link, tgt, jnp.where(ok, size, -1)


def list_distance(true_list, node_list) -> int:
  """Sum over items in both lists of |position in node_list - position in true_list| (first occurrences)."""
  true_pos, node_pos = {}, {}
  for pos, item in enumerate(np.asarray(true_list).tolist()):
    true_pos.setdefault(item, pos)
  for pos, item in enumerate(np.asarray(node_list).tolist()):
    node_pos.setdefault(item, pos)
  return int(sum(abs(node_pos[x] - true_pos[x]) for x in node_pos if x in true_pos))


# ------------------------------------------------------------------------------------------ simulation
def _popularity(cfg: GRankConfig, key):
  ranks = jnp.arange(cfg.items_per_term, dtype=jnp.float32)
  weights = 1.0 / (ranks + 1.0) ** cfg.zipf
  perms = jax.vmap(lambda k: jax.random.permutation(k, cfg.items_per_term))(
      jax.random.split(key, cfg.num_terms))                              # perms[t, r] = item with rank r
  pop = jnp.zeros((cfg.num_terms, cfg.items_per_term)).at[jnp.arange(cfg.num_terms)[:, None], perms].set(weights)
  return pop / jnp.sum(pop, axis=1, keepdims=True), perms


def _init_state(cfg: GRankConfig, key, pop) -> GRankState:
  n, cap, t, g = cfg.total_nodes, cfg.capacity, cfg.num_terms, cfg.items_per_term
  tw, iw = -(-t // 32), -(-(t * g) // 32)
  benign = jnp.arange(n) < cfg.num_nodes
  state = GRankState(
      length=jnp.zeros(n, jnp.int32), e_term=jnp.full((n, cap), -1, jnp.int32),
      e_item=jnp.full((n, cap), -1, jnp.int32), pb=jnp.zeros((n, cap + 1, iw), jnp.uint32),
      pres=jnp.zeros((n, cap + 1, tw), jnp.uint32), topk=jnp.zeros((n, cap + 1, tw), jnp.uint32),
      last=jnp.zeros((n, cap + 1, t), jnp.int32), ct=jnp.zeros((n, cap + 1, g), jnp.int16),
      tcount=jnp.zeros((n, t), jnp.int32), known=jnp.zeros((n, n), jnp.int32), link=jnp.zeros((n, n), bool),
      sim=jnp.zeros((n, n), jnp.float32), gclicks=jnp.zeros((t, g), jnp.int32), active=benign)
  k_click, k_boot = jax.random.split(key)

  def init_click(term, st):   # one click per term for every benign node (the notebook's initial log)
    nb = cfg.num_nodes
    items = jax.random.categorical(jax.random.fold_in(k_click, term), jnp.log(pop[term]), shape=(nb,))
    st = _append(st, jnp.arange(nb), jnp.full((nb,), term, jnp.int32), items.astype(jnp.int32), cfg.top_k_terms)
    return st._replace(gclicks=st.gclicks.at[term].add(jnp.bincount(items, length=g)))

  state = jax.lax.fori_loop(0, t, init_click, state)
  # bootstrap: node i > 0 learns the log of a random earlier node, node 0 that of a random other node
  i = jnp.arange(cfg.num_nodes)
  u = jax.random.uniform(k_boot, (cfg.num_nodes,))
  boot = jnp.where(i > 0, jnp.floor(u * i), 1 + jnp.floor(u * (cfg.num_nodes - 1))).astype(jnp.int32)
  boot = jnp.minimum(boot, cfg.num_nodes - 1)
  if cfg.num_nodes > 1:
    state = state._replace(known=state.known.at[i, boot].max(state.length[boot]),
                           link=state.link.at[i, boot].set(True))
  return state._replace(sim=similarity_matrix(state, cfg.similarity, cfg.chunk_size))


def _sybil_join(cfg: GRankConfig, state: GRankState, key, now) -> GRankState:
  """If `now`: every Sybil gets the knowledge of a random benign node, which links to it (and back).

  Written as masked row updates instead of a lax.cond so the scan never copies the large tables."""
  syb = cfg.num_nodes + jnp.arange(cfg.num_sybils)
  boot = jax.random.randint(key, (cfg.num_sybils,), 0, cfg.num_nodes)
  rows = jnp.where(now, jnp.maximum(state.known[syb], state.known[boot]), state.known[syb])
  link = state.link.at[boot, syb].set(state.link[boot, syb] | now).at[syb, boot].set(state.link[syb, boot] | now)
  return state._replace(known=state.known.at[syb].set(rows), link=link,
                        active=state.active.at[syb].set(state.active[syb] | now))


def _sybil_spam(cfg: GRankConfig, state: GRankState, key, target, now) -> GRankState:
  """If `now`: every Sybil appends num_spam fake clicks (a loop of 0 or num_spam steps, no lax.cond copy)."""
  ns = cfg.num_sybils
  sybils = cfg.num_nodes + jnp.arange(ns)

  def spam(s, st):
    if cfg.attack == "targeted":
      term = jnp.full((ns,), target[0], jnp.int32)
      item = jnp.full((ns,), target[1], jnp.int32)
    else:
      kt, ki = jax.random.split(jax.random.fold_in(key, s))
      term = jax.random.randint(kt, (ns,), 0, cfg.num_terms)
      item = jax.random.randint(ki, (ns,), 0, cfg.items_per_term)
    return _append(st, sybils, term, item, cfg.top_k_terms)

  return jax.lax.fori_loop(0, jnp.where(now, cfg.num_spam, 0), spam, state)


def _footrule(order_a, order_b):
  inv_a, inv_b = jnp.argsort(order_a, axis=-1), jnp.argsort(order_b, axis=-1)
  return jnp.sum(jnp.abs(inv_a - inv_b), axis=-1)


def _round(cfg: GRankConfig, target, pop, offset, state: GRankState, xs):
  rnd, key = xs
  n = cfg.total_nodes
  join, attack = cfg.resolved_rounds()
  k_join, k_spam, k_query, k_swap, k_click, k_gossip = jax.random.split(key, 6)
  if cfg.num_sybils:
    state = _sybil_join(cfg, state, k_join, rnd == join)
    state = _sybil_spam(cfg, state, k_spam, target, rnd == attack)
  benign = jnp.arange(n) < cfg.num_nodes

  # queries: every benign node searches a random term
  q = jax.random.randint(k_query, (n,), 0, cfg.num_terms)
  scores, clicked = grank_scores(state, q, offset, cfg.chunk_size)
  order = ranked_lists(scores, clicked)
  true_order = ranked_lists(state.gclicks.astype(jnp.float32), jnp.ones_like(state.gclicks, bool))   # [T, G]
  dist = _footrule(order, true_order[q])
  # exploration: swap two distinct random positions of the shown (clicked) list with probability swap_prob
  shown = jnp.sum(clicked, axis=1)
  ks = jax.random.split(k_swap, 3)
  do_swap = (jax.random.uniform(ks[0], (n,)) < cfg.swap_prob) & (shown >= 2)
  a = jnp.floor(jax.random.uniform(ks[1], (n,)) * shown).astype(jnp.int32)
  b = jnp.floor(jax.random.uniform(ks[2], (n,)) * (shown - 1)).astype(jnp.int32)
  b = jnp.where(b >= a, b + 1, b)
  a, b = jnp.where(do_swap, a, 0), jnp.where(do_swap, b, 0)
  rows = jnp.arange(n)
  oa, ob = order[rows, a], order[rows, b]
  order = order.at[rows, a].set(ob).at[rows, b].set(oa)
  most_popular = true_order[q, 0]
  in_top = jnp.any((order[:, :cfg.top_n] == most_popular[:, None])
                   & (jnp.arange(cfg.top_n)[None, :] < shown[:, None]), axis=1)
  # clicks: follow the top shown result or pick from the term's popularity
  kc1, kc2 = jax.random.split(k_click)
  follow = (jax.random.uniform(kc1, (n,)) < cfg.follow_prob) & (shown >= 1)
  sampled = jax.random.categorical(kc2, jnp.log(pop[q]), axis=-1).astype(jnp.int32)
  item = jnp.where(follow, order[:, 0], sampled)
  nb = cfg.num_nodes
  state = _append(state, jnp.arange(nb), q[:nb], item[:nb], cfg.top_k_terms)
  state = state._replace(gclicks=state.gclicks.at[q[:nb], item[:nb]].add(1))

  # target tracking (only in attack runs): top-1 of every node for the target term
  if cfg.num_sybils:
    t_scores, t_clicked = grank_scores(state, jnp.full((n,), target[0], jnp.int32), offset, cfg.chunk_size)
    t_top = ranked_lists(t_scores, t_clicked)[:, 0]
    target_first = (t_top == target[1]) & jnp.any(t_clicked, axis=1)
    target_share = jnp.sum(target_first & benign) / cfg.num_nodes
  else:
    target_share = jnp.float32(jnp.nan)

  # gossip and similarity update
  is_sybil = ~benign & state.active
  if cfg.gossip == "push":
    fanout = jnp.where(benign, 1, jnp.where(is_sybil & (rnd >= attack), cfg.sybil_fanout, 0))
    max_fan = cfg.sybil_fanout if cfg.num_sybils else 1
  else:
    fanout = benign.astype(jnp.int32)
    max_fan = 1
  known, link, _, size = _gossip(state.known, state.link, state.active, fanout, k_gossip,
                                 scheme=cfg.gossip, max_fanout=max_fan)
  state = state._replace(known=known, link=link)
  state = state._replace(sim=similarity_matrix(state, cfg.similarity, cfg.chunk_size))

  sent = size >= 0
  total = jnp.sum(state.length).astype(jnp.float32)
  out = dict(list_distance=jnp.sum(jnp.where(benign, dist, 0)) / nb,
             popular_share=jnp.sum(in_top & benign) / nb,
             target_share=target_share,
             message_size=jnp.sum(jnp.where(sent, size, 0)) / jnp.maximum(jnp.sum(sent), 1),
             knowledge=jnp.sum(jnp.where(benign[:, None], state.known, 0)) / (nb * total))
  return state, out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _simulate(cfg: GRankConfig, key, offset):
  k_pop, k_init, k_rounds = jax.random.split(key, 3)
  pop, perms = _popularity(cfg, k_pop)
  target_item = perms[cfg.target_term, -1] if cfg.target_item is None else jnp.int32(cfg.target_item)
  target = (jnp.int32(cfg.target_term), target_item.astype(jnp.int32))
  state = _init_state(cfg, k_init, pop)
  keys = jax.random.split(k_rounds, cfg.rounds)
  step = functools.partial(_round, cfg, target, pop, offset)
  state, out = jax.lax.scan(step, state, (jnp.arange(cfg.rounds), keys))
  return state, out, pop, target[1]


def simulate_grank(config: Optional[GRankConfig] = None, seed: int = 0, **overrides) -> GRankResult:
  """Run a G-Rank simulation (one jitted lax.scan over rounds). Same config and seed give identical results.

  Args:
    config: a GRankConfig (default GRankConfig()); `overrides` replace fields (e.g. num_nodes=1000).
    seed: PRNG seed (jax.random).
  """
  cfg = dataclasses.replace(config or GRankConfig(), **overrides).validate()
  if not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an int, got {seed!r}")
  # F is a traced argument: runs that differ only in F share one compilation
  state, out, pop, target_item = _simulate(dataclasses.replace(cfg, offset=0.0), jax.random.key(int(seed)),
                                           jnp.float32(cfg.offset))
  out = {k: np.asarray(v, np.float64) for k, v in out.items()}
  return GRankResult(config=cfg, popularity=np.asarray(pop), target=(cfg.target_term, int(target_item)),
                     state=state, **out)
