"""LLM Swiss Round: Competitive Swiss-System Dynamics (CSD) over a models x benchmarks score table.

Paper: J. Liu, J. Wu, C. Wu, J. Liu, Z. Wang, H. Zhou, W. Huang, H. Namkoong, "LLM Swiss Round: Aggregating
Multi-Benchmark Performance via Competitive Swiss-System Dynamics", arXiv:2512.21010.

Implemented (no official code is known; mechanics from the paper's abstract and summaries):
- Win tensor W in {0,1}^{M x M x K}: W[i, j, k] = 1 iff model i scores higher than model j on benchmark k
  (higher is better; negate lower-is-better metrics first). Benchmarks are rounds, in the given order.
- One tournament: S_m(0) = 0, all models active. In round k the active models are grouped into score buckets
  G_s = {m active : S_m(k-1) = s}; each bucket is shuffled and paired consecutively; in an odd bucket the one
  left over gets a zero-point bye. A match (i, j) adds W[i, j, k] to S_i and W[j, i, k] to S_j. Then the T_k
  active models with the lowest S_m(k) are eliminated; they keep their score and play no more.
- Expected Win Score E[S_m] = (1/N) sum_n S_m^(n) over N Monte Carlo tournaments (paper: N = 100,000), with
  Monte Carlo standard error sd / sqrt(N); the ranking sorts E[S_m] in descending order.

Choices where the paper's text was not available to us (documented, all parameters):
- Ties on a benchmark (`ties`): "none" (neither model gets the point, the default; W stays binary), "half"
  (0.5 each) or "coin" (a fair coin decides, independently per match).
- Pairing inside a bucket is uniformly random (not Dutch top-half vs bottom-half); there is no floating
  between buckets; byes may repeat.
- Elimination ties at the cut are broken uniformly at random; at most `n_active - min_active` models are
  eliminated in a round (default min_active = 2), so a schedule longer than the field simply stops eliminating.

Vectorisation: all N tournaments of a chunk run at once as [N, M] arrays inside one jitted lax.scan over the
K rounds; bucketed pairing is a sort by (score, random key) plus a segment rank, so no Python loop over
simulations. Results depend on the seed and the chunk size (keys are folded in per chunk).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lostjax.metrics._checks import check_finite

TIE_POLICIES = ("none", "half", "coin")


def win_tensor(scores, ties: str = "none") -> np.ndarray:
  """Points matrix W[i, j, k] that model i earns against model j on benchmark k (float32, [M, M, K]).

  W = 1 where scores[i, k] > scores[j, k]; on ties 0 ("none", "coin" before the coin flip) or 0.5 ("half").
  """
  scores = np.asarray(scores, np.float64)
  if ties not in TIE_POLICIES:
    raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")
  wins = (scores[:, None, :] > scores[None, :, :]).astype(np.float32)
  if ties == "half":
    wins += 0.5 * (scores[:, None, :] == scores[None, :, :])
  return wins


@dataclasses.dataclass(frozen=True)
class SwissRoundResult:
  """Monte Carlo estimate of CSD: expected win score per model (input order), its standard error, ranking."""
  expected_score: np.ndarray   # [M] E[S_m]
  std_error: np.ndarray        # [M] sd(S_m) / sqrt(N)
  ranking: np.ndarray          # [M] model indices sorted by E[S_m] descending (stable)
  num_simulations: int
  elimination: np.ndarray      # [K] the effective number of models eliminated after each round


def _rank(key):
  """Ascending rank of each entry in each row of `key`, equal values ordered by index (a permutation of 0..M-1).

  O(M^2) compares per row: faster than an XLA sort on CPU for the small M of a leaderboard."""
  m = key.shape[1]
  before = (key[:, None, :] < key[:, :, None]) | ((key[:, None, :] == key[:, :, None]) & jnp.tri(m, k=-1, dtype=bool))
  return jnp.sum(before, axis=2, dtype=jnp.int32)


def _argsort_rows(key):
  """(order, rank): `jnp.argsort(key, axis=1)` (stable) and its inverse permutation, via `_rank` + a scatter."""
  num, m = key.shape
  rank = _rank(key)
  ids = jnp.broadcast_to(jnp.arange(m), key.shape)
  return jnp.zeros_like(ids).at[jnp.arange(num)[:, None], rank].set(ids), rank


def _one_round(carry, xs, *, coin: bool, eliminate: bool):
  """One Swiss round for a batch of tournaments. carry: key, score [S, M] float, active [S, M] bool."""
  key, score, active = carry
  points, tied, n_elim = xs          # [M, M], [M, M] bool, scalar int
  num_sims, num_models = score.shape
  key, k_pair, k_coin, k_elim = jax.random.split(key, 4)
  pos = jnp.arange(num_models)[None, :]

  # Pairing: sort active models by score (desc), randomly within a score; inactive models go last.
  # Scores are multiples of 0.5, so 4 * score separates buckets by >= 2 > the random key in [0, 1).
  u = jax.random.uniform(k_pair, score.shape)
  order, rank = _argsort_rows(jnp.where(active, -4.0 * score + u, jnp.inf))
  s_sorted = jnp.take_along_axis(score, order, axis=1)
  a_sorted = jnp.take_along_axis(active, order, axis=1)
  prev_s = jnp.concatenate([jnp.full((num_sims, 1), jnp.nan, score.dtype), s_sorted[:, :-1]], axis=1)
  is_start = (s_sorted != prev_s) | ~a_sorted
  bucket_start = jax.lax.cummax(jnp.where(is_start, pos, 0), axis=1)
  r = pos - bucket_start                                   # rank inside the bucket
  next_same = jnp.concatenate([~is_start[:, 1:] & a_sorted[:, 1:], jnp.zeros((num_sims, 1), bool)], axis=1)
  has_next = (r % 2 == 0) & next_same
  has_prev = r % 2 == 1
  paired = a_sorted & (has_next | has_prev)                # an unpaired active model gets the bye (0 points)
  partner_pos = jnp.clip(jnp.where(has_next, pos + 1, pos - 1), 0, num_models - 1)
  opp = jnp.take_along_axis(order, partner_pos, axis=1)
  gained = points[order, opp]
  if coin:
    # The first model of each pair draws the coin, the second gets the complement.
    flip = jax.random.bernoulli(k_coin, 0.5, score.shape).astype(score.dtype)
    flip_prev = jnp.concatenate([jnp.zeros((num_sims, 1), score.dtype), flip[:, :-1]], axis=1)
    gained = gained + tied[order, opp] * jnp.where(has_next, flip, 1.0 - flip_prev)
  gained = jnp.where(paired, gained, 0.0)
  score = score + jnp.take_along_axis(gained, rank, axis=1)   # back from sorted to model order

  if eliminate:  # the n_elim lowest active scores, ties at random
    u2 = jax.random.uniform(k_elim, score.shape)
    elim_key = jnp.where(active, 4.0 * score + u2, jnp.inf)
    active = active & (_rank(elim_key) >= n_elim)
  return (key, score, active), None


@functools.partial(jax.jit, static_argnames=("num_sims", "coin", "eliminate"))
def _simulate(key, points, tied, elimination, *, num_sims: int, coin: bool, eliminate: bool):
  """Final scores [num_sims, M] of `num_sims` independent tournaments (rounds = leading axis of points)."""
  num_models = points.shape[1]
  score = jnp.zeros((num_sims, num_models), jnp.float32)
  active = jnp.ones((num_sims, num_models), bool)
  step = functools.partial(_one_round, coin=coin, eliminate=eliminate)
  (_, score, _), _ = jax.lax.scan(step, (key, score, active), (points, tied, elimination))
  return score


def _elimination_schedule(elimination, num_models: int, num_rounds: int, min_active: int) -> np.ndarray:
  sched = np.asarray(elimination)
  if sched.ndim == 0:
    sched = np.full(num_rounds, sched)
  if sched.shape != (num_rounds,):
    raise ValueError(f"elimination must be an int or a sequence of {num_rounds} ints (one per benchmark), "
                     f"got shape {sched.shape}")
  if not np.issubdtype(sched.dtype, np.integer) or np.any(sched < 0):
    raise ValueError(f"elimination counts must be non-negative ints, got {sched.tolist()}")
  eff, n_active = [], num_models
  for t in sched:
    e = int(min(t, max(n_active - min_active, 0)))
    eff.append(e)
    n_active -= e
  return np.asarray(eff, np.int32)


def swiss_round(scores, *, num_simulations: int = 100_000, elimination: Union[int, Sequence[int]] = 0,
                ties: str = "none", min_active: int = 2, seed: int = 0,
                chunk_size: int = 25_000) -> SwissRoundResult:
  """Competitive Swiss-System Dynamics: Monte Carlo expected win score of each model.

  Args:
    scores: [M, K] table, scores[m, k] = model m's score on benchmark k (higher is better); the benchmark
      (= round) order is the column order.
    num_simulations: number of Monte Carlo tournaments N (paper: 100,000).
    elimination: T_k, models eliminated after each round: an int for every round or K ints.
    ties: "none", "half" or "coin" (see module docstring).
    min_active: never eliminate below this many active models.
    seed: PRNG seed (jax.random); same seed and chunk_size give the same result.
    chunk_size: tournaments simulated at once (memory ~ chunk_size x M x 40 bytes).

  Raises:
    ValueError: non-2-D/empty/NaN scores, fewer than 2 models, bad elimination, ties, or counts.
  """
  arr = np.asarray(scores)
  if arr.ndim != 2:
    raise ValueError(f"swiss_round expects a 2-D [models, benchmarks] score table, got shape {arr.shape}")
  if arr.shape[0] < 2 or arr.shape[1] < 1:
    raise ValueError(f"swiss_round needs at least 2 models and 1 benchmark, got shape {arr.shape}")
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
          or arr.dtype == np.bool_):
    raise ValueError(f"swiss_round expects real scores, got dtype {arr.dtype}")
  check_finite(arr, "swiss_round scores")
  if ties not in TIE_POLICIES:
    raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")
  for name, val in (("num_simulations", num_simulations), ("chunk_size", chunk_size), ("min_active", min_active)):
    if not (isinstance(val, (int, np.integer)) and val >= 1):
      raise ValueError(f"swiss_round {name} must be an int >= 1, got {val!r}")
  num_models, num_rounds = arr.shape
  sched = _elimination_schedule(elimination, num_models, num_rounds, min_active)

  w = win_tensor(arr, ties)                                                # [M, M, K]
  tied = (arr[:, None, :] == arr[None, :, :]) & ~np.eye(num_models, dtype=bool)[:, :, None]
  points = jnp.asarray(np.moveaxis(w, -1, 0))                               # [K, M, M]
  tied = jnp.asarray(np.moveaxis(tied, -1, 0).astype(np.float32))
  base_key = jax.random.key(seed)
  total = np.zeros(num_models)
  total_sq = np.zeros(num_models)
  done, chunk_index = 0, 0
  while done < num_simulations:
    size = min(chunk_size, num_simulations - done)
    final = _simulate(jax.random.fold_in(base_key, chunk_index), points, tied, jnp.asarray(sched),
                      num_sims=size, coin=(ties == "coin"), eliminate=bool(sched.any()))
    final = np.asarray(final, np.float64)
    total += final.sum(0)
    total_sq += (final ** 2).sum(0)
    done += size
    chunk_index += 1
  mean = total / num_simulations
  var = np.maximum(total_sq / num_simulations - mean ** 2, 0.0) * num_simulations / max(num_simulations - 1, 1)
  return SwissRoundResult(expected_score=mean, std_error=np.sqrt(var / num_simulations),
                          ranking=np.argsort(-mean, kind="stable"), num_simulations=int(num_simulations),
                          elimination=sched)
