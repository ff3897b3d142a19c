"""Tests for lostjax.metrics.swiss_round: an independent python-loop tournament oracle (same rules, its own
RNG) compared in distribution, plus the property tests of the spec."""
import random

import numpy as np
import pytest

from lostjax.metrics import swiss_round
from lostjax.metrics.swiss_round import _elimination_schedule, win_tensor


def python_tournament(scores, elimination, ties, rng, min_active=2):
  """One CSD tournament written directly from the rules with python lists and random.Random."""
  m, k = scores.shape
  score = [0.0] * m
  active = set(range(m))
  for rnd in range(k):
    buckets = {}
    for i in sorted(active):
      buckets.setdefault(score[i], []).append(i)
    for members in buckets.values():
      rng.shuffle(members)
      for p in range(0, len(members) - 1, 2):   # an odd bucket's last member gets a 0-point bye
        i, j = members[p], members[p + 1]
        si, sj = scores[i, rnd], scores[j, rnd]
        if si > sj:
          score[i] += 1
        elif sj > si:
          score[j] += 1
        elif ties == "half":
          score[i] += 0.5
          score[j] += 0.5
        elif ties == "coin":
          score[i if rng.random() < 0.5 else j] += 1
    n_elim = min(elimination[rnd], max(len(active) - min_active, 0))
    order = sorted(active, key=lambda i: (score[i], rng.random()))
    for i in order[:n_elim]:
      active.remove(i)
  return score


def oracle_mean(scores, elimination, ties, n, seed=0):
  rng = random.Random(seed)
  elimination = np.broadcast_to(elimination, (scores.shape[1],))
  finals = np.array([python_tournament(scores, elimination, ties, rng) for _ in range(n)])
  return finals.mean(0), finals.std(0, ddof=1) / np.sqrt(n)


# 7 models (odd: byes every round), 5 benchmarks, integer scores with ties
TABLE = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9], [3, 2, 3, 8, 4],
                  [6, 2, 6, 4, 3], [3, 8, 3, 2, 7], [9, 5, 0, 2, 8]], dtype=float)


@pytest.mark.parametrize("elimination, ties", [(0, "none"), (1, "half"), ([2, 0, 1, 3, 0], "coin")])
def test_matches_python_loop_oracle_in_distribution(elimination, ties):
  n = 20_000
  res = swiss_round(TABLE, num_simulations=n, elimination=elimination, ties=ties, seed=1, chunk_size=n)
  ref_mean, ref_se = oracle_mean(TABLE, elimination, ties, n=4000, seed=2)
  z = np.abs(res.expected_score - ref_mean) / np.sqrt(res.std_error ** 2 + ref_se ** 2 + 1e-12)
  assert np.all(z < 4.5), (res.expected_score, ref_mean, z)


def test_bounds_points_per_round_and_determinism():
  res = swiss_round(TABLE, num_simulations=20_000, seed=3, chunk_size=20_000)
  k = TABLE.shape[1]
  assert np.all(res.expected_score >= 0) and np.all(res.expected_score <= k)
  # ties 'half': every match hands out exactly 1 point; round 1 has one bucket of 7 -> 3 matches, 1 bye
  res_half = swiss_round(TABLE[:, :1], num_simulations=20_000, ties="half", seed=3, chunk_size=20_000)
  np.testing.assert_allclose(res_half.expected_score.sum(), 3.0, rtol=1e-6)
  # 8 models, round 1 has 4 matches; with 'none' ties a tied match hands out 0 points
  eight = np.vstack([TABLE[:, :1], [[3.0]]])
  res8 = swiss_round(eight, num_simulations=20_000, ties="half", seed=3, chunk_size=20_000)
  np.testing.assert_allclose(res8.expected_score.sum(), 4.0, rtol=1e-6)
  res2 = swiss_round(TABLE, num_simulations=20_000, seed=3, chunk_size=20_000)
  np.testing.assert_array_equal(res.expected_score, res2.expected_score)


