"""Tests for lostjax.metrics.grank: similarity and ranking against a plain-python oracle that reads the click
logs entry by entry, gossip invariants against a python merge loop, determinism, and the Sybil direction.

One small simulation (24 benign nodes + 3 Sybils, targeted attack, push gossip) is compiled once and shared."""
from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax.metrics import grank as G

CFG = G.GRankConfig(num_nodes=24, num_terms=4, items_per_term=6, rounds=16, num_spam=20, join_round=2,
                    attack_round=6, gossip="push", attack="targeted", num_sybils=3, top_k_terms=3, chunk_size=8)


@pytest.fixture(scope="module")
def runs():
  return {f: G.simulate_grank(CFG, seed=0, offset=f) for f in (0.0, 1.0)}


# ------------------------------------------------------------------------------------------ python oracle
def known_logs(state):
  """logs[i][j] = list of (term, item) of origin j that node i knows (a prefix of j's own log)."""
  known, e_term, e_item = (np.asarray(x) for x in (state.known, state.e_term, state.e_item))
  n = known.shape[0]
  return [[list(zip(e_term[j, :known[i, j]].tolist(), e_item[j, :known[i, j]].tolist())) for j in range(n)]
          for i in range(n)]


def top_terms(entries, k):
  counts = collections.Counter(t for t, _ in entries)
  ranked = sorted(counts, key=lambda t: (-counts[t], t))
  return set(ranked[:k])


def oracle_similarity(state, k, form):
  logs = known_logs(state)
  n = len(logs)
  sim = np.zeros((n, n))
  for i in range(n):
    mine = logs[i][i]
    for j in range(n):
      theirs = logs[i][j]
      shared = {t for t, _ in mine} & {t for t, _ in theirs}
      if not shared:
        continue
      kt = len(top_terms(mine, k) & top_terms(theirs, k))
      km = len({(t, g) for t, g in mine if t in shared} & {(t, g) for t, g in theirs if t in shared})
      ku = len({(t, g) for t, g in mine} | {(t, g) for t, g in theirs})
      sim[i, j] = (kt + km ** 2) / ku if form == "paper" else (km + kt ** 2) / ku
    if sim[i].max() > 0:
      sim[i] /= sim[i].max()
  return sim


def oracle_scores(state, sim, queries, offset, num_items):
  logs = known_logs(state)
  n = len(logs)
  scores, clicked = np.zeros((n, num_items)), np.zeros((n, num_items), bool)
  for i in range(n):
    for j in range(n):
      for t, g in logs[i][j]:
        if t == queries[i]:
          scores[i, g] += sim[i, j] + offset
          clicked[i, g] = True
  return scores, clicked


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("form", ["paper", "code"])
def test_similarity_matches_python_oracle(runs, form):
  state = runs[1.0].state
  ref = oracle_similarity(state, CFG.top_k_terms, form)
  got = np.asarray(G.similarity_matrix(state, form, chunk_size=5))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  if form == "paper":   # the state's own matrix (computed inside the scan) is the same
    np.testing.assert_allclose(np.asarray(state.sim), ref, rtol=1e-5, atol=1e-6)
  assert np.all(got <= 1 + 1e-6) and np.all(got >= 0)
  benign_rows = got[:CFG.num_nodes]
  np.testing.assert_allclose(benign_rows.max(axis=1), 1.0, rtol=1e-6)


