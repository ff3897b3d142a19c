"""Loss-based sample reweighting (arXiv 2502.06733) against a numpy transcription of the paper's formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lostjax import sharding
from train import objectives
from train.objectives import reweighting


def np_weights(losses, strategy, r, valid=None):
  """Paper §3 / README, one loop per step: normalise to [-1, 1], transform, softmax(·/r)."""
  losses = [float(x) for x in losses]
  valid = [True] * len(losses) if valid is None else [bool(v) for v in valid]
  vals = [l for l, v in zip(losses, valid) if v]
  if not vals:
    return np.zeros(len(losses))
  lo, hi = min(vals), max(vals)
  den = max(hi - lo, 1e-6)
  f = []
  for l in losses:
    h = 2.0 * l / den - (hi + lo) / den
    if strategy == "linupper":
      f.append(min(h + 1.0, 1.0))
    elif strategy == "quadratic":
      f.append(1.0 - h * h)
    else:
      f.append(abs(h))
  top = max(fi for fi, v in zip(f, valid) if v)
  e = [math.exp((fi - top) / r) if v else 0.0 for fi, v in zip(f, valid)]
  s = sum(e)
  return np.array([x / s for x in e])


def _cfg(strategy="linupper", r=0.4, warmup=0):
  c = objectives.default_objectives_config()
  c.reweight.update(dict(enabled=True, strategy=strategy, r=r, warmup_steps=warmup))
  return c


def _apply(cfg, per_token, mask, step=10):
  b, t = per_token.shape
  return objectives.apply(cfg, per_token_loss=per_token, mask=mask, logits=jnp.zeros((b, t, 3)),
                          ids=jnp.arange(b), step=jnp.int32(step), obj_state={}, forward=None)


@pytest.mark.parametrize("strategy", reweighting.STRATEGIES)
@pytest.mark.parametrize("r", [0.4, 1.0, 7.0])
def test_weights_match_numpy(strategy, r):
  rng = np.random.default_rng(hash((strategy, r)) % 2**32)
  losses = rng.gamma(3.0, 1.0, size=13).astype(np.float32)
  w = reweighting.sequence_weights(jnp.asarray(losses), jnp.ones(13, bool), strategy=strategy, r=r)
  np.testing.assert_allclose(np.asarray(w), np_weights(losses, strategy, r), rtol=2e-5, atol=1e-7)
  assert abs(float(jnp.sum(w)) - 1.0) < 1e-5


def test_normalisation_and_strategy_shapes():
  losses = jnp.array([1.0, 2.0, 3.0, 5.0])
  h = reweighting.normalize(losses, jnp.ones(4, bool))
  np.testing.assert_allclose(np.asarray(h), [-1.0, -0.5, 0.0, 1.0], atol=1e-6)
  # LinUpper down-weights the lowest losses and is flat above the middle; Quadratic favours the middle;
  # Extremes favours both ends.
  w = {s: np.asarray(reweighting.sequence_weights(losses, jnp.ones(4, bool), strategy=s, r=0.4))
       for s in reweighting.STRATEGIES}
  assert w["linupper"][0] < w["linupper"][1] < w["linupper"][2] == pytest.approx(w["linupper"][3])
  assert w["quadratic"][2] == w["quadratic"].max() and w["quadratic"][0] == pytest.approx(w["quadratic"][3])
  assert w["extremes"][2] == w["extremes"].min() and w["extremes"][0] == pytest.approx(w["extremes"][3])


def test_loss_is_weighted_sum_with_constant_weights():
  rng = np.random.default_rng(0)
  per_token = rng.gamma(2.0, 1.0, size=(6, 5)).astype(np.float32)
  mask = (rng.random((6, 5)) < 0.8).astype(np.float32)
  mask[:, 0] = 1.0
  cfg = _cfg("quadratic", r=0.7)
  seq = (per_token * mask).sum(1) / mask.sum(1)
  w = np_weights(seq, "quadratic", 0.7)
  loss, upd, met = _apply(cfg, jnp.asarray(per_token), jnp.asarray(mask))
  np.testing.assert_allclose(float(loss), float((w * seq).sum()), rtol=1e-5)
  assert upd == {}
  np.testing.assert_allclose(float(met["rw_entropy"]), -(w * np.log(w)).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(met["rw_w_min"]), w.min(), rtol=1e-5)
  np.testing.assert_allclose(float(met["rw_w_max"]), w.max(), rtol=1e-5)
  # No gradient through the weights: d loss / d per_token[i, t] = w_i · mask[i, t] / n_i.
  g = jax.grad(lambda p: _apply(cfg, p, jnp.asarray(mask))[0])(jnp.asarray(per_token))
  np.testing.assert_allclose(np.asarray(g), w[:, None] * mask / mask.sum(1, keepdims=True), rtol=1e-5, atol=1e-8)


def test_uniform_warmup_then_reweighted():
  per_token = jnp.asarray(np.linspace(0.5, 4.0, 16, dtype=np.float32).reshape(4, 4))
  mask = jnp.ones((4, 4))
  cfg = _cfg("linupper", r=0.4, warmup=5)
  _, _, met = _apply(cfg, per_token, mask, step=4)
  assert float(met["rw_w_min"]) == pytest.approx(0.25) and float(met["rw_w_max"]) == pytest.approx(0.25)
  assert float(met["rw_entropy"]) == pytest.approx(math.log(4), rel=1e-6)
  loss, _, met = _apply(cfg, per_token, mask, step=5)
  assert float(met["rw_w_max"]) > 0.26
  seq = np.asarray(per_token).mean(1)
  np.testing.assert_allclose(float(loss), float((np_weights(seq, "linupper", 0.4) * seq).sum()), rtol=1e-5)


def test_edge_cases_padding_equal_single_empty_huge_bf16():
  # padding rows (mask 0) get weight 0 and do not enter min/max
  per_token = jnp.array([[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]])
  mask = jnp.array([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
  loss, _, met = _apply(_cfg("extremes", r=1.0), per_token, mask)
  w = np_weights([1.0, 3.0, 100.0], "extremes", 1.0, valid=[1, 1, 0])
  np.testing.assert_allclose(float(loss), w[0] * 1.0 + w[1] * 3.0, rtol=1e-6)
  assert float(met["rw_w_min"]) == pytest.approx(0.5)
  # all equal losses: floor on the denominator → uniform
  w = reweighting.sequence_weights(jnp.full(5, 2.5), jnp.ones(5, bool), strategy="linupper", r=0.01)
  np.testing.assert_allclose(np.asarray(w), 0.2, rtol=1e-6)
  # one sequence
  w = reweighting.sequence_weights(jnp.array([7.0]), jnp.ones(1, bool), strategy="quadratic", r=0.4)
  assert float(w[0]) == 1.0
  # nothing valid: zero loss and weights, no NaN
  loss, _, met = _apply(_cfg(), jnp.ones((3, 2)), jnp.zeros((3, 2)))
  assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in met.values())
  # huge spread and a tiny r: no overflow
  big = jnp.array([1e-3, 1e4, 3e4, 1e6])
  w = reweighting.sequence_weights(big, jnp.ones(4, bool), strategy="linupper", r=1e-3)
  np.testing.assert_allclose(np.asarray(w), np_weights(np.asarray(big), "linupper", 1e-3), atol=1e-6)
  # bf16 per-token losses: computed in float32
  pt = jnp.asarray(np.random.default_rng(1).gamma(2.0, 1.0, (4, 8)), jnp.bfloat16)
  loss, _, _ = _apply(_cfg(), pt, jnp.ones((4, 8), jnp.bfloat16))
  seq = np.asarray(pt.astype(jnp.float32)).mean(1)
  np.testing.assert_allclose(float(loss), (np_weights(seq, "linupper", 0.4) * seq).sum(), rtol=1e-5)


def test_global_batch_weights_on_eight_devices_equal_one_device():
  """min/max/softmax over the batch-sharded global batch, not per device."""
  rng = np.random.default_rng(3)
  per_token = rng.gamma(2.0, 1.0, size=(16, 8)).astype(np.float32)
  per_token[:2] *= 5.0  # the extremes sit on device 0: local normalisation would differ elsewhere
  mask = np.ones((16, 8), np.float32)
  cfg = _cfg("linupper", r=0.4)

  def run(pt, m):
    loss, _, met = _apply(cfg, pt, m)
    b = pt.shape[0]
    w = reweighting.sequence_weights(jnp.mean(pt, 1), jnp.ones(b, bool), strategy="linupper", r=0.4)
    return loss, met, w

  one = jax.jit(run)(jnp.asarray(per_token), jnp.asarray(mask))
  mesh = sharding.make_mesh(2, 4, 1)
  sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    pt8, m8 = jax.device_put(per_token, sh), jax.device_put(mask, sh)
    eight = jax.jit(run)(pt8, m8)
  assert eight[2].sharding.spec[0] in (("data", "fsdp"), None)
  np.testing.assert_allclose(np.asarray(eight[2]), np.asarray(one[2]), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(float(eight[0]), float(one[0]), rtol=1e-6)
  for k in one[1]:
    np.testing.assert_allclose(float(eight[1][k]), float(one[1][k]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(one[2]), np_weights(per_token.mean(1), "linupper", 0.4), rtol=2e-5)
  # the test is sensitive: per-device (local) normalisation gives other weights
  local = np.concatenate([np_weights(per_token[i:i + 2].mean(1), "linupper", 0.4) / 8 for i in range(0, 16, 2)])
  assert np.abs(local - np.asarray(one[2])).max() > 1e-3


@pytest.mark.parametrize("field,value,match", [
    ("strategy", "upper", "reweight.strategy"),
    ("r", 0.0, "reweight.r"),
    ("r", -1.0, "reweight.r"),
    ("warmup_steps", -3, "reweight.warmup_steps"),
])
def test_bad_config(field, value, match):
  cfg = _cfg()
  cfg.reweight[field] = value
  with pytest.raises(ValueError, match=match):
    _apply(cfg, jnp.ones((2, 2)), jnp.ones((2, 2)))


def test_bad_shapes():
  with pytest.raises(ValueError, match="mask"):
    _apply(_cfg(), jnp.ones((2, 3)), jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="per-sequence losses"):
    reweighting.sequence_weights(jnp.ones((2, 2)), jnp.ones((2, 2), bool), strategy="linupper", r=1.0)
