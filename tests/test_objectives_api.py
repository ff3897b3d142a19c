"""The objectives contract: off path bit-identical, config validation, combination of both switches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import objectives
from test_objectives_reweighting import np_weights
from test_objectives_saf import np_kl_full


def _plain(per_token, mask):
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def test_off_is_bit_identical_to_plain_masked_mean():
  cfg = objectives.default_objectives_config()
  assert cfg.trajectory == "none" and not cfg.reweight.enabled
  state = objectives.init_state(cfg, {"w": jnp.ones(3)}, num_train_examples=0, seq_len=4, vocab_size=7)
  assert state == {}
  rng = np.random.default_rng(0)
  for dtype in (jnp.float32, jnp.bfloat16):
    per_token = jnp.asarray(rng.gamma(2.0, 1.0, (5, 7)), dtype)
    mask = jnp.asarray(rng.random((5, 7)) < 0.7, dtype)

    def f(pt, m):
      return objectives.apply(cfg, per_token_loss=pt, mask=m, logits=jnp.zeros((5, 7, 3)), ids=jnp.arange(5),
                              step=jnp.int32(3), obj_state=state, forward=None)

    for fn in (f, jax.jit(f)):
      loss, upd, met = fn(per_token, mask)
      ref = (jax.jit(_plain) if fn is not f else _plain)(per_token, mask)
      assert loss.dtype == ref.dtype
      np.testing.assert_array_equal(np.asarray(loss), np.asarray(ref))
      assert upd == {} and met == {}
    g = jax.grad(lambda p: f(p, mask)[0].astype(jnp.float32))(per_token)
    g_ref = jax.grad(lambda p: _plain(p, mask).astype(jnp.float32))(per_token)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))
  assert objectives.post_update(cfg, state, {}, None, 0) is state


def test_mesa_with_reweighting_matches_numpy():
  b, t, v = 4, 3, 5
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(0, 2, (b, t, v)), jnp.float32)
  teacher = jnp.asarray(rng.normal(0, 2, (b, t, v)), jnp.float32)
  per_token = jnp.asarray(rng.gamma(2.0, 1.0, (b, t)), jnp.float32)
  mask = jnp.ones((b, t))
  cfg = objectives.default_objectives_config()
  cfg.trajectory = "mesa"
  cfg.mesa.update(dict(start_step=0, lam=0.8, tau=5.0))
  cfg.reweight.update(dict(enabled=True, strategy="extremes", r=0.4, warmup_steps=0))
  loss, _, met = objectives.apply(cfg, per_token_loss=per_token, mask=mask, logits=logits, ids=jnp.arange(b),
                                  step=jnp.int32(1), obj_state={"ema": {"t": teacher}},
                                  forward=lambda p: p["t"])
  ce = np.asarray(per_token).mean(1)
  kl = np_kl_full(np.asarray(teacher), np.asarray(logits), 5.0).mean(1)
  w = np_weights(ce, "extremes", 0.4)   # weights from the CE alone
  np.testing.assert_allclose(float(loss), (w * (ce + 0.8 * 25.0 * kl)).sum(), rtol=1e-5)
  for key in ("mesa_kl", "mesa_active", "rw_entropy", "rw_w_min", "rw_w_max"):
    assert key in met


def test_merge_microbatch_updates():
  stacked = {"ids": jnp.arange(6).reshape(2, 3), "logp": jnp.zeros((2, 3, 4, 5))}
  out = objectives.merge_microbatch_updates(None, stacked)
  assert out["ids"].tolist() == [0, 1, 2, 3, 4, 5] and out["logp"].shape == (6, 4, 5)
  assert objectives.merge_microbatch_updates(None, {}) == {}


@pytest.mark.parametrize("path,value,match", [
    ("trajectory", "sam", "objectives.trajectory='sam'"),
    ("mesa.decay", 1.5, "mesa.decay=1.5"),
    ("mesa.tau", 0.0, "mesa.tau=0.0"),
    ("mesa.start_step", -1, "mesa.start_step=-1"),
    ("saf.lam", -0.1, "saf.lam=-0.1"),
    ("saf.topk", 0, "saf.topk=0"),
    ("saf.epochs_back", 0, "saf.epochs_back=0"),
    ("saf.store_dtype", "int8", "saf.store_dtype='int8'"),
    ("reweight.strategy", "mid", "reweight.strategy='mid'"),
    ("reweight.r", -2.0, "reweight.r=-2.0"),
])
def test_bad_config_names_the_field(path, value, match):
  cfg = objectives.default_objectives_config()
  node = cfg
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match.replace("[", r"\[").replace(".", r"\.")):
    objectives.check_config(cfg)
  with pytest.raises(ValueError):
    objectives.init_state(cfg, {}, num_train_examples=4, seq_len=2, vocab_size=8)


def test_saf_needs_example_ids_and_topk_within_vocab():
  cfg = objectives.default_objectives_config()
  cfg.trajectory = "saf"
  with pytest.raises(ValueError, match="num_train_examples=0.*synthetic"):
    objectives.init_state(cfg, {}, num_train_examples=0, seq_len=2, vocab_size=8)
  cfg.saf.topk = 9
  with pytest.raises(ValueError, match="saf.topk=9 exceeds vocab_size=8"):
    objectives.init_state(cfg, {}, num_train_examples=4, seq_len=2, vocab_size=8)
  cfg.saf.topk = 2
  st = objectives.init_state(cfg, {}, num_train_examples=4, seq_len=2, vocab_size=8)
  with pytest.raises(ValueError, match="example ids"):
    objectives.apply(cfg, per_token_loss=jnp.ones((2, 2)), mask=jnp.ones((2, 2)), logits=jnp.zeros((2, 2, 8)),
                     ids=jnp.arange(3), step=jnp.int32(0), obj_state=st, forward=None)
