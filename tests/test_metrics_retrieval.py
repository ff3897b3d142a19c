"""Tests for lostjax.metrics.retrieval: MRR/nDCG/MAP against ir-measures (pytrec_eval) and ranx, exact k-NN
against faiss, the Iceberg metrics against python loops written from the paper's formulas, and edge cases."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax.metrics import retrieval as R

def _ir_measures():
  """The ir_measures oracle, or a skip of the one test that needs it (the loop oracles need nothing)."""
  return pytest.importorskip("ir_measures")


# ------------------------------------------------------------------------------------------ oracles
def run_and_qrels(scores, relevance, where):
  ir_measures = _ir_measures()
  qrels, run = [], []
  for q in range(scores.shape[0]):
    for d in range(scores.shape[1]):
      qrels.append(ir_measures.Qrel(f"q{q}", f"d{d:04d}", int(relevance[q, d])))
      if where[q, d]:
        run.append(ir_measures.ScoredDoc(f"q{q}", f"d{d:04d}", float(scores[q, d])))
  return qrels, run


def loop_ranked(scores, relevance, where):
  """Python oracle of the documented order: retrieved docs by descending score, ties by column."""
  out = []
  for q in range(scores.shape[0]):
    docs = [d for d in range(scores.shape[1]) if where[q, d]]
    docs.sort(key=lambda d: (-float(scores[q, d]), d))
    out.append([float(relevance[q, d]) for d in docs])
  return out


def loop_metrics(scores, relevance, where, k, gain):
  rr, nd, ap = [], [], []
  for q, ranked in enumerate(loop_ranked(scores, relevance, where)):
    top = ranked[:k]
    rr.append(next((1.0 / (i + 1) for i, r in enumerate(top) if r >= 1), 0.0))
    g = (lambda r: r) if gain == "linear" else (lambda r: 2.0 ** r - 1.0)
    dcg = sum(g(r) / math.log2(i + 2) for i, r in enumerate(top))
    ideal = sorted(relevance[q].tolist(), reverse=True)[:k]
    idcg = sum(g(r) / math.log2(i + 2) for i, r in enumerate(ideal))
    nd.append(dcg / idcg if idcg > 0 else 0.0)
    num_rel = int(np.sum(relevance[q] >= 1))
    hits, s = 0, 0.0
    for i, r in enumerate(ranked):
      if r >= 1:
        hits += 1
        s += hits / (i + 1)
    ap.append(s / num_rel if num_rel else 0.0)
  return np.array(rr), np.array(nd), np.array(ap)


def random_run(seed, q=12, d=40, missing=0.15):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(q, d))
  relevance = rng.choice([0, 0, 0, 1, 2, 3], size=(q, d))
  relevance[:, 0] = np.maximum(relevance[:, 0], 1)        # every query has >= 1 judged relevant doc
  where = rng.uniform(size=(q, d)) > missing
  where[:, :5] = True
  return scores, relevance, where


# ------------------------------------------------------------------------------- MRR / nDCG / MAP
@pytest.mark.parametrize("seed", [0, 1])
def test_ranking_metrics_match_ir_measures(seed):
  ir_measures = _ir_measures()
  scores, relevance, where = random_run(seed)
  qrels, run = run_and_qrels(scores, relevance, where)
  ref = ir_measures.calc_aggregate([ir_measures.RR @ 10, ir_measures.nDCG @ 10, ir_measures.AP,
                                    ir_measures.nDCG @ 5, ir_measures.AP @ 10], qrels, run)
  with jax.enable_x64(True):
    np.testing.assert_allclose(R.mrr(scores, relevance, 10, where=where), ref[ir_measures.RR @ 10], rtol=1e-12)
    np.testing.assert_allclose(R.ndcg(scores, relevance, 10, where=where), ref[ir_measures.nDCG @ 10], rtol=1e-12)
    np.testing.assert_allclose(R.ndcg(scores, relevance, 5, where=where), ref[ir_measures.nDCG @ 5], rtol=1e-12)
    np.testing.assert_allclose(R.average_precision(scores, relevance, where=where), ref[ir_measures.AP],
                               rtol=1e-12)
    # trec_eval's P/AP@10 denominator is still all relevant docs
    np.testing.assert_allclose(R.average_precision(scores, relevance, 10, where=where), ref[ir_measures.AP @ 10],
                               rtol=1e-12)
  # float32 default path
  np.testing.assert_allclose(R.ndcg(scores.astype(np.float32), relevance, 10, where=where),
                             ref[ir_measures.nDCG @ 10], rtol=1e-5)


def test_per_query_values_match_ir_measures_and_loop():
  ir_measures = _ir_measures()
  scores, relevance, where = random_run(2)
  qrels, run = run_and_qrels(scores, relevance, where)
  per_q = {m: np.zeros(scores.shape[0]) for m in ("rr", "ndcg", "ap")}
  for m in ir_measures.iter_calc([ir_measures.RR @ 10, ir_measures.nDCG @ 10, ir_measures.AP], qrels, run):
    key = {"RR@10": "rr", "nDCG@10": "ndcg", "AP": "ap"}[str(m.measure)]
    per_q[key][int(m.query_id[1:])] = m.value
  rr, nd, ap = loop_metrics(scores, relevance, where, 10, "linear")
  np.testing.assert_allclose(per_q["rr"], rr, rtol=1e-12)
  np.testing.assert_allclose(per_q["ndcg"], nd, rtol=1e-12)
  np.testing.assert_allclose(per_q["ap"], ap, rtol=1e-12)
  with jax.enable_x64(True):
    np.testing.assert_allclose(R.mrr(scores, relevance, where=where, per_query=True), rr, rtol=1e-12)
    np.testing.assert_allclose(R.ndcg(scores, relevance, where=where, per_query=True), nd, rtol=1e-12)
    np.testing.assert_allclose(R.average_precision(scores, relevance, where=where, per_query=True), ap, rtol=1e-12)


def test_exponential_gain_against_loop():
  scores, relevance, where = random_run(3)
  _, nd, _ = loop_metrics(scores, relevance, where, 10, "exponential")
  with jax.enable_x64(True):
    np.testing.assert_allclose(R.ndcg(scores, relevance, 10, where=where, gain="exponential", per_query=True),
                               nd, rtol=1e-12)


@pytest.mark.slow
def test_against_ranx():   # ranx compiles numba kernels on first use (~80 s on 2 cores)
  ranx = pytest.importorskip("ranx")
  scores, relevance, where = random_run(4)
  qrels = ranx.Qrels({f"q{q}": {f"d{d}": int(relevance[q, d]) for d in range(scores.shape[1])
                                if relevance[q, d] > 0} for q in range(scores.shape[0])})
  run = ranx.Run({f"q{q}": {f"d{d}": float(scores[q, d]) for d in range(scores.shape[1]) if where[q, d]}
                  for q in range(scores.shape[0])})
  ref = ranx.evaluate(qrels, run, ["mrr@10", "ndcg@10", "map", "ndcg_burges@10"])
  with jax.enable_x64(True):
    np.testing.assert_allclose(R.mrr(scores, relevance, where=where), ref["mrr@10"], rtol=1e-9)
    np.testing.assert_allclose(R.ndcg(scores, relevance, where=where), ref["ndcg@10"], rtol=1e-9)
    np.testing.assert_allclose(R.average_precision(scores, relevance, where=where), ref["map"], rtol=1e-9)
    np.testing.assert_allclose(R.ndcg(scores, relevance, where=where, gain="exponential"),
                               ref["ndcg_burges@10"], rtol=1e-9)


def test_ties_are_broken_by_column_and_bf16_scores():
  # all equal scores: the order is the column order
  relevance = np.array([[0, 0, 1, 0], [1, 0, 0, 0]])
  scores = np.zeros((2, 4))
  np.testing.assert_allclose(R.mrr(scores, relevance, per_query=True), [1 / 3, 1.0])
  # bf16 rounding creates ties: the result equals the loop oracle on the rounded scores
  rng = np.random.default_rng(5)
  s = rng.normal(size=(6, 30)) * 1e-3 + 1.0
  rel = rng.choice([0, 1, 2], size=(6, 30))
  s_bf = np.asarray(jnp.asarray(s, jnp.bfloat16).astype(jnp.float32))
  assert len(np.unique(s_bf)) < s_bf.size                       # ties exist
  rr, nd, ap = loop_metrics(s_bf, rel, np.ones_like(rel, bool), 10, "linear")
  np.testing.assert_allclose(R.mrr(jnp.asarray(s, jnp.bfloat16), rel, per_query=True), rr, rtol=1e-6)
  np.testing.assert_allclose(R.ndcg(jnp.asarray(s, jnp.bfloat16), rel, per_query=True), nd, rtol=1e-5)
  np.testing.assert_allclose(R.average_precision(jnp.asarray(s, jnp.bfloat16), rel, per_query=True), ap, rtol=1e-5)


def test_edge_cases_no_relevant_k_larger_than_list_and_jit():
  scores = np.array([[0.3, 0.2, 0.1], [0.1, 0.9, 0.5]])
  relevance = np.array([[0, 0, 0], [0, 0, 2]])
  np.testing.assert_allclose(R.mrr(scores, relevance, 100, per_query=True), [0.0, 0.5])
  np.testing.assert_allclose(R.average_precision(scores, relevance, per_query=True), [0.0, 0.5])
  np.testing.assert_allclose(R.ndcg(scores, relevance, 100, per_query=True), [0.0, 1 / math.log2(3)], rtol=1e-6)
  # a relevant doc that was not retrieved: AP and nDCG < 1 even though the retrieved list is perfect
  where = np.array([[True, True, True], [False, True, True]])
  relevance2 = np.array([[1, 0, 0], [3, 0, 2]])
  assert float(R.average_precision(scores, relevance2, where=where, per_query=True)[1]) == pytest.approx(0.25)
  jitted = jax.jit(lambda s, r: R.ndcg(s, r, 2))
  np.testing.assert_allclose(jitted(scores, relevance), R.ndcg(scores, relevance, 2), rtol=1e-6)


@pytest.mark.parametrize("fn", [R.mrr, R.ndcg, R.average_precision])
def test_ranking_bad_input(fn):
  with pytest.raises(ValueError, match="relevance must be >= 0"):
    fn(np.zeros((2, 3)), -np.ones((2, 3)))
  with pytest.raises(ValueError, match="shape"):
    fn(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="NaN"):
    fn(np.array([[np.nan, 1.0]]), np.zeros((1, 2)))
  with pytest.raises(ValueError, match="k must be"):
    fn(np.zeros((2, 3)), np.zeros((2, 3)), 0)
  with pytest.raises(ValueError, match="gain"):
    R.ndcg(np.zeros((2, 3)), np.zeros((2, 3)), gain="log")


# ------------------------------------------------------------------------------------------- exact k-NN
@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_exact_knn_matches_faiss(metric):
  faiss = pytest.importorskip("faiss")
  rng = np.random.default_rng(0)
  base = rng.normal(size=(1000, 16)).astype(np.float32)
  queries = rng.normal(size=(37, 16)).astype(np.float32)
  b, q = base, queries
  if metric == "cosine":
    b = base / np.linalg.norm(base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  index = faiss.IndexFlatL2(16) if metric == "l2" else faiss.IndexFlatIP(16)
  index.add(b)
  ref_v, ref_i = index.search(q, 10)
  v, i = R.exact_knn(queries, base, 10, metric=metric, query_batch=16, base_batch=128)
  np.testing.assert_allclose(v, ref_v, rtol=1e-4, atol=1e-4)
  # same neighbours except for float32 near-ties (none expected for this seed)
  np.testing.assert_array_equal(i, ref_i)


def test_exact_knn_ties_float64_and_bad_input():
  base = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
  with jax.enable_x64(True):
    v, i = R.exact_knn(np.array([[1.0, 0.0]]), base, 3, base_batch=1)
    assert v.dtype == jnp.float64
  np.testing.assert_array_equal(i, [[0, 2, 3]])      # equal scores: lower index first, across chunks
  np.testing.assert_allclose(v, [[1.0, 1.0, 0.5]])
  v, i = R.exact_knn(np.array([[1.0, 0.0]]), base, 4, metric="l2", base_batch=3)
  np.testing.assert_allclose(v, [[0.0, 0.0, 0.5, 2.0]], atol=1e-6)
  np.testing.assert_array_equal(i, [[0, 2, 3, 1]])
  with pytest.raises(ValueError, match="larger than the base"):
    R.exact_knn(base, base, 5)
  with pytest.raises(ValueError, match="metric"):
    R.exact_knn(base, base, 1, metric="hamming")
  with pytest.raises(ValueError, match="equal D"):
    R.exact_knn(base, np.zeros((3, 3)), 1)


# ------------------------------------------------------------------------------------------- Iceberg
def loop_synthetic_recall(gt, res, k, depth):
  total = 0
  for g, r in zip(gt, res):
    total += len({x for x in g[:depth] if x >= 0} & {x for x in r[:k] if x >= 0})
  return total / (len(res) * k)


def loop_label_recall(ql, rl, counts, k):
  found = sum(list(r[:k]).count(l) for l, r in zip(ql, rl))
  possible = sum(min(counts[l], k) for l in ql)
  return found / possible if possible else 0.0


def loop_majority(ql, rl, k):
  ok = 0
  for l, r in zip(ql, rl):
    labs = [x for x in r[:k] if x >= 0]
    if labs and int(np.argmax(np.bincount(labs))) == l:
      ok += 1
  return ok / len(ql)


def loop_popularity(hot, vals, res, k, dup):
  found = total = 0.0
  for h_row, v_row, r_row in zip(hot, vals, res):
    top = [x for x in r_row[:k] if x >= 0]
    for h, v in zip(h_row, v_row):
      if h < 0:
        continue
      total += v
      found += v * (top.count(h) if dup else (h in top))
  return found / total if total else 0.0


def test_label_recall_spec_worked_example():
  val = R.label_recall(np.array([0, 1]), np.array([[0, 0, 1, 2], [1, 2, 2, 2]]), np.array([3, 1, 10]), 4)
  np.testing.assert_allclose(val, 0.75)


@pytest.mark.parametrize("k", [1, 5, 12, 50])   # 50 > list length 12
def test_iceberg_metrics_against_loops(k):
  rng = np.random.default_rng(k)
  nq, n, c = 30, 60, 4
  base_labels = rng.integers(0, c, n)
  counts = np.bincount(base_labels, minlength=c)
  res = np.stack([rng.permutation(n)[:12] for _ in range(nq)])
  res[rng.uniform(size=res.shape) < 0.1] = -1
  gt = np.stack([rng.permutation(n)[:20] for _ in range(nq)])
  ql = rng.integers(0, c, nq)
  rl = np.where(res >= 0, base_labels[np.maximum(res, 0)], -1)
  for depth in (None, 20):
    np.testing.assert_allclose(R.synthetic_recall(gt, res, k, gt_depth=depth),
                               loop_synthetic_recall(gt, res, k, depth or k), rtol=1e-6)
  np.testing.assert_allclose(R.label_recall(ql, rl, counts, k), loop_label_recall(ql, rl, counts, k), rtol=1e-6)
  np.testing.assert_allclose(R.majority_vote_accuracy(ql, rl, k), loop_majority(ql, rl, k), rtol=1e-6)
  targets = rng.integers(0, n, nq)
  ref_hit = np.mean([t in r[:k] for t, r in zip(targets, res)])
  np.testing.assert_allclose(R.hit_rate(targets, res, k), ref_hit, rtol=1e-6)
  item_of_base = rng.integers(0, 15, n)               # several base vectors map to one item
  items = np.where(res >= 0, item_of_base[np.maximum(res, 0)], -1)
  hot = np.stack([rng.permutation(15)[:5] for _ in range(nq)])
  hot[:, 4] = -1
  vals = rng.uniform(0, 3, size=hot.shape)
  for dup in (False, True):
    np.testing.assert_allclose(R.popularity_score(hot, vals, items, k, count_duplicates=dup),
                               loop_popularity(hot, vals, items, k, dup), rtol=1e-5)


def test_iceberg_edge_cases_and_jit():
  # one class: majority vote is right whenever anything was retrieved; empty result row is a miss
  rl = np.array([[0, 0, 0], [-1, -1, -1]])
  np.testing.assert_allclose(R.majority_vote_accuracy(np.array([0, 0]), rl, 3), 0.5)
  # tie between labels 2 and 1 goes to the smaller label (1)
  np.testing.assert_allclose(R.majority_vote_accuracy(np.array([1]), np.array([[2, 1, 2, 1]]), 4), 1.0)
  np.testing.assert_allclose(R.majority_vote_accuracy(np.array([2]), np.array([[2, 1, 2, 1]]), 4), 0.0)
  # a label with no base items: zero denominator -> 0
  np.testing.assert_allclose(R.label_recall(np.array([1]), np.array([[0, 0]]), np.array([2, 0]), 2), 0.0)
  # duplicate ids count once in synthetic recall
  np.testing.assert_allclose(R.synthetic_recall(np.array([[3, 4]]), np.array([[3, 3]]), 2), 0.5)
  # no hot items anywhere -> 0
  np.testing.assert_allclose(R.popularity_score(np.full((2, 2), -1), np.zeros((2, 2)), np.zeros((2, 3), int), 3), 0)
  f = jax.jit(lambda g, r: R.synthetic_recall(g, r, 2))
  np.testing.assert_allclose(f(np.array([[1, 2]]), np.array([[2, 9]])), 0.5)


def test_iceberg_bad_input():
  with pytest.raises(ValueError, match="integer ids"):
    R.hit_rate(np.array([0.5]), np.array([[1, 2]]), 1)
  with pytest.raises(ValueError, match="same number of queries"):
    R.hit_rate(np.array([0, 1]), np.array([[1, 2]]), 1)
  with pytest.raises(ValueError, match="outside"):
    R.label_recall(np.array([5]), np.array([[1, 2]]), np.array([1, 1]), 1)
  with pytest.raises(ValueError, match="repeats"):
    R.popularity_score(np.array([[1, 1]]), np.ones((1, 2)), np.array([[1]]), 1)
  with pytest.raises(ValueError, match="negative ids"):
    R.synthetic_recall(np.array([[-3]]), np.array([[1]]), 1)
  with pytest.raises(ValueError, match="k must be"):
    R.hit_rate(np.array([0]), np.array([[1, 2]]), 0)
