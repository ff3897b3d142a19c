"""train/optimizer.py: sub-configs per optimizer, the builder's wiring of every field, schedule, clipping, bad values."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from train.optimizer import (KNOWN_OPTIMIZERS, OPTIMIZERS, build_optimizer, default_optim_config,
                             lr_schedule)


def tiny_params():
  rng = np.random.default_rng(0)
  m = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  return {"embed": {"embedding": m(20, 16)},
          "layers": {0: {"attn": {"q": {"kernel": m(16, 16)}}, "mlp": {"up": {"kernel": m(16, 24)}},
                         "attn_norm": {"scale": jnp.ones(16)}}},
          "lm_head": {"kernel": m(16, 20)}}


def grads_at(i, p):
  return jax.tree.map(lambda x: jnp.cos(x * (i + 1)) + 0.1 * i, p)


def run(tx, steps=4):
  p = tiny_params()
  st = tx.init(p)
  ups = []
  for i in range(steps):
    u, st = tx.update(grads_at(i, p), st, p)
    p = optax.apply_updates(p, u)
    ups.append(u)
  return p, ups


def test_layout_shared_fields_and_one_subconfig_per_optimizer():
  c = default_optim_config()
  for field in ("name", "lr", "b1", "b2", "eps", "weight_decay", "grad_clip", "warmup_frac", "min_lr_ratio", "seed"):
    assert field in c
  # one sub-config per optimizer, plus the shared per-group learning-rate multipliers
  assert sorted(k for k, v in c.items() if hasattr(v, "keys")) == ["frugal", "galore", "lift", "lr_mult", "trp"]
  assert set(OPTIMIZERS) == set(KNOWN_OPTIMIZERS) == {"adamw", "frugal", "galore", "lift", "trp"}
  c.lock()
  c.frugal.rho = 0.5
  with pytest.raises(AttributeError):
    c.frugal.not_a_field = 1
  with pytest.raises(AttributeError):
    c.rho = 0.5   # the flat fields of the old layout are gone


@pytest.mark.parametrize("name", KNOWN_OPTIMIZERS)
def test_build_and_step_every_optimizer(name):
  c = default_optim_config()
  c.name = name
  c.galore.rank, c.lift.lora_rank, c.lift.filter_rank, c.frugal.update_gap = 4, 1, 2, 2
  p, _ = run(build_optimizer(c, lr_schedule(c, 10)), steps=3)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


# Every field of every sub-config set to a non-default value; the built optimizer must equal the transform built
# directly with those values (a builder that drops or misroutes a field fails here).
WIRING = {
    "frugal_svd": ("frugal", dict(rho=0.5, update_gap=2, proj_type="svd", proj_side="reverse_std",
                                  reset_statistics=False, inactive_update_rule="sgd", proj_lr_scale=0.7,
                                  inactive_lr_scale=0.3, block_order="descending")),
    "frugal_blockwise": ("frugal", dict(rho=0.5, update_gap=2, proj_type="blockwise", proj_side="std",
                                        reset_statistics=True, inactive_update_rule="sgd", proj_lr_scale=0.7,
                                        inactive_lr_scale=0.3, block_order="ascending")),
    "galore": ("galore", dict(rank=3, update_gap=2, scale=0.6, proj_side="reverse_std", eps=1e-3)),
    "lift": ("lift", dict(lora_rank=1, filter_rank=3, update_gap=2, freeze_others=True)),
    "trp": ("trp", dict(energy=0.7, period=2, nuclear_weight=0.05, scheme="spatial", nuclear_every_step=True,
                        base="sgd")),
}


def direct(name, sub, lr, shared):
  b1, b2, eps, wd, seed = shared
  if name == "frugal":
    return optim.frugal(lr, rho=sub["rho"], update_gap=sub["update_gap"], proj_type=sub["proj_type"],
                        proj_side=sub["proj_side"], b1=b1, b2=b2, eps=eps, weight_decay=wd,
                        reset_statistics=sub["reset_statistics"], inactive_update_rule=sub["inactive_update_rule"],
                        proj_lr_scale=sub["proj_lr_scale"], inactive_lr_scale=sub["inactive_lr_scale"],
                        block_order=sub["block_order"], seed=seed)
  if name == "galore":
    return optim.galore(lr, rank=sub["rank"], update_gap=sub["update_gap"], scale=sub["scale"],
                        proj_side=sub["proj_side"], b1=b1, b2=b2, eps=sub["eps"], weight_decay=wd)
  if name == "lift":
    return optim.lift(lr, lora_rank=sub["lora_rank"], filter_rank=sub["filter_rank"], update_gap=sub["update_gap"],
                      b1=b1, b2=b2, eps=eps, weight_decay=wd, freeze_others=sub["freeze_others"])
  assert name == "trp" and sub["base"] == "sgd"
  base = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))
  return optim.trp(base, energy=sub["energy"], period=sub["period"], nuclear_weight=sub["nuclear_weight"],
                   scheme=sub["scheme"], nuclear_every_step=sub["nuclear_every_step"])


@pytest.mark.parametrize("case", sorted(WIRING))
def test_builder_passes_every_field(case):
  name, sub = WIRING[case]
  c = default_optim_config()
  c.name, c.grad_clip, c.lr = name, 0.0, 0.05
  c.b1, c.b2, c.eps, c.weight_decay, c.seed = 0.8, 0.99, 1e-6, 0.01, 3
  assert set(sub) == set(c[name].keys()), "the test must vary every field of the sub-config"
  defaults = c[name].to_dict()
  assert any(sub[k] != defaults[k] for k in sub)
  c[name].update(sub)
  _, built = run(build_optimizer(c, 0.05))
  _, ref = run(direct(name, sub, 0.05, (0.8, 0.99, 1e-6, 0.01, 3)))
  for a, b in zip(jax.tree.leaves(built), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shared_fields_reach_the_transform():
  """b1/b2/eps/weight_decay of the top level change AdamW's updates (a builder ignoring them fails)."""
  base = default_optim_config()
  base.grad_clip = 0.0
  _, ref = run(build_optimizer(base, 0.05))
  for field, value in (("b1", 0.5), ("b2", 0.9), ("eps", 1e-2), ("weight_decay", 0.1)):
    c = default_optim_config()
    c.grad_clip = 0.0
    c[field] = value
    _, got = run(build_optimizer(c, 0.05))
    want = optax.adamw(0.05, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    _, exp = run(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(exp)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))), field


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