def test_code_and_paper_forms_differ_on_a_hand_built_pair():
  # node 0: terms {0, 1}, items (0,0) (1,2); node 1: terms {0}, items (0,0) (0,1); both know each other fully
  e_term = np.array([[0, 1], [0, 0]])
  e_item = np.array([[0, 2], [0, 1]])
  state = hand_state(e_term, e_item, np.array([[2, 2], [2, 2]]), num_terms=2, items=3, k=10)
  # pair (0, 1): kt = |{0,1} ∩ {0}| = 1, km = |{(0,0)}| = 1, ku = |{(0,0),(1,2),(0,1)}| = 3
  # self (0, 0): kt = 2, km = ku = 2 -> paper (2 + 4)/2 = 3, code (2 + 4)/2 = 3
  paper = np.asarray(G.similarity_matrix(state, "paper"))
  code = np.asarray(G.similarity_matrix(state, "code"))
  np.testing.assert_allclose(paper[0], [1.0, (1 + 1) / 3 / 3.0], rtol=1e-6)
  np.testing.assert_allclose(code[0], [1.0, (1 + 1) / 3 / 3.0], rtol=1e-6)
  # node 1 itself: kt = 1, km = ku = 2 -> paper (1 + 4)/2 = 2.5, code (2 + 1)/2 = 1.5; pair (1, 0) = 2/3
  np.testing.assert_allclose(paper[1], [(2 / 3) / 2.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(code[1], [(2 / 3) / 1.5, 1.0], rtol=1e-6)


def hand_state(e_term, e_item, known, num_terms, items, k):
  """A GRankState built by appending the given own logs entry by entry (then overriding the watermarks)."""
  n, length = e_term.shape
  cfg = G.GRankConfig(num_nodes=n, num_terms=num_terms, items_per_term=items, rounds=length, top_k_terms=k)
  tw, iw = -(-num_terms // 32), -(-(num_terms * items) // 32)
  cap = cfg.capacity
  st = G.GRankState(
      length=jnp.zeros(n, jnp.int32), e_term=jnp.full((n, cap), -1, jnp.int32),
      e_item=jnp.full((n, cap), -1, jnp.int32), pb=jnp.zeros((n, cap + 1, iw), jnp.uint32),
      pres=jnp.zeros((n, cap + 1, tw), jnp.uint32), topk=jnp.zeros((n, cap + 1, tw), jnp.uint32),
      last=jnp.zeros((n, cap + 1, num_terms), jnp.int32), ct=jnp.zeros((n, cap + 1, items), jnp.int16),
      tcount=jnp.zeros((n, num_terms), jnp.int32), known=jnp.zeros((n, n), jnp.int32),
      link=jnp.zeros((n, n), bool), sim=jnp.zeros((n, n)), gclicks=jnp.zeros((num_terms, items), jnp.int32),
      active=jnp.ones(n, bool))
  for pos in range(length):
    st = G._append(st, jnp.arange(n), jnp.asarray(e_term[:, pos]), jnp.asarray(e_item[:, pos]), k)
  return st._replace(known=jnp.asarray(known, jnp.int32))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_ranking_scores_and_order_match_python_oracle(runs, offset):
  state = runs[offset].state
  queries = np.random.default_rng(0).integers(0, CFG.num_terms, CFG.total_nodes)
  scores, clicked = G.grank_scores(state, queries, offset, chunk_size=4)
  ref_s, ref_c = oracle_scores(state, np.asarray(state.sim, np.float64), queries, offset, CFG.items_per_term)
  np.testing.assert_array_equal(np.asarray(clicked), ref_c)
  np.testing.assert_allclose(np.asarray(scores), ref_s, rtol=1e-5, atol=1e-5)
  order = np.asarray(G.ranked_lists(scores, clicked))
  for i in range(CFG.total_nodes):
    shown = [g for g in order[i] if ref_c[i, g]]
    expected = sorted(np.flatnonzero(ref_c[i]), key=lambda g: (-np.float32(ref_s[i, g]), g))
    vals = [ref_s[i, g] for g in shown]
    assert all(a >= b - 1e-5 for a, b in zip(vals, vals[1:]))       # descending scores
    assert set(shown) == set(expected)
    assert list(order[i, len(shown):]) == sorted(set(range(CFG.items_per_term)) - set(shown))


def test_state_invariants(runs):
  st = runs[1.0].state
  known, length = np.asarray(st.known), np.asarray(st.length)
  np.testing.assert_array_equal(np.diag(known), length)
  assert np.all(known <= length[None, :]) and np.all(known >= 0)
  # own logs: one click per term, one per round (benign); the spam (Sybils)
  np.testing.assert_array_equal(length[:CFG.num_nodes], CFG.num_terms + CFG.rounds)
  np.testing.assert_array_equal(length[CFG.num_nodes:], CFG.num_spam)
  # true click counts = all benign entries
  assert int(np.asarray(st.gclicks).sum()) == CFG.num_nodes * (CFG.num_terms + CFG.rounds)


def python_gossip(known, targets, scheme):
  new = known.copy()
  for i, row in enumerate(targets):
    for t in row:
      if t < 0:
        continue
      if scheme == "push":
        new[t] = np.maximum(new[t], known[i])
      else:
        new[i] = np.maximum(new[i], known[t])
  return new


@pytest.mark.parametrize("scheme", ["push", "pull"])
def test_gossip_step_merges_logs_as_specified(scheme):
  rng = np.random.default_rng(1)
  n = 9
  length = rng.integers(1, 12, n)
  known = np.minimum(rng.integers(0, 12, (n, n)), length[None, :]) * (rng.uniform(size=(n, n)) < 0.4)
  np.fill_diagonal(known, length)
  link = rng.uniform(size=(n, n)) < 0.2
  active = np.ones(n, bool)
  active[-1] = False                                     # inactive nodes are never chosen
  fanout = rng.integers(0, 3, n)
  new, new_link, targets, size = G.gossip_step(known, link, active, fanout, jax.random.key(3), scheme)
  new, new_link, targets, size = (np.asarray(x) for x in (new, new_link, targets, size))
  contacts = (link | (known > 0)) & ~np.eye(n, dtype=bool)
  for i in range(n):
    chosen = [t for t in targets[i] if t >= 0]
    assert len(chosen) == len(set(chosen)) == min(fanout[i], int(np.sum(contacts[i] & active)))
    assert all(contacts[i, t] and active[t] for t in chosen)
    for t, s in zip(targets[i], size[i]):
      if t >= 0:   # message = entries the receiver did not know
        src, dst = (i, t) if scheme == "push" else (t, i)
        assert s == np.sum(np.maximum(known[src] - known[dst], 0))
        assert new_link[t, i]
  np.testing.assert_array_equal(new, python_gossip(known, targets, scheme))
  assert np.all(new >= known) and np.all(new <= length[None, :])        # monotone, no invented entries
  np.testing.assert_array_equal(np.diag(new), length)


def test_deterministic_with_seed(runs):
  again = G.simulate_grank(CFG, seed=0, offset=1.0)
  for name in ("list_distance", "popular_share", "target_share", "message_size", "knowledge"):
    np.testing.assert_array_equal(getattr(again, name), getattr(runs[1.0], name))
  np.testing.assert_array_equal(np.asarray(again.state.known), np.asarray(runs[1.0].state.known))
  other = G.simulate_grank(CFG, seed=1, offset=1.0)
  assert not np.array_equal(np.asarray(other.state.e_item), np.asarray(runs[1.0].state.e_item))


def test_targeted_sybil_attack_direction(runs):
  """Documented direction: with F = 1 the fake clicks count whatever the Sybils' similarity, so after the
  attack round the share of benign nodes ranking the target item first rises towards 1; with F = 0 the
  near-zero similarity of the Sybils keeps it low (the isolation that F = 0 buys)."""
  attack = CFG.resolved_rounds()[1]
  f1, f0 = runs[1.0].target_share, runs[0.0].target_share
  assert f1[:attack].max() <= 0.1                      # before the attack the least popular item is rarely first
  assert f1[-1] >= 0.8
  assert f0[-1] <= 0.2 and f0[-1] < f1[-1] - 0.5
  # the spam reaches benign nodes: they know Sybil entries at the end
  known = np.asarray(runs[1.0].state.known)
  assert known[:CFG.num_nodes, CFG.num_nodes:].sum() > 0
  # target is the least popular item of the target term
  term, item = runs[1.0].target
  assert item == int(np.argmin(runs[1.0].popularity[term]))


def test_list_distance_function():
  assert G.list_distance([1, 2, 3, 4], [1, 2, 3, 4]) == 0
  assert G.list_distance([1, 2, 3, 4], [4, 3, 2, 1]) == 3 + 1 + 1 + 3
  assert G.list_distance([1, 2, 3], [9, 3, 8]) == 1          # only shared items count
  assert G.list_distance([], [1, 2]) == 0


def test_footrule_of_ranked_lists_against_numpy():
  """_footrule(order_a, order_b) = Σ_items |position in a − position in b| (float64 numpy oracle), per row."""
  rng = np.random.default_rng(0)
  a = np.stack([rng.permutation(9) for _ in range(16)])
  b = np.stack([rng.permutation(9) for _ in range(16)])
  pos = lambda order: np.argsort(order, axis=-1)        # pos[item] = where the item stands in the list
  want = np.abs(pos(a) - pos(b)).sum(-1)
  np.testing.assert_array_equal(np.asarray(G._footrule(jnp.asarray(a), jnp.asarray(b))), want)
  assert [G.list_distance(rb_, ra) for ra, rb_ in zip(a, b)] == want.tolist()


def test_top_terms_mask_ties_and_zero_counts():
  mask = np.asarray(G.top_terms_mask(jnp.array([[3, 5, 3, 0, 3]]), 3))
  np.testing.assert_array_equal(mask, [[True, True, True, False, False]])   # ties -> lower term id
  np.testing.assert_array_equal(np.asarray(G.top_terms_mask(jnp.array([[0, 2, 0]]), 3)), [[False, True, False]])


@pytest.mark.parametrize("field, value, match", [
    ("similarity", "jaccard", "similarity"), ("gossip", "flood", "gossip"), ("attack", "targeted", "num_sybils"),
    ("num_nodes", 0, "num_nodes"), ("offset", -1.0, "offset"), ("follow_prob", 1.5, "follow_prob"),
    ("target_term", 7, "target_term"), ("attack_round", 99, "attack_round"), ("rounds", 40000, "int16"),
])
def test_bad_config(field, value, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(G.GRankConfig(num_nodes=4, num_terms=3, rounds=8), **{field: value}).validate()


def test_scenarios():
  cfg = G.grank_scenario("epic_sybil", num_nodes=10)
  assert cfg.num_sybils == 30 and cfg.attack == "targeted"
  assert G.grank_scenario("clicklog_inflation", num_nodes=10).num_spam == 1000
  with pytest.raises(ValueError, match="scenario"):
    G.grank_scenario("ddos")


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    dict(attack="inflation", gossip="pull", similarity="code"),
    dict(attack="targeted", gossip="pull", num_sybils=30),        # an "epic" attack on 24 nodes, pull gossip
])
def test_other_scenarios_keep_invariants_and_match_oracle(overrides):
  cfg = dataclasses.replace(CFG, **overrides)
  res = G.simulate_grank(cfg, seed=2, offset=1.0)
  st = res.state
  known, length = np.asarray(st.known), np.asarray(st.length)
  np.testing.assert_array_equal(np.diag(known), length)
  assert np.all(known <= length[None, :])
  np.testing.assert_array_equal(length[cfg.num_nodes:], cfg.num_spam)
  e_term = np.asarray(st.e_term)[cfg.num_nodes:, :cfg.num_spam]
  if cfg.attack == "inflation":
    assert len(np.unique(e_term)) > 1                  # random terms
  else:
    assert np.all(e_term == cfg.target_term)
  np.testing.assert_allclose(np.asarray(st.sim), oracle_similarity(st, cfg.top_k_terms, cfg.similarity),
                             rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(res.list_distance)) and np.all(res.knowledge <= 1 + 1e-6)
