"""Parameter-group learning-rate multipliers (optim.lr_mult) for every optimizer of train/optimizer.py: groups by
path, a multiplier of 0 freezes its group, update ratios equal the multipliers, and the default adds nothing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import optimizer as opt


def _params():
  k = jax.random.split(jax.random.key(0), 5)
  return {"embed": {"embedding": jax.random.normal(k[0], (16, 8))},
          "layers": {"0": {"attn": {"q": {"kernel": jax.random.normal(k[1], (8, 8))}},
                           "attn_norm": {"scale": jnp.ones((8,))}}},
          "final_norm": {"scale": jnp.ones((8,))},
          "lm_head": {"kernel": jax.random.normal(k[2], (8, 16))}}


def _grads(i):
  return jax.tree.map(lambda p: jax.random.normal(jax.random.key(100 + i), p.shape), _params())


def _cfg(name, **mult):
  c = opt.default_optim_config()
  c.name = name
  c.grad_clip = 0.0
  c.galore.rank = 2
  c.galore.update_gap = 2
  c.frugal.update_gap = 2
  c.lift.lora_rank = 1
  c.lift.filter_rank = 2
  c.lift.update_gap = 2
  c.trp.period = 2
  c.lr_mult.update(mult)
  return c


def _updates(c, steps=2):
  tx = opt.build_optimizer(c, 1e-2)
  p = _params()
  state = tx.init(p)
  out = []
  for i in range(steps):
    u, state = tx.update(_grads(i), state, p)
    out.append(u)
  return out


def test_param_groups():
  assert opt.param_group("embed/embedding") == "embed" and opt.param_group("lm_head/kernel") == "head"
  assert opt.param_group("layers/0/attn_norm/scale") == "norm" and opt.param_group("final_norm/scale") == "norm"
  assert opt.param_group("layers/0/mlp/up/a") == "matrix" and opt.param_group("layers/0/attn/q/v") == "matrix"


# AdamW, FRUGAL and GaLore in the default run; LIFT and TRP (whose matrices see multiplier 1 anyway) in the slow set.
@pytest.mark.parametrize("name", [n if n in ("adamw", "frugal", "galore") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in opt.OPTIMIZERS])
def test_update_ratios_equal_multipliers(name):
  base = _updates(_cfg(name))
  mult = {"embed": 0.5, "head": 3.0, "norm": 0.0}
  scaled = _updates(_cfg(name, **mult))
  for ub, us in zip(base, scaled):
    np.testing.assert_allclose(us["embed"]["embedding"], 0.5 * ub["embed"]["embedding"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(us["lm_head"]["kernel"], 3.0 * ub["lm_head"]["kernel"], rtol=1e-6, atol=1e-9)
    assert not np.any(us["final_norm"]["scale"]) and not np.any(us["layers"]["0"]["attn_norm"]["scale"])  # frozen
    np.testing.assert_allclose(us["layers"]["0"]["attn"]["q"]["kernel"], ub["layers"]["0"]["attn"]["q"]["kernel"],
                               rtol=1e-6, atol=1e-9)
    assert np.any(ub["final_norm"]["scale"])


def test_sgd_like_update_ratio_and_frozen_params():
  """Plain SGD (TRP's base 'sgd' without momentum history after one step): the update is −lr·m·g exactly."""
  c = _cfg("trp", embed=0.0, head=0.25)
  c.trp.base = "sgd"
  c.trp.nuclear_weight = 0.0
  tx = opt.build_optimizer(c, 0.1)
  p = _params()
  u, _ = tx.update(_grads(0), tx.init(p), p)
  g = _grads(0)
  np.testing.assert_allclose(u["lm_head"]["kernel"], -0.1 * 0.25 * g["lm_head"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(u["final_norm"]["scale"], -0.1 * g["final_norm"]["scale"], rtol=1e-6)
  assert not np.any(u["embed"]["embedding"])


def test_default_adds_nothing_and_bad_values():
  c = _cfg("adamw")
  old = opt.default_optim_config()
  old.grad_clip = 0.0
  with old.unlocked():
    del old["lr_mult"]                                   # a config written before the field
  p = _params()
  s_new, s_old = opt.build_optimizer(c, 1e-3).init(p), opt.build_optimizer(old, 1e-3).init(p)
  assert jax.tree.structure(s_new) == jax.tree.structure(s_old)
  assert opt.lr_multipliers(old) == {"embed": 1.0, "head": 1.0, "norm": 1.0}
  for bad in (-1.0, float("nan")):
    with pytest.raises(ValueError, match="optim.lr_mult.head"):
      opt.build_optimizer(_cfg("adamw", head=bad), 1e-3)
