"""Rep-MTL regularisers vs float64 numpy loops written from the paper's Eqs. 3-10."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses as L
from losses import rep_mtl as R
from oracle_utils import fd_check, raises_while_tracing

tsr = jax.jit(R.rep_mtl_tsr_loss, static_argnames=("channel_axis",))
csa = jax.jit(R.rep_mtl_csa_loss, static_argnames=("channel_axis",))

RNG = np.random.default_rng(0)
T, B, H, W, C = 3, 4, 2, 2, 3
S = RNG.normal(size=(T, B, H, W, C))


def np_tsr(s):
  """s [T, B, H, W, C]: entropy over tasks of |channel mean|, averaged over samples and positions."""
  t_, b_, h_, w_, _ = s.shape
  tot = []
  for b in range(b_):
    for h in range(h_):
      for w in range(w_):
        a = [abs(np.mean(s[t, b, h, w])) for t in range(t_)]
        z = sum(a)
        p = [x / z if z > 0 else 0. for x in a]
        tot.append(-sum(x * np.log(x) for x in p if x > 0))
  return np.mean(tot)


def _unit(v):
  return v / np.linalg.norm(v)


def np_csa(s, tau=0.1):
  t_, b_, h_, w_, c_ = s.shape
  za, zt = [], []
  for b in range(b_):
    a = np.zeros((c_, t_))
    ms = []
    for t in range(t_):
      mat = s[t, b].reshape(h_ * w_, c_).T        # C x (H'W')
      ms.append(_unit((mat @ mat.T).reshape(-1)))
      a[:, t] = mat.mean(1)
    za.append(_unit((a @ a.T).reshape(-1)))
    zt.append(ms)
  out = 0.
  for b in range(b_):
    den = sum(np.exp(za[b] @ za[k] / tau) for k in range(b_) if k != b)
    for t in range(t_):
      out += -(za[b] @ zt[b][t] / tau - (np.log(den) if b_ > 1 else 0.))
  return out / (b_ * t_)


def test_tsr_csa_vs_numpy():
  with jax.enable_x64(True):
    np.testing.assert_allclose(float(tsr(S)), np_tsr(S), rtol=1e-10)
    np.testing.assert_allclose(float(csa(S)), np_csa(S), rtol=1e-10)
    np.testing.assert_allclose(float(csa(S, tau=0.5)), np_csa(S, 0.5), rtol=1e-10)
    # channels-first layout [T, B, C, H, W] with channel_axis=1 (axis of the per-task array)
    sf = np.moveaxis(S, -1, 2)
    np.testing.assert_allclose(float(tsr(sf, channel_axis=1)), np_tsr(S), rtol=1e-10)
    np.testing.assert_allclose(float(csa(sf, channel_axis=1)), np_csa(S), rtol=1e-10)
    # the documented default tau = 0.1
    np.testing.assert_allclose(float(csa(S)), float(csa(S, tau=0.1)), rtol=1e-12)
    assert abs(float(csa(S)) - float(csa(S, tau=0.2))) > 1e-3
    # small eps: |channel mean| has kinks at 0 and one of the 48 means of this draw is within 1e-3 of it
    fd_check(lambda x: R.rep_mtl_tsr_loss(x) + R.rep_mtl_csa_loss(x), (S,))


def test_edge_cases_one_task_one_sample_zeros_scale():
  s = S.astype(np.float32)
  # one task: the distribution over tasks is a point mass -> zero entropy
  np.testing.assert_allclose(float(tsr(s[:1])), 0.0, atol=1e-7)
  # one sample: no negatives, log-sum-exp of nothing = 0 -> -mean_t sim / tau
  with jax.enable_x64(True):
    np.testing.assert_allclose(float(csa(S[:, :1])), np_csa(S[:, :1]), rtol=1e-10)
  both = jax.jit(lambda x: jnp.stack([R.rep_mtl_tsr_loss(x), R.rep_mtl_csa_loss(x)]))
  ref = np.asarray(both(s))
  # all-zero saliency (e.g. a detached head): finite values and gradients
  z = np.zeros_like(s)
  g = jax.jit(jax.grad(lambda x: R.rep_mtl_tsr_loss(x) + R.rep_mtl_csa_loss(x)))(z)
  assert np.all(np.isfinite(np.asarray(both(z)))) and np.all(np.isfinite(g))
  # invariant to rescaling the saliencies, including tiny / huge scales that overflow float32 squares
  for k in (1e-30, 1e-12, 1e15, 1e30):
    np.testing.assert_allclose(np.asarray(both(np.float32(k) * s)), ref, rtol=1e-4)
  bf = s.astype(jnp.bfloat16)
  assert tsr(bf).dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(both(bf)), ref, rtol=5e-2)
  # where: masked samples are neither anchors nor negatives
  m = np.arange(B) < 3
  np.testing.assert_allclose(float(csa(s, where=m)), float(csa(s[:, :3])), rtol=1e-6)
  np.testing.assert_allclose(float(tsr(s, where=m)), float(tsr(s[:, :3])), rtol=1e-6)
  # vmap over independent problems
  vm = jax.jit(jax.vmap(R.rep_mtl_csa_loss))(np.stack([s, s ** 2]))
  np.testing.assert_allclose(vm, [float(csa(s)), float(csa(s ** 2))], rtol=1e-5)


P_, O_ = 2, 2   # positions, head outputs
Z = RNG.normal(size=(B, P_, C))
HEADS = RNG.normal(size=(T, C, O_))
TARGETS = RNG.normal(size=(T, B, P_, O_))


def _task_losses(heads, z):
  pred = jnp.einsum("bpc,tco->tbpo", z, heads)
  return jnp.mean((pred - TARGETS) ** 2, axis=(1, 2, 3))


def test_saliency_helper_vs_analytic_gradient():
  with jax.enable_x64(True):
    losses, sal = jax.jit(lambda h, z: L.rep_mtl_task_saliency(lambda zz: _task_losses(h, zz), z))(HEADS, Z)
    losses, sal = np.asarray(losses), np.asarray(sal)
    assert sal.shape == (T,) + Z.shape
    for t in range(T):
      ref_l, ref_g = 0., np.zeros_like(Z)
      for b in range(B):
        for p in range(P_):
          r = Z[b, p] @ HEADS[t] - TARGETS[t, b, p]
          ref_l += np.sum(r ** 2) / (B * P_ * O_)
          ref_g[b, p] = 2 * HEADS[t] @ r / (B * P_ * O_)
      np.testing.assert_allclose(losses[t], ref_l, rtol=1e-10)
      np.testing.assert_allclose(sal[t], ref_g, rtol=1e-10)
    aux = jax.jit(lambda z: L.rep_mtl_task_saliency(lambda zz: (_task_losses(HEADS, zz), 7.), z, has_aux=True)[2])(Z)
    assert float(aux) == 7.


def test_total_loss_value_and_second_order_gradient():
  with jax.enable_x64(True):

    def total(h, z):
      return L.rep_mtl_loss(lambda zz: _task_losses(h, zz), z, lambda_tsr=0.7, lambda_csa=1.3)[0]

    val = jax.jit(total)(HEADS, Z)
    ref_sal = np.zeros((T,) + Z.shape)
    for t in range(T):
      for b in range(B):
        for p in range(P_):
          ref_sal[t, b, p] = 2 * HEADS[t] @ (Z[b, p] @ HEADS[t] - TARGETS[t, b, p]) / (B * P_ * O_)
    ref_losses = [np.mean((np.einsum("bpc,co->bpo", Z, HEADS[t]) - TARGETS[t]) ** 2) for t in range(T)]
    s5 = ref_sal[:, :, :, None, :]     # [T, B, P, 1, C] as [T, B, H, W, C]
    np.testing.assert_allclose(float(val), sum(ref_losses) + 0.7 * np_tsr(s5) + 1.3 * np_csa(s5), rtol=1e-10)
    # gradients through the saliencies (second order) w.r.t. the heads and the representation
    fd_check(total, (HEADS, Z))
    # the regularisers do contribute to the head gradient (saliency not detached)
    g_reg = jax.jit(jax.grad(lambda h: L.rep_mtl_loss(lambda zz: _task_losses(h, zz), Z)[0]))(HEADS)
    g_plain = jax.jit(jax.grad(lambda h: jnp.sum(_task_losses(h, Z))))(HEADS)
    assert np.abs(np.asarray(g_reg) - np.asarray(g_plain)).max() > 1e-6
    w = np.array([2., 0., 1.])
    tw, aux = jax.jit(lambda z, w: L.rep_mtl_loss(lambda zz: _task_losses(HEADS, zz), z, task_weights=w))(Z, w)
    np.testing.assert_allclose(float(tw), np.sum(w * np.asarray(aux["task_losses"])) + 0.9 * float(aux["tsr"])
                               + 0.9 * float(aux["csa"]), rtol=1e-12)


def test_bad_inputs():
  s = S.astype(np.float32)
  raises_while_tracing("saliency", lambda: R.rep_mtl_tsr_loss(s[:, 0, 0, 0]))
  raises_while_tracing("channel_axis", lambda: R.rep_mtl_csa_loss(s, channel_axis=0))
  raises_while_tracing("tau", lambda: R.rep_mtl_csa_loss(s, tau=0.))
  raises_while_tracing("where", lambda: R.rep_mtl_tsr_loss(s, where=np.ones(B + 1, bool)))
  raises_while_tracing("task_losses_fn", lambda: L.rep_mtl_task_saliency(lambda z: jnp.sum(z), np.ones((2, 3), np.float32)))
  raises_while_tracing("task_weights", lambda: L.rep_mtl_loss(lambda z: _task_losses(HEADS, z), Z, task_weights=np.ones(2)))
  raises_while_tracing("lambda_tsr", lambda: L.rep_mtl_loss(lambda z: _task_losses(HEADS, z), Z, lambda_tsr=-1.))
  raises_while_tracing("z must", lambda: L.rep_mtl_loss(lambda z: z, np.ones(3, np.float32)))
