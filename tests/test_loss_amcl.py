"""AMCL losses vs float64 numpy loops written from the paper's Table 2 (and optax NT-Xent for the reduction)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import losses as L
from losses import amcl as A
from oracle_utils import fd_check, raises_while_tracing

amcl_loss = jax.jit(A.amcl_loss, static_argnames=("dim", "variant", "reduction"))
amcl_simclr_loss = jax.jit(A.amcl_simclr_loss, static_argnames=("dim", "variant", "reduction"))

F32 = lambda *xs: tuple(np.asarray(x, np.float32) for x in xs)
RNG = np.random.default_rng(0)
C, B, N, D = 2, 4, 3, 5
ANC, POS, NEG = RNG.normal(size=(C, B, D)), RNG.normal(size=(C, B, D)), RNG.normal(size=(C, B, N, D))
TP, TN = RNG.uniform(0.2, 1.5, (C, B)), RNG.uniform(0.2, 1.5, (C, B, N))


def _cos(u, v):
  return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def _omega(t, d):
  return d / 2 * np.log(t) + 1 / t


def np_amcl(a, p, n, tp, tn, beta=0.1, dim=None, variant="ntxent", reduction="max", mask=None):
  c_, b_, n_, d_ = n.shape
  dim = d_ if dim is None else dim
  mask = np.ones((b_, n_), bool) if mask is None else mask
  total = 0.
  for i in range(b_):
    for c in range(c_):
      pos = _cos(a[c, i], p[c, i]) / tp[c, i]
      keep = mask[c, i] if mask.ndim == 3 else mask[i]
      cands = [(_cos(a[c, i], n[c, i, k]) / tn[c, i, k], tn[c, i, k]) for k in range(n_) if keep[k]]
      if variant == "infonce":
        cands.append((pos, tp[c, i]))
      term = -pos + beta * _omega(tp[c, i], dim)
      if cands:
        if reduction == "max":
          best = max(range(len(cands)), key=lambda k: cands[k][0])
          term += cands[best][0] - beta * _omega(cands[best][1], dim)
        else:
          logits = np.array([v for v, _ in cands])
          w = np.exp(logits - logits.max())
          w /= w.sum()
          term += np.log(np.sum(np.exp(logits))) - beta * sum(wk * _omega(t, dim) for wk, (_, t) in zip(w, cands))
      total += term
  return total / b_


@pytest.mark.parametrize("variant", ["ntxent", "infonce"])
@pytest.mark.parametrize("reduction", ["max", "logsumexp"])
def test_amcl_loss_vs_numpy(variant, reduction):
  with jax.enable_x64(True):
    got = amcl_loss(ANC, POS, NEG, TP, TN, variant=variant, reduction=reduction)
    np.testing.assert_allclose(float(got), np_amcl(ANC, POS, NEG, TP, TN, variant=variant, reduction=reduction),
                               rtol=1e-10)
    # beta and d' enter only through Omega
    got = amcl_loss(ANC, POS, NEG, TP, TN, beta=0.7, dim=128, variant=variant, reduction=reduction)
    np.testing.assert_allclose(float(got), np_amcl(ANC, POS, NEG, TP, TN, 0.7, 128, variant, reduction), rtol=1e-10)


def test_amcl_gradients_finite_differences():
  with jax.enable_x64(True):
    for kw in ({"reduction": "max"}, {"reduction": "logsumexp", "variant": "infonce"}):
      fd_check(lambda a, p, n, tp, tn: A.amcl_loss(a, p, n, tp, tn, **kw), (ANC, POS, NEG, TP, TN))


def test_omega_is_gaussian_nll_and_default_beta():
  # -sim/tau + Omega(tau) = ||z - mu||^2 / (2 tau) + (d/2) log tau for unit vectors (paper's derivation)
  z, mu = ANC[0, 0] / np.linalg.norm(ANC[0, 0]), POS[0, 0] / np.linalg.norm(POS[0, 0])
  omega = np.asarray(jax.jit(L.amcl_omega, static_argnums=1)(np.array([0.05, 0.5, 1.7]), D))
  for tau, om in zip((0.05, 0.5, 1.7), omega):
    lhs = -_cos(z, mu) / tau + float(om)
    np.testing.assert_allclose(lhs, np.sum((z - mu) ** 2) / (2 * tau) + D / 2 * np.log(tau), rtol=1e-6)
  # the documented default beta = 0.1 (code default; the paper's value is unknown)
  args = F32(ANC, POS, NEG, TP, TN)
  np.testing.assert_allclose(amcl_loss(*args), amcl_loss(*args, beta=0.1), rtol=1e-7)
  assert abs(float(amcl_loss(*args)) - float(amcl_loss(*args, beta=0.2))) > 1e-3


def test_simclr_logsumexp_equals_optax_ntxent():
  """Degenerate case: C = 1, beta = 0, one temperature, log-sum-exp with the positive == optax NT-Xent."""
  za, zb = RNG.normal(size=(6, D)), RNG.normal(size=(6, D))
  labels = np.concatenate([np.arange(6), np.arange(6)])
  ntxent = jax.jit(optax.losses.ntxent)
  for tau in (0.07, 0.5):
    ref = ntxent(np.concatenate([za, zb]).astype(np.float32), labels, temperature=tau)
    got = amcl_simclr_loss(*F32(za, zb), tau, beta=0., variant="infonce", reduction="logsumexp")
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)


def test_simclr_vs_explicit_negatives_loop():
  za, zb = RNG.normal(size=(C, B, D)), RNG.normal(size=(C, B, D))
  tau = RNG.uniform(0.2, 1.5, (C, 2 * B, 2 * B))
  z = np.concatenate([za, zb], 1)
  anc, pos = z, np.concatenate([zb, za], 1)
  negs = np.zeros((C, 2 * B, 2 * B - 2, D))
  tp, tn = np.zeros((C, 2 * B)), np.zeros((C, 2 * B, 2 * B - 2))
  for i in range(2 * B):
    pi = (i + B) % (2 * B)
    others = [j for j in range(2 * B) if j not in (i, pi)]
    negs[:, i] = z[:, others]
    tp[:, i], tn[:, i] = tau[:, i, pi], tau[:, i, others]
  with jax.enable_x64(True):
    for variant in ("ntxent", "infonce"):
      got = amcl_simclr_loss(za, zb, tau, variant=variant)
      np.testing.assert_allclose(float(got), np_amcl(anc, pos, negs, tp, tn, variant=variant), rtol=1e-10)


def test_temperature_network_vs_numpy_and_end_to_end_grad():
  params = jax.jit(L.amcl_temperature_init, static_argnums=(1, 2, 3))(jax.random.key(0), C, D, 7)
  tau = np.asarray(jax.jit(A.amcl_temperature)(params, *F32(ANC[:, :, None], NEG)))
  assert tau.shape == (C, B, N)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  for c in range(C):
    w1 = np.concatenate([p["w1a"][c], p["w1b"][c]])
    for i in range(B):
      for k in range(N):
        h = np.maximum(np.concatenate([ANC[c, i], NEG[c, i, k]]) @ w1 + p["b1"][c], 0)
        ref = 1e-5 + (2 - 1e-5) / (1 + np.exp(-(h @ p["w2"][c] + p["b2"][c])))
        np.testing.assert_allclose(float(tau[c, i, k]), ref, rtol=1e-5)
  assert float(tau.min()) > 1e-5 and float(tau.max()) < 2.0

  def total(params, a, pos, neg):
    tp = A.amcl_temperature(params, a, pos)
    tn = A.amcl_temperature(params, a[:, :, None], neg)
    return A.amcl_loss(a, pos, neg, tp, tn)

  args = F32(ANC, POS, NEG)
  g = jax.jit(jax.grad(total, argnums=(0, 1)))(params, *args)
  leaves = jax.tree.leaves(g)
  assert all(np.all(np.isfinite(x)) for x in leaves)
  assert np.abs(np.asarray(g[0]["w2"])).max() > 0      # the temperatures are trained by the loss


def test_masks_empty_negatives_vmap_jit():
  args = F32(ANC, POS, NEG, TP, TN)
  mask = np.ones((B, N), bool)
  mask[1] = False          # anchor 1: no negatives -> positive + Omega(tau+) terms only
  mask[2, 0] = False
  with jax.enable_x64(True):
    for variant, red in (("ntxent", "max"), ("infonce", "logsumexp")):
        got = amcl_loss(ANC, POS, NEG, TP, TN, neg_where=mask, variant=variant, reduction=red)
        np.testing.assert_allclose(float(got), np_amcl(ANC, POS, NEG, TP, TN, variant=variant, reduction=red,
                                                       mask=mask), rtol=1e-10)
    per_head = np.stack([mask, ~mask])          # [C, B, N]: each head its own negatives
    got = amcl_loss(ANC, POS, NEG, TP, TN, neg_where=per_head)
    np.testing.assert_allclose(float(got), np_amcl(ANC, POS, NEG, TP, TN, mask=per_head), rtol=1e-10)
  full = np.zeros((B, N), bool)
  g = jax.jit(jax.grad(lambda a: A.amcl_loss(a, *args[1:], neg_where=full, reduction="logsumexp")))(args[0])
  assert np.all(np.isfinite(g))
  w = np.arange(B) < 3
  np.testing.assert_allclose(amcl_loss(*args, where=w), amcl_loss(*(x[:, :3] for x in args)), rtol=1e-6)
  # vmap over independent problems == loop
  stack = lambda x: np.stack([x, 2 * x + 0.1])
  vm = jax.jit(jax.vmap(lambda *a: A.amcl_loss(*a)))(*map(stack, args))
  for k in range(2):
    np.testing.assert_allclose(vm[k], amcl_loss(*(stack(x)[k] for x in args)), rtol=1e-5)
  # one head without the C axis, scalar temperatures
  one = amcl_loss(args[0][0], args[1][0], args[2][0], 0.5, 0.5)
  np.testing.assert_allclose(one, amcl_loss(args[0][:1], args[1][:1], args[2][:1], 0.5, 0.5), rtol=1e-6)


def test_tiny_huge_bf16():
  args = F32(ANC, POS, NEG, TP, TN)
  gfn = jax.jit(jax.grad(lambda a, p, n, tp, tn: A.amcl_loss(a, p, n, tp, tn, reduction="logsumexp"),
                         argnums=(0, 3, 4)))
  for scale in (1e-30, 1e20):
    feats = [scale * x for x in args[:3]]
    assert np.isfinite(float(amcl_loss(*feats, *args[3:])))
    assert all(np.all(np.isfinite(g)) for g in gfn(*feats, *args[3:]))
  tiny_tau = [args[0], args[1], args[2], np.full_like(args[3], 1e-5), np.full_like(args[4], 1e-5)]
  assert np.isfinite(float(amcl_loss(*tiny_tau)))
  bf = [x.astype(jnp.bfloat16) for x in args]   # numpy (ml_dtypes) bf16
  got = amcl_loss(*bf)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), float(amcl_loss(*args)), rtol=5e-2)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in gfn(*bf))
  # identical features everywhere: ties in the max, still finite
  same = np.ones((C, B, D), np.float32)
  assert np.isfinite(float(amcl_loss(same, same, np.ones((C, B, N, D), np.float32), args[3], args[4])))


def np_symnegcos(pa, pb, ta, tb, t1, t2, beta=0.1):
  tot = 0.
  c_, b_, d_ = pa.shape
  for i in range(b_):
    for c in range(c_):
      tot += (-_cos(pa[c, i], tb[c, i]) / (2 * t1[c, i]) - _cos(pb[c, i], ta[c, i]) / (2 * t2[c, i])
              + beta * _omega(t1[c, i], d_) + beta * _omega(t2[c, i], d_))
  return tot / b_


def np_barlow(za, zb, tp, tn, lambd=5e-3, beta=0.1, eps=1e-5):
  c_, b_, d_ = za.shape
  tot = 0.
  for c in range(c_):
    na = (za[c] - za[c].mean(0)) / np.sqrt(za[c].var(0) + eps)
    nb = (zb[c] - zb[c].mean(0)) / np.sqrt(zb[c].var(0) + eps)
    for l in range(d_):
      for m in range(d_):
        clm = sum(na[k, l] * nb[k, m] for k in range(b_)) / b_
        if l == m:
          tot += (1 - clm / tp[c, l]) ** 2 + beta * _omega(tp[c, l], d_)
        else:
          tot += lambd * clm ** 2 / tn[c, l, m] - beta * _omega(tn[c, l, m], d_)
  return tot


def test_symnegcos_and_barlow_vs_numpy_and_grads():
  pa, pb, ta, tb = (RNG.normal(size=(C, B, D)) for _ in range(4))
  t1, t2 = RNG.uniform(0.3, 1.5, (C, B)), RNG.uniform(0.3, 1.5, (C, B))
  btp, btn = RNG.uniform(0.3, 1.5, (C, D)), RNG.uniform(0.3, 1.5, (C, D, D))
  with jax.enable_x64(True):
    np.testing.assert_allclose(float(jax.jit(A.amcl_symnegcos_loss)(pa, pb, ta, tb, t1, t2)),
                               np_symnegcos(pa, pb, ta, tb, t1, t2), rtol=1e-10)
    np.testing.assert_allclose(float(jax.jit(A.amcl_barlow_twins_loss)(pa, pb, btp, btn)),
                               np_barlow(pa, pb, btp, btn), rtol=1e-10)
    fd_check(lambda a, b, t: A.amcl_barlow_twins_loss(a, b, t, btn), (pa, pb, btp))
    fd_check(lambda a, b, t: A.amcl_symnegcos_loss(a, b, ta, tb, t, t), (pa, pb, t1))
    # targets are stop-gradiented
    gt = jax.jit(jax.grad(lambda t: A.amcl_symnegcos_loss(pa, pb, t, tb, t1, t2)))(ta)
    assert np.all(np.asarray(gt) == 0)
  bf = lambda x: np.asarray(x).astype(jnp.bfloat16)
  barlow = jax.jit(A.amcl_barlow_twins_loss)
  assert np.isfinite(float(barlow(bf(pa), bf(pb), bf(btp), bf(btn))))
  const = np.ones((C, B, D), np.float32)   # zero batch variance: eps keeps it finite
  assert np.isfinite(float(barlow(const, const, 1.0, 1.0)))


def test_bad_inputs():
  args = F32(ANC, POS, NEG, TP, TN)
  raises_while_tracing("variant", lambda: A.amcl_loss(*args, variant="simsiam"))
  raises_while_tracing("reduction", lambda: A.amcl_loss(*args, reduction="mean"))
  raises_while_tracing("negatives", lambda: A.amcl_loss(args[0], args[1], args[2][:, :, :, :3], *args[3:]))
  raises_while_tracing("tau_neg", lambda: A.amcl_loss(*args[:4], args[4][:, :, :2]))
  raises_while_tracing("beta", lambda: A.amcl_loss(*args, beta=-1.))
  raises_while_tracing("view_b", lambda: A.amcl_simclr_loss(args[0], args[1][:, :2], 0.5))
  raises_while_tracing("tau", lambda: A.amcl_simclr_loss(args[0], args[1], np.ones((C, 3, 3), np.float32)))
  raises_while_tracing("dim", lambda: L.amcl_omega(np.ones(3, np.float32), 0))
  raises_while_tracing("target_b", lambda: A.amcl_symnegcos_loss(args[0], args[1], args[0], args[1][:, :2], 1., 1.))
  raises_while_tracing("z_a", lambda: A.amcl_barlow_twins_loss(args[0][:, :1], args[1][:, :1], 1., 1.))
  params = jax.tree.map(np.asarray, jax.jit(L.amcl_temperature_init, static_argnums=(1, 2))(jax.random.key(0), C, D))
  raises_while_tracing("za", lambda: A.amcl_temperature(params, args[0][:1], args[1]))
  raises_while_tracing("lower", lambda: A.amcl_temperature(params, args[0], args[1], lower=3.))
  raises_while_tracing("num_heads", lambda: L.amcl_temperature_init(jax.random.key(0), 0, D))
