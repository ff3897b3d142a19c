"""state_size against the closed forms (abstract params, no allocation)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim import frugal, galore, lift, state_size
from lostjax.models import LlamaConfig
from train.state import abstract_params

D, FF, L, V, R = 32, 48, 4, 100, 8


def llama_param_shapes(d, ff, layers, vocab=32000, lost_rank=None):
  """The real model's parameter tree, abstract (nnx.eval_shape): 8 heads for 60M, else 4."""
  kind = "lost" if lost_rank else "dense"
  cfg = LlamaConfig(vocab_size=vocab, d_model=d, d_ff=ff, n_heads=8 if d == 512 else 4, n_layers=layers,
                    attn_kind=kind, mlp_kind=kind, attn_rank=lost_rank or 8, mlp_rank=lost_rank or 8,
                    sparsity=0.05)
  return abstract_params(cfg)


def counts():
  per_layer_matrix = 4 * D * D + 3 * D * FF
  n_other = 2 * V * D + (2 * L + 1) * D
  return per_layer_matrix, n_other


def test_param_count_60m_preset():
  p = llama_param_shapes(512, 1376, 8)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))
  assert n == 58_073_600  # 58.1M, the GaLore/LOST 60M count (untied embed/lm_head)


def test_adamw_and_frugal_closed_forms():
  p = llama_param_shapes(D, FF, L, V)
  per_layer, n_other = counts()
  n_all = n_other + L * per_layer
  assert state_size(optax.adamw(1e-3), p).moment_elements == 2 * n_all
  # FRUGAL svd rho=.25: round(.25·min)·max per matrix = rho·m·n here.
  s_svd = state_size(frugal(1e-3, rho=0.25, proj_type="svd"), p)
  assert s_svd.moment_elements == 2 * (n_other + L * per_layer // 4)
  # equals GaLore at equal rank (rank = D/4 on every matrix's smaller side)
  s_gal = state_size(galore(1e-3, rank=D // 4), p)
  assert s_gal.moment_elements == s_svd.moment_elements
  # blockwise: round(.25·L_g) of each shape group
  s_blk = state_size(frugal(1e-3, rho=0.25, proj_type="blockwise"), p)
  k = lambda n: round(0.25 * n)
  assert s_blk.moment_elements == 2 * (n_other + k(4 * L) * D * D + k(2 * L) * D * FF + k(L) * FF * D)
  # rho = 0: only the non-matrix AdamW state
  for pt in ("blockwise", "svd"):
    assert state_size(frugal(1e-3, rho=0.0, proj_type=pt), p).moment_elements == 2 * n_other
  # totals add projector / indices / counters on top of the moments, in bytes too
  assert s_svd.elements > s_svd.moment_elements and s_svd.bytes == 4 * s_svd.elements


def test_lift_closed_form_dense_and_lost():
  dense = llama_param_shapes(D, FF, L, V)
  _, n_other = counts()
  kk = lambda m, n: min((m + n) * 2, m * n)
  s = state_size(lift(1e-3, lora_rank=2, filter_rank=4), dense)
  assert s.moment_elements == 2 * (n_other + L * (4 * kk(D, D) + 2 * kk(D, FF) + kk(FF, D)))
  lost = llama_param_shapes(D, FF, L, V, lost_rank=R)
  s2 = state_size(lift(1e-3, lora_rank=2, filter_rank=1), lost)
  per = lambda di, do: kk(di, R) + kk(R, do) + kk(int(0.05 * di), do)
  assert s2.moment_elements == 2 * (n_other + L * (4 * per(D, D) + 2 * per(D, FF) + per(FF, D)))


def test_bf16_and_concrete_params():
  p = {"w": {"kernel": jnp.ones((8, 8), jnp.bfloat16)}}
  s = state_size(optax.adam(1e-3, mu_dtype=jnp.bfloat16), p)
  assert s.moment_elements == 128 and s.moment_bytes == 64 * 2 + 64 * 2
