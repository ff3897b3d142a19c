"""Retrieval metrics: Iceberg's task-centric metrics, MRR@k / nDCG@k / MAP, and exact k-NN ground truth.

Papers:
- Iceberg: Chen et al., "Reveal Hidden Pitfalls and Navigate Next Generation of Vector Similarity Search from
  Task-Centric Views", arXiv:2512.12980. Metrics of its evaluator (Q queries, Res_q = retrieved base ids):
    Synthetic Recall@K   = sum_q |GT_q ∩ Res_q[:K]| / (Q K),  GT_q = exact nearest neighbours of q
    Label Recall@K       = sum_q #{r in Res_q[:K] : label(r) = label(q)} / sum_q min(#base items with label(q), K)
    Majority vote@K      = mean_q [argmax_c #{r in Res_q[:K] : label(r) = c} = label(q)]
    Hit@K                = mean_q [target_q in Res_q[:K]]
    Popularity Score@K   = sum_q sum_{h in items(Res_q[:K]) ∩ Hot(q)} hot(h) / sum_q sum_{h in Hot(q)} hot(h)
- Standard IR metrics (as trec_eval / ir-measures / ranx compute them) for a score matrix over D candidates:
    RR@k   = 1 / rank of the first relevant doc within the top k (0 if none)
    DCG@k  = sum_{r <= k} gain(rel_r) / log2(r + 1),  gain = rel ("linear", trec_eval) or 2^rel - 1 ("exponential")
    nDCG@k = DCG@k / IDCG@k, IDCG from the relevance of all judged docs sorted descending (0 if IDCG = 0)
    AP     = sum_{r: rel_r >= 1} Precision@r / R,  R = number of judged relevant docs (0 if R = 0)
  Doc-level relevance is binary for RR and AP (rel >= 1, trec_eval's default relevance level).

Documented choices (the papers and reference code leave them open):
- Ties in the scores are broken by candidate position: of two equal scores the doc in the lower column ranks
  first (a stable sort). trec_eval instead breaks ties by reverse docno order; sort your columns accordingly to
  reproduce it. Scores are compared in float32 at least (bf16 scores are upcast first, which keeps their ties).
- Judged docs that were not retrieved are columns with where=False: they never get a rank but count in IDCG and R.
- A query without relevant docs scores 0 in RR, nDCG and AP; the means are over all queries. Use per_query=True
  and your own mask to average over other subsets (trec_eval drops queries absent from the qrels).
- Iceberg Synthetic Recall divides by Q K even when a list is shorter than K (missing results are misses), and by
  default compares with the top-K of the ground truth; gt_depth=100 with a top-100 ground truth reproduces the
  reference evaluator at every K (it always intersects with its top-100 file).
- Popularity Score counts each hot item once per query (the set in the paper's formula); the reference evaluator
  counts a hot item once per retrieved vector that maps to it: count_duplicates=True reproduces that. If no query
  has hot items the score is 0 (as the reference). Label Recall with an all-zero denominator is 0 as well.
- Majority vote ties go to the smallest label (numpy argmax of a bincount, as the reference). A query without any
  retrieved item counts as a miss.
- -1 marks padding (no result) in every id/label array.

Exact k-NN ground truth (faiss IndexFlatIP / IndexFlatL2 semantics): `exact_knn` scans the base in chunks of
`base_batch` rows inside a lax.scan, keeping a running top-k, for `query_batch` queries at a time, so at most a
[query_batch, k + base_batch] score block exists at once. L2 returns squared distances (like faiss), clipped at 0;
cosine normalises both sides first. Equal scores keep the lower base index first.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lostjax.metrics._checks import check_finite, concrete_or_none

PAD = -1
GAINS = ("linear", "exponential")
KNN_METRICS = ("ip", "l2", "cosine")


# ----------------------------------------------------------------------------------------------- validation
def _check_int_matrix(x, name: str, ndim: int = 2) -> None:
  shape = np.shape(x)
  if len(shape) != ndim:
    raise ValueError(f"{name} must be a {ndim}-D array, got shape {shape}")
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{name} must hold integer ids (-1 = padding), got dtype {dtype}")
  arr = concrete_or_none(x)
  if arr is not None and arr.size and arr.min() < PAD:
    raise ValueError(f"{name} has negative ids other than the padding -1, e.g. {int(arr.min())}")


def _check_k(k, name: str = "k") -> int:
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise ValueError(f"{name} must be an int >= 1, got {k!r}")
  return int(k)


def _check_rows(a, b, name_a: str, name_b: str) -> None:
  if np.shape(a)[0] != np.shape(b)[0]:
    raise ValueError(f"{name_a} and {name_b} must have the same number of queries, "
                     f"got {np.shape(a)[0]} and {np.shape(b)[0]}")
  if np.shape(a)[0] == 0:
    raise ValueError(f"{name_a} has no queries (shape {np.shape(a)})")


# ------------------------------------------------------------------------------------------ Iceberg metrics
def synthetic_recall(ground_truth, results, k: int, *, gt_depth: Optional[int] = None) -> jax.Array:
  """Iceberg Synthetic Recall@K: sum_q |GT_q[:gt_depth] ∩ Res_q[:K]| / (Q K).

  Args:
    ground_truth: [Q, G] exact nearest-neighbour ids per query, best first (see `exact_knn`), -1 padded.
    results: [Q, L] retrieved ids, best first, -1 padded. Duplicate ids count once.
    k: the cut-off K.
    gt_depth: ground-truth columns compared with (default K, the standard recall@K; the Iceberg evaluator uses
      its top-100 file for every K, i.e. gt_depth=100).
  """
  _check_int_matrix(ground_truth, "ground_truth")
  _check_int_matrix(results, "results")
  _check_rows(ground_truth, results, "ground_truth", "results")
  k = _check_k(k)
  depth = k if gt_depth is None else _check_k(gt_depth, "gt_depth")
  return _synthetic_recall(jnp.asarray(ground_truth)[:, :depth], jnp.asarray(results)[:, :k], k=k)


@functools.partial(jax.jit, static_argnames=("k",))
def _synthetic_recall(gt, res, *, k):
  valid = res != PAD
  # first occurrence of each retrieved id (set semantics for duplicates)
  pos = jnp.arange(res.shape[1])
  dup = jnp.any((res[:, :, None] == res[:, None, :]) & (pos[None, None, :] < pos[None, :, None]), axis=2)
  in_gt = jnp.any((res[:, :, None] == gt[:, None, :]) & (gt[:, None, :] != PAD), axis=2)
  hits = jnp.sum(valid & ~dup & in_gt)
  return hits / (res.shape[0] * k)


def label_recall(query_labels, result_labels, base_label_counts, k: int) -> jax.Array:
  """Iceberg Label Recall@K: label matches in the top K over sum_q min(#base items with label(q), K).

  Args:
    query_labels: [Q] label of each query.
    result_labels: [Q, L] labels of the retrieved base items, best first, -1 padded.
    base_label_counts: [C] number of base items per label (e.g. `np.bincount(base_labels)`).
    k: the cut-off K.
  """
  _check_int_matrix(query_labels, "query_labels", 1)
  _check_int_matrix(result_labels, "result_labels")
  _check_int_matrix(base_label_counts, "base_label_counts", 1)
  _check_rows(query_labels, result_labels, "query_labels", "result_labels")
  k = _check_k(k)
  _check_labels_in_range(query_labels, np.shape(base_label_counts)[0], "query_labels")
  return _label_recall(jnp.asarray(query_labels), jnp.asarray(result_labels)[:, :k],
                       jnp.asarray(base_label_counts), k=k)


@functools.partial(jax.jit, static_argnames=("k",))
def _label_recall(ql, res, counts, *, k):
  found = jnp.sum((res == ql[:, None]) & (res != PAD))
  possible = jnp.sum(jnp.minimum(jnp.where(ql >= 0, counts[jnp.clip(ql, 0)], 0), k))
  return jnp.where(possible > 0, found / jnp.maximum(possible, 1), 0.0)


def _check_labels_in_range(labels, num_labels: int, name: str) -> None:
  arr = concrete_or_none(labels)
  if arr is not None and arr.size and (arr.max() >= num_labels or arr.min() < 0):
    bad = arr[(arr >= num_labels) | (arr < 0)][0]
    raise ValueError(f"{name} has label {int(bad)} outside the {num_labels} labels of base_label_counts")


def majority_vote_accuracy(query_labels, result_labels, k: int) -> jax.Array:
  """Iceberg majority-vote classification@K: share of queries whose most frequent top-K label is their label.

  Ties between labels go to the smallest label; a query with no retrieved item is a miss."""
  _check_int_matrix(query_labels, "query_labels", 1)
  _check_int_matrix(result_labels, "result_labels")
  _check_rows(query_labels, result_labels, "query_labels", "result_labels")
  k = _check_k(k)
  return _majority(jnp.asarray(query_labels), jnp.asarray(result_labels)[:, :k])


@jax.jit
def _majority(ql, res):
  valid = res != PAD
  votes = jnp.sum((res[:, :, None] == res[:, None, :]) & valid[:, None, :], axis=2)    # [Q, K] votes of slot a
  best = jnp.max(votes, axis=1, keepdims=True)
  big = jnp.iinfo(jnp.int32).max
  winner = jnp.min(jnp.where(valid & (votes == best), res, big), axis=1)
  return jnp.mean((winner == ql) & jnp.any(valid, axis=1))


def hit_rate(targets, results, k: int) -> jax.Array:
  """Iceberg Hit@K: share of queries whose target id (e.g. its own paragraph) is in the top K."""
  _check_int_matrix(targets, "targets", 1)
  _check_int_matrix(results, "results")
  _check_rows(targets, results, "targets", "results")
  k = _check_k(k)
  return _hit_rate(jnp.asarray(targets), jnp.asarray(results)[:, :k])


@jax.jit
def _hit_rate(t, res):
  return jnp.mean(jnp.any((res == t[:, None]) & (res != PAD), axis=1))


def popularity_score(hot_items, hot_values, result_items, k: int, *, count_duplicates: bool = False) -> jax.Array:
  """Iceberg Popularity ("Matching") Score@K: hot value of the retrieved hot items over all hot value.

  Args:
    hot_items: [Q, H] hot item ids of each query, -1 padded; ids must be unique within a row.
    hot_values: [Q, H] their hot level (the reference evaluator uses the second level).
    result_items: [Q, L] item id of each retrieved base vector (map base rows to items first), -1 padded.
    k: the cut-off K.
    count_duplicates: count a hot item once per retrieved vector mapping to it (the reference code) instead of
      once per query (the paper's set formula, default).
  """
  _check_int_matrix(hot_items, "hot_items")
  _check_int_matrix(result_items, "result_items")
  _check_rows(hot_items, result_items, "hot_items", "result_items")
  if np.shape(hot_values) != np.shape(hot_items):
    raise ValueError(f"hot_values must have the shape of hot_items {np.shape(hot_items)}, got {np.shape(hot_values)}")
  check_finite(hot_values, "hot_values")
  hv = concrete_or_none(hot_values)
  if hv is not None and hv.size and hv.min() < 0:
    raise ValueError(f"hot_values must be >= 0, got {float(hv.min())}")
  hi = concrete_or_none(hot_items)
  if hi is not None:
    for q, row in enumerate(hi):
      ids = row[row != PAD]
      if len(np.unique(ids)) != len(ids):
        raise ValueError(f"hot_items row {q} repeats an item id: {ids.tolist()}")
  k = _check_k(k)
  return _popularity(jnp.asarray(hot_items), jnp.asarray(hot_values, jnp.float32),
                     jnp.asarray(result_items)[:, :k], count_duplicates=bool(count_duplicates))


@functools.partial(jax.jit, static_argnames=("count_duplicates",))
def _popularity(hot, hot_values, res, *, count_duplicates):
  val = jnp.where(hot != PAD, hot_values, 0.0)
  match = (hot[:, :, None] == res[:, None, :]) & (hot[:, :, None] != PAD)     # [Q, H, K]
  mult = jnp.sum(match, axis=2) if count_duplicates else jnp.any(match, axis=2)
  found = jnp.sum(val * mult)
  total = jnp.sum(val)
  return jnp.where(total > 0, found / jnp.where(total > 0, total, 1.0), 0.0)


# --------------------------------------------------------------------------------- MRR / nDCG / MAP
def _prepare_run(scores, relevance, where):
  """Validated (scores, relevance, where) as arrays: float32 at least (float64 stays), bool mask."""
  shape = np.shape(scores)
  if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
    raise ValueError(f"scores must be a non-empty 2-D [queries, docs] array, got shape {shape}")
  if np.shape(relevance) != shape:
    raise ValueError(f"relevance must have the shape of scores {shape}, got {np.shape(relevance)}")
  if where is not None and np.shape(where) != shape:
    raise ValueError(f"where must have the shape of scores {shape}, got {np.shape(where)}")
  dtype = jnp.result_type(scores)
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(f"scores must be real, got dtype {dtype}")
  check_finite(scores, "scores")
  check_finite(relevance, "relevance")
  rel_np = concrete_or_none(relevance)
  if rel_np is not None and rel_np.size and rel_np.min() < 0:
    raise ValueError(f"relevance must be >= 0 (0 = not relevant), got {float(rel_np.min())}")
  s = jnp.asarray(scores)
  s = s.astype(jnp.float64 if s.dtype == jnp.float64 else jnp.float32)
  rel = jnp.asarray(relevance).astype(s.dtype)
  valid = jnp.ones(shape, bool) if where is None else jnp.asarray(where, bool)
  return s, rel, valid


def _ranked(s, rel, valid):
  """Relevance in rank order: retrieved docs first, by descending score, ties by column (lexsort is stable)."""
  order = jnp.lexsort((-s, (~valid).astype(jnp.int32)), axis=-1)
  return jnp.where(jnp.take_along_axis(valid, order, axis=1), jnp.take_along_axis(rel, order, axis=1), 0.0)


def _cut(k, num_docs) -> int:
  return num_docs if k is None else min(_check_k(k), num_docs)


@functools.partial(jax.jit, static_argnames=("kind", "k", "gain", "per_query"))
def _rank_metric(s, rel, valid, *, kind: str, k: int, gain: str, per_query: bool):
  ranked = _ranked(s, rel, valid)
  if kind == "rr":
    hit = ranked[:, :k] >= 1
    val = jnp.where(jnp.any(hit, axis=1), 1.0 / (jnp.argmax(hit, axis=1) + 1.0), 0.0)
  elif kind == "ndcg":
    g = (lambda r: r) if gain == "linear" else (lambda r: jnp.exp2(r) - 1.0)
    disc = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=ranked.dtype))
    dcg = jnp.sum(g(ranked[:, :k]) * disc, axis=1)
    idcg = jnp.sum(g(-jnp.sort(-rel, axis=1)[:, :k]) * disc, axis=1)
    val = jnp.where(idcg > 0, dcg / jnp.where(idcg > 0, idcg, 1.0), 0.0)
  else:
    hit = (ranked[:, :k] >= 1).astype(ranked.dtype)
    prec = jnp.cumsum(hit, axis=1) / jnp.arange(1, k + 1, dtype=ranked.dtype)
    num_rel = jnp.sum(rel >= 1, axis=1)
    val = jnp.where(num_rel > 0, jnp.sum(prec * hit, axis=1) / jnp.maximum(num_rel, 1), 0.0)
  return val if per_query else jnp.mean(val)


def mrr(scores, relevance, k: Optional[int] = 10, *, where=None, per_query: bool = False) -> jax.Array:
  """MRR@k: mean reciprocal rank of the first relevant (rel >= 1) doc within the top k.

  Args:
    scores: [Q, D] run scores of D candidate docs per query (higher ranks first).
    relevance: [Q, D] graded relevance (0 = not relevant) of the same docs.
    k: cut-off (None: the whole list).
    where: [Q, D] bool, False for padding or for judged docs the run did not retrieve.
    per_query: return the [Q] per-query values instead of their mean.
  """
  s, rel, valid = _prepare_run(scores, relevance, where)
  return _rank_metric(s, rel, valid, kind="rr", k=_cut(k, s.shape[1]), gain="linear", per_query=bool(per_query))


def ndcg(scores, relevance, k: Optional[int] = 10, *, where=None, gain: str = "linear",
         per_query: bool = False) -> jax.Array:
  """nDCG@k with log2(rank + 1) discounts; gain 'linear' (rel, trec_eval) or 'exponential' (2^rel - 1).

  Arguments as `mrr`. The ideal DCG uses every judged doc of the row, retrieved (where=True) or not."""
  if gain not in GAINS:
    raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")
  s, rel, valid = _prepare_run(scores, relevance, where)
  return _rank_metric(s, rel, valid, kind="ndcg", k=_cut(k, s.shape[1]), gain=gain, per_query=bool(per_query))


def average_precision(scores, relevance, k: Optional[int] = None, *, where=None,
                      per_query: bool = False) -> jax.Array:
  """MAP (AP@k with k=None): mean over relevant ranks r <= k of Precision@r, divided by all judged relevant R.

  Arguments as `mrr`; the default has no cut-off (trec_eval 'map')."""
  s, rel, valid = _prepare_run(scores, relevance, where)
  return _rank_metric(s, rel, valid, kind="ap", k=_cut(k, s.shape[1]), gain="linear", per_query=bool(per_query))


mean_average_precision = average_precision


# ------------------------------------------------------------------------------------------ exact k-NN
@functools.partial(jax.jit, static_argnames=("k", "metric", "base_batch", "num_base"))
def _knn_block(q, base_chunks, base_sq, *, k: int, metric: str, base_batch: int, num_base: int):
  """Top-k of one query block against the chunked base: running top-k merged per chunk (lower index first)."""
  nq = q.shape[0]
  q_sq = jnp.sum(q * q, axis=1, keepdims=True)

  def step(carry, xs):
    best_v, best_i = carry
    chunk, chunk_sq, start = xs
    s = jnp.dot(q, chunk.T, precision=jax.lax.Precision.HIGHEST)
    if metric == "l2":
      s = -(q_sq - 2.0 * s + chunk_sq[None, :])
    idx = start + jnp.arange(base_batch, dtype=jnp.int32)
    s = jnp.where(idx[None, :] < num_base, s, -jnp.inf)
    vals = jnp.concatenate([best_v, s], axis=1)
    ids = jnp.concatenate([best_i, jnp.broadcast_to(idx, (nq, base_batch))], axis=1)
    top_v, pos = jax.lax.top_k(vals, k)      # stable: equal values keep the earlier (lower-index) entry
    return (top_v, jnp.take_along_axis(ids, pos, axis=1)), None

  init = (jnp.full((nq, k), -jnp.inf, q.dtype), jnp.full((nq, k), -1, jnp.int32))
  starts = jnp.arange(base_chunks.shape[0], dtype=jnp.int32) * base_batch
  (v, i), _ = jax.lax.scan(step, init, (base_chunks, base_sq, starts))
  if metric == "l2":
    v = jnp.maximum(-v, 0.0)
  return v, i


def exact_knn(queries, base, k: int, *, metric: str = "ip", query_batch: int = 1024,
              base_batch: int = 16384):
  """Exact k nearest neighbours of each query in `base` (the Iceberg synthetic-recall ground truth).

  Args:
    queries: [Q, D] float; base: [N, D] float (bf16/f16 are upcast to float32; float64 stays float64).
    k: neighbours per query (<= N).
    metric: 'ip' (largest inner product, faiss IndexFlatIP), 'l2' (smallest squared L2, IndexFlatL2) or
      'cosine' (largest cosine similarity).
    query_batch, base_batch: block sizes; memory ~ query_batch x (k + base_batch) scores.

  Returns:
    (values [Q, k], indices [Q, k] int32): inner products / squared distances / cosines, best first.
  """
  if metric not in KNN_METRICS:
    raise ValueError(f"metric must be one of {KNN_METRICS}, got {metric!r}")
  qs, bs = np.shape(queries), np.shape(base)
  if len(qs) != 2 or len(bs) != 2 or qs[1] != bs[1] or qs[0] == 0 or bs[0] == 0 or qs[1] == 0:
    raise ValueError(f"queries [Q, D] and base [N, D] must be non-empty 2-D with equal D, got {qs} and {bs}")
  k = _check_k(k)
  if k > bs[0]:
    raise ValueError(f"k={k} is larger than the base ({bs[0]} vectors)")
  query_batch = _check_k(query_batch, "query_batch")
  base_batch = _check_k(base_batch, "base_batch")
  check_finite(queries, "queries")
  check_finite(base, "base")
  q = jnp.asarray(queries)
  b = jnp.asarray(base)
  dtype = jnp.float64 if (q.dtype == jnp.float64 or b.dtype == jnp.float64) else jnp.float32
  q, b = q.astype(dtype), b.astype(dtype)
  if metric == "cosine":
    q = q / jnp.maximum(jnp.linalg.norm(q, axis=1, keepdims=True), jnp.finfo(dtype).tiny)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=1, keepdims=True), jnp.finfo(dtype).tiny)
  n = bs[0]
  base_batch = min(base_batch, n)
  num_chunks = -(-n // base_batch)
  b = jnp.pad(b, ((0, num_chunks * base_batch - n), (0, 0))).reshape(num_chunks, base_batch, -1)
  b_sq = jnp.sum(b * b, axis=2)
  kind = "l2" if metric == "l2" else "ip"
  vals, ids = [], []
  for start in range(0, qs[0], query_batch):
    block = q[start:start + query_batch]
    v, i = _knn_block(block, b, b_sq, k=k, metric=kind, base_batch=base_batch, num_base=n)
    vals.append(v)
    ids.append(i)
  return jnp.concatenate(vals), jnp.concatenate(ids)
