"""train/optimizer.py: config fields, build_optimizer for every name, schedule, clipping, bad values."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.optimizer import KNOWN_OPTIMIZERS, build_optimizer, default_optim_config, lr_schedule


def tiny_params():
  rng = np.random.default_rng(0)
  m = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  return {"embed": {"embedding": m(20, 16)},
          "layers": {0: {"attn": {"q": {"kernel": m(16, 16)}}, "mlp": {"up": {"kernel": m(16, 24)}},
                         "attn_norm": {"scale": jnp.ones(16)}}},
          "lm_head": {"kernel": m(16, 20)}}


def test_every_field_overridable():
  c = default_optim_config()
  for field in ("name", "lr", "b1", "b2", "eps", "weight_decay", "grad_clip", "warmup_frac", "min_lr_ratio",
                "rho", "update_gap", "proj_type", "proj_side", "rank", "scale", "lora_rank", "filter_rank",
                "trp_energy", "trp_period", "trp_nuclear_weight"):
    assert field in c
  c.lock()
  c.rho = 0.5
  with pytest.raises(AttributeError):
    c.not_a_field = 1


@pytest.mark.parametrize("name", KNOWN_OPTIMIZERS)
def test_build_and_step_every_optimizer(name):
  c = default_optim_config()
  c.name, c.rank, c.lora_rank, c.filter_rank, c.update_gap = name, 4, 1, 2, 2
  tx = build_optimizer(c, lr_schedule(c, 10))
  p = tiny_params()
  st = tx.init(p)
  step = jax.jit(tx.update)
  for _ in range(3):
    u, st = step(jax.tree.map(lambda x: jnp.cos(x), p), st, p)
    p = optax.apply_updates(p, u)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


def test_schedule_warmup_and_cosine_floor():
  c = default_optim_config()
  s = lr_schedule(c, 1000)
  assert float(s(0)) == 0.0 and float(s(50)) == pytest.approx(0.5e-3)
  assert float(s(100)) == pytest.approx(1e-3) and float(s(1000)) == pytest.approx(1e-4)
  assert float(s(550)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-4)


def test_clipping_included():
  c = default_optim_config()
  c.name, c.grad_clip = "adamw", 1.0
  tx = build_optimizer(c, 0.1)
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
  noclip = optax.adamw(0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  p = {"w": jnp.zeros(3)}
  grads = [{"w": jnp.array([100.0, 1.0, -2.0])}, {"w": jnp.array([0.1, 0.5, 0.3])}]
  outs = []
  for t in (tx, ref, noclip):
    st, q = t.init(p), p
    for g in grads:
      u, st = t.update(g, st, q)
      q = optax.apply_updates(q, u)
    outs.append(np.asarray(q["w"]))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)
  assert not np.allclose(outs[0], outs[2])


@pytest.mark.parametrize("field,value", [("name", "lamb"), ("rho", 1.5), ("update_gap", 0), ("proj_type", "qr"),
                                         ("grad_clip", -1.0), ("trp_base", "lion"), ("trp_energy", 0.0),
                                         ("rank", 0), ("lora_rank", 0)])
def test_bad_values_raise(field, value):
  c = default_optim_config()
  if field != "name":
    c.name = {"rho": "frugal", "update_gap": "frugal", "proj_type": "frugal", "grad_clip": "adamw",
              "trp_base": "trp", "trp_energy": "trp", "rank": "galore", "lora_rank": "lift"}[field]
  setattr(c, field, value)
  with pytest.raises(ValueError):
    build_optimizer(c, 1e-3)
  with pytest.raises(ValueError):
    lr_schedule(c, 0)