def test_dominant_model_ranks_first_and_wins_all_its_matches():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(8, 3))
  scores[5] = scores.max(0) + 1.0          # model 5 beats everyone everywhere
  res = swiss_round(scores, num_simulations=5_000, chunk_size=5_000)
  assert res.ranking[0] == 5
  # 8 models, 3 rounds: the top bucket has 8, 4, 2 members, so model 5 never gets a bye and scores K always
  np.testing.assert_allclose(res.expected_score[5], 3.0)
  assert res.std_error[5] == 0.0
  res = swiss_round(scores, num_simulations=5_000, elimination=2, chunk_size=5_000)
  assert res.ranking[0] == 5


def test_identical_scores_give_zero_and_half_ties_share():
  scores = np.ones((6, 4))
  np.testing.assert_array_equal(swiss_round(scores, num_simulations=1000, chunk_size=1000).expected_score, 0.0)
  np.testing.assert_allclose(swiss_round(scores, num_simulations=1000, ties="half",
                                         chunk_size=1000).expected_score, 2.0)


def test_permutation_invariance_of_model_order():
  perm = np.array([4, 0, 6, 2, 1, 5, 3])
  n = 20_000
  a = swiss_round(TABLE, num_simulations=n, elimination=1, seed=0, chunk_size=n)
  b = swiss_round(TABLE[perm], num_simulations=n, elimination=1, seed=7, chunk_size=n)
  z = np.abs(a.expected_score[perm] - b.expected_score) / np.sqrt(a.std_error[perm] ** 2 + b.std_error ** 2)
  assert np.all(z < 4.5), z


def test_convergence_with_number_of_simulations():
  big = swiss_round(TABLE, num_simulations=80_000, seed=11, chunk_size=20_000)
  errors, ses = [], []
  for n in (500, 20_000):
    small = swiss_round(TABLE, num_simulations=n, seed=12, chunk_size=min(n, 20_000))
    errors.append(np.max(np.abs(small.expected_score - big.expected_score)))
    ses.append(small.std_error.max())
    assert np.all(np.abs(small.expected_score - big.expected_score) <
                  5 * np.sqrt(small.std_error ** 2 + big.std_error ** 2) + 1e-9)
  assert errors[1] < errors[0]
  np.testing.assert_allclose(ses[0] / ses[1], np.sqrt(20_000 / 500), rtol=0.15)  # SE ~ 1/sqrt(N)


def test_win_tensor_and_schedule():
  w = win_tensor([[1.0, 2.0], [1.0, 3.0], [0.0, 1.0]])
  np.testing.assert_array_equal(w[:, :, 0], [[0, 0, 1], [0, 0, 1], [0, 0, 0]])
  np.testing.assert_array_equal(w[:, :, 1], [[0, 0, 1], [1, 0, 1], [0, 0, 0]])
  assert win_tensor([[1.0], [1.0]], ties="half")[0, 1, 0] == 0.5
  np.testing.assert_array_equal(_elimination_schedule(3, 7, 4, 2), [3, 2, 0, 0])
  np.testing.assert_array_equal(_elimination_schedule([0, 1, 1], 4, 3, 1), [0, 1, 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(scores=np.zeros((0, 3))), "at least 2 models"),
    (dict(scores=np.zeros((1, 3))), "at least 2 models"),
    (dict(scores=np.zeros((3, 0))), "1 benchmark"),
    (dict(scores=np.zeros(3)), "2-D"),
    (dict(scores=np.array([[1.0, np.nan], [0.0, 1.0]])), "NaN"),
    (dict(scores=np.ones((3, 2)), elimination=[1, 1, 1]), "one per benchmark"),
    (dict(scores=np.ones((3, 2)), elimination=-1), "non-negative"),
    (dict(scores=np.ones((3, 2)), elimination=0.5), "non-negative ints"),
    (dict(scores=np.ones((3, 2)), ties="draw"), "ties"),
    (dict(scores=np.ones((3, 2)), num_simulations=0), "num_simulations"),
    (dict(scores=np.array([["a", "b"], ["c", "d"]])), "real scores"),
])
def test_bad_input_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    swiss_round(**kwargs)
