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
  assert not any(cfg[name].enabled for name in objectives.REGISTRY)
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
  cfg.mesa.enabled = True
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
    ("saf.tau", -1.0, "saf.tau=-1.0"),
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
  cfg.saf.enabled = True
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


def test_registry_shape_and_unknown_objective():
  """Each registered objective is an (init, loss, update) triple with its own config section and check."""
  cfg = objectives.default_objectives_config()
  assert sorted(cfg.keys()) == sorted(objectives.REGISTRY)
  for name, obj in objectives.REGISTRY.items():
    assert callable(obj.init) and callable(obj.loss) and callable(obj.update)
    assert obj.config().enabled is False
  cfg.unlock()
  cfg.sam = {"enabled": True}
  with pytest.raises(ValueError, match="unknown objective.*objectives.sam"):
    objectives.check_config(cfg)


def test_added_objective_needs_one_file_and_one_registry_line(monkeypatch):
  """A new objective plugs in through the registry alone: here a token term that adds 1 to every token's loss."""
  import ml_collections
  from train.objectives import base
  plus_one = base.Objective(
      config=lambda: ml_collections.ConfigDict(dict(enabled=True)), check=lambda c: None,
      init=lambda c, ctx: {"plus_count": jnp.zeros((), jnp.int32)},
      loss=lambda c, st, x: base.Terms(token_loss=jnp.ones_like(x.per_token_loss), metrics={"plus": jnp.float32(1)}),
      update=lambda c, st, upd, p, step: {"plus_count": st["plus_count"] + 1}, state_keys=("plus_count",))
  monkeypatch.setitem(objectives.REGISTRY, "plus_one", plus_one)
  cfg = objectives.default_objectives_config()
  state = objectives.init_state(cfg, {}, num_train_examples=0, seq_len=2, vocab_size=3)
  per_token = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
  mask = jnp.asarray([[1.0, 1.0], [1.0, 0.0]])
  loss, upd, met = objectives.apply(cfg, per_token_loss=per_token, mask=mask, logits=jnp.zeros((2, 2, 3)),
                                    ids=jnp.arange(2), step=jnp.int32(0), obj_state=state, forward=None)
  np.testing.assert_allclose(float(loss), (1 + 2 + 3) / 3 + 1.0)   # masked mean of CE + masked mean of 1
  assert float(met["plus"]) == 1.0
  state = objectives.post_update(cfg, state, upd, None, jnp.int32(0))
  assert int(state["plus_count"]) == 1


def test_mask_is_respected_by_reweighting():
  """Padded tokens change neither the per-sequence losses nor the weights."""
  cfg = objectives.default_objectives_config()
  cfg.reweight.update(dict(enabled=True, strategy="linupper", r=0.4, warmup_steps=0))
  per_token = jnp.asarray([[1.0, 5.0], [2.0, 2.0], [3.0, 7.0]])
  mask = jnp.asarray([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
  loss, _, _ = objectives.apply(cfg, per_token_loss=per_token, mask=mask, logits=jnp.zeros((3, 2, 3)),
                                ids=jnp.arange(3), step=jnp.int32(1), obj_state={}, forward=None)
  seq = np.array([1.0, 2.0, 3.0])
  w = np_weights(seq, "linupper", 0.4)
  np.testing.assert_allclose(float(loss), float((w * seq).sum()), rtol=1e-6)
