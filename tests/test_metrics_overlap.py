"""The shared Dice overlap: a float64 loop oracle on random masks in both array namespaces, the empty-mask
convention as a required keyword, jit, and the two callers' conventions (segmentation 1, HealthiVert 0)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax.metrics import healthivert as H
from lostjax.metrics import overlap
from lostjax.metrics import segmentation as S


def _loop_dice(a, b, empty):
  inter = sum(1 for x, y in zip(a.ravel(), b.ravel()) if x and y)
  total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
  return empty if total == 0 else 2.0 * inter / total


def test_dice_vs_loop_in_both_namespaces():
  rng = np.random.default_rng(0)
  for p in (0.05, 0.3, 0.7):
    a = rng.random((5, 6, 7)) < p
    b = (rng.random((5, 6, 7)) < p) * rng.integers(1, 4, (5, 6, 7))      # non-zero values count as inside
    want = _loop_dice(a, b, None)
    got_np = overlap.dice(a, b, empty=1.0, xp=np)
    assert np.asarray(got_np).dtype == np.float64 and float(got_np) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(float(jax.jit(lambda x, y: overlap.dice(x, y, empty=0.))(a, b)), want, rtol=1e-6)


def test_empty_masks_and_callers_conventions():
  z = np.zeros((3, 4), bool)
  one = z.copy()
  one[1, 2] = True
  for xp in (np, jnp):
    assert float(overlap.dice(z, z, empty=1.0, xp=xp)) == 1.0
    assert float(overlap.dice(z, z, empty=0.0, xp=xp)) == 0.0
    assert float(overlap.dice(z, one, empty=1.0, xp=xp)) == 0.0      # one empty mask: no overlap, not `empty`
  assert S.dice(z, z) == 1.0 and isinstance(S.dice(z, one), float)
  assert float(H.dice(z, z)) == 0.0
  with pytest.raises(TypeError):
    overlap.dice(z, z)                                                  # the convention must be chosen
  with pytest.raises(ValueError, match="same shape"):
    overlap.dice(z, z[:2], empty=1.0)
