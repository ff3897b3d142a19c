"""Edge cases shared by the optimizers: no matrices at all, zero / huge gradients, abstract init under jit."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim import frugal, galore, lift, trp

FACTORIES = {
    "frugal_svd": lambda: frugal(0.01, rho=0.5, update_gap=2),
    "frugal_block": lambda: frugal(0.01, rho=0.5, update_gap=2, proj_type="blockwise"),
    "galore": lambda: galore(0.01, rank=2, update_gap=2),
    "lift": lambda: lift(0.01, lora_rank=1, filter_rank=2, update_gap=2),
    "trp": lambda: trp(optax.sgd(0.01), period=2),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_no_matrix_leaves(name):
  params = {"norm": {"scale": jnp.ones(4)}, "bias": jnp.zeros(3)}
  tx = FACTORIES[name]()
  st = tx.init(params)
  u, st = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), st, params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("scale", [0.0, 1e30])
def test_zero_and_huge_gradients_stay_finite(name, scale):
  rng = np.random.default_rng(0)
  params = {"mlp": {"kernel": jnp.asarray(rng.normal(size=(6, 8)).astype(np.float32))}, "norm": {"scale": jnp.ones(6)}}
  tx = FACTORIES[name]()
  st = tx.init(params)
  step = jax.jit(tx.update)
  for k in range(3):
    g = jax.tree.map(lambda p: scale * jnp.cos(p + k), params)
    u, st = step(g, st, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u)), (name, scale, k)
  if scale == 0.0 and name != "trp":  # trp's projection step moves weights to their truncation even at g = 0
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