@pytest.mark.parametrize("name,field,value,match", [
    ("lamb", None, None, "optim.name='lamb'"),
    ("adamw", "lr", 0.0, "optim.lr=0.0"),
    ("adamw", "b2", 1.0, "optim.b2=1.0"),
    ("adamw", "grad_clip", -1.0, "optim.grad_clip=-1.0"),
    ("frugal", "frugal.rho", 1.5, "optim.frugal"),
    ("frugal", "frugal.update_gap", 0, "optim.frugal"),
    ("frugal", "frugal.proj_type", "qr", "optim.frugal"),
    ("trp", "trp.base", "lion", "optim.trp.base='lion'"),
    ("trp", "trp.energy", 0.0, "optim.trp"),
    ("galore", "galore.rank", 0, "optim.galore"),
    ("lift", "lift.lora_rank", 0, "optim.lift"),
])
def test_bad_values_name_the_field(name, field, value, match):
  c = default_optim_config()
  c.name = name
  if field:
    node = c
    *parents, leaf = field.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ValueError, match=match.replace(".", r"\.").replace("(", r"\(")):
    build_optimizer(c, 1e-3)


def test_schedule_bad_values():
  c = default_optim_config()
  with pytest.raises(ValueError):
    lr_schedule(c, 0)
  c.warmup_frac = 1.0
  with pytest.raises(ValueError, match="warmup_frac"):
    lr_schedule(c, 10)
