"""AST objectives vs float64 numpy loops written from the official code's formulas, and the digits example."""
from __future__ import annotations

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses as L
from losses import ast as A
from oracle_utils import fd_check, raises_while_tracing

RNG = np.random.default_rng(0)
B, H, W, CH, K = 3, 2, 2, 2, 4
X = RNG.normal(size=(B, H, W, CH))
W1, V1 = RNG.normal(size=(H * W * CH, 5)) * 0.5, RNG.normal(size=(5, K))
Y = np.array([0, 3, 1])


def net(params, x):
  w, v = params
  return jnp.tanh(x.reshape(x.shape[0], -1) @ w) @ v


def np_input_grad(w, v, x):
  """d(sum_{b,k} f(x)_{b,k}) / dx for f = tanh(x w) v, per sample."""
  g = np.zeros_like(x)
  for b in range(x.shape[0]):
    h = np.tanh(x[b].reshape(-1) @ w)
    g[b] = (w @ ((1 - h ** 2) * v.sum(1))).reshape(x.shape[1:])
  return g


def np_gp(w, v, x, lam=2.0, channel_axis=-1):
  g = np.moveaxis(np_input_grad(w, v, x), channel_axis, -1)
  vals = [(np.sqrt(np.sum(g[idx] ** 2)) - 1) ** 2 for idx in np.ndindex(*g.shape[:-1])]
  return lam * np.mean(vals)


def np_ce(logits, y):
  out = 0.
  for i in range(len(y)):
    m = logits[i].max()
    out += m + np.log(np.sum(np.exp(logits[i] - m))) - logits[i, y[i]]
  return out / len(y)


def test_loss_scale_and_balance_factor_vs_formula():
  got = np.asarray(jax.jit(lambda e: L.ast_loss_scale(e))(np.arange(14)))
  off = np.asarray(jax.jit(lambda e: L.ast_loss_scale(e, num_decay_epochs=0))(np.arange(3)))
  for e in range(14):
    ref = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95][e] if e < 10 else 1.0
    np.testing.assert_allclose(got[e], ref, rtol=1e-6)
  np.testing.assert_allclose(off, 1.0)
  # the default of 10 decay epochs also holds when start/step do not reach 1 by then
  np.testing.assert_allclose([L.ast_loss_scale(9, start=0.2), L.ast_loss_scale(10, start=0.2)], [0.65, 1.0],
                             rtol=1e-6)
  for s in (0, 1, 20, 30):
    # traced start epoch, as in a jitted distillation step
    fac = np.asarray(jax.jit(lambda e: L.ast_balance_factor(e, s))(np.arange(s + 1)))
    for e in range(s + 1):
      half = s // 2
      ref = math.log(e - half + 8, 5) if e >= half else 1 / math.log(half - e + 8, 5)
      np.testing.assert_allclose(fac[e], ref, rtol=1e-6)


def test_gradient_penalty_and_expert_loss_vs_numpy():
  with jax.enable_x64(True):
    p = (W1, V1)
    gp = jax.jit(lambda p, x: L.ast_gradient_penalty(lambda z: net(p, z), x))
    np.testing.assert_allclose(float(gp(p, X)), np_gp(W1, V1, X), rtol=1e-10)
    gp1 = jax.jit(lambda p, x: L.ast_gradient_penalty(lambda z: net(p, z), x, channel_axis=1, weight=0.5))
    np.testing.assert_allclose(float(gp1(p, X)), np_gp(W1, V1, X, 0.5, channel_axis=1), rtol=1e-10)
    flat = X.reshape(B, -1)                                 # [B, D] inputs: one norm per sample
    np.testing.assert_allclose(float(gp(p, flat)), np_gp(W1, V1, flat), rtol=1e-10)
    xa = X + 0.3
    expert = jax.jit(lambda p, e: L.ast_expert_loss(lambda z: net(p, z), X, Y, e, x_aug=xa))
    for epoch in (0, 4, 12):
      logits = np.tanh(xa.reshape(B, -1) @ W1) @ V1
      ref = (0.5 + 0.05 * epoch if epoch < 10 else 1.0) * np_ce(logits, Y) + np_gp(W1, V1, X)
      np.testing.assert_allclose(float(expert(p, epoch)), ref, rtol=1e-10)
    # double backward: the penalty's gradient w.r.t. the weights vs finite differences
    fd_check(lambda w, v: L.ast_gradient_penalty(lambda z: net((w, v), z), X), p)
  # zero input-gradient (constant net): penalty = lam, finite gradient
  p = (W1.astype(np.float32), V1.astype(np.float32))
  x32 = X.astype(np.float32)
  zero_gp = lambda w: L.ast_gradient_penalty(lambda z: 0. * net((w, p[1]), z), x32)
  np.testing.assert_allclose(float(jax.jit(zero_gp)(p[0])), 2.0, rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(zero_gp))(p[0]))))
  bf = jax.jit(lambda x: L.ast_gradient_penalty(lambda z: net(p, z), x))(X.astype(jnp.bfloat16))
  assert bf.dtype == jnp.float32 and np.isfinite(float(bf))


def _tree(rng, scale=1.0):
  return {"a": rng.normal(size=(3, 2)) * scale, "b": rng.normal(size=(4,)) * scale}


def np_traj(student, start, target):
  num = sum(np.sum((student[k] - target[k]) ** 2) for k in student)
  den = sum(np.sum((start[k] - target[k]) ** 2) for k in student)
  return num / den


@pytest.mark.parametrize("middle", ["agg", "adaptive", "none"])
def test_matching_loss_vs_numpy(middle):
  m = 3
  start = _tree(RNG)
  experts = [_tree(RNG) for _ in range(m)]
  students = [_tree(RNG) for _ in range(m)]
  stack = lambda ts: {k: np.stack([t[k] for t in ts]) for k in ts[0]}
  match = jax.jit(lambda s, st, e: L.ast_matching_loss(s, st, e, middle=middle))
  with jax.enable_x64(True):
    got = match(stack(students), start, stack(experts))
    beta = {"agg": [1., 1.], "adaptive": [1 / 3, 2 / 3], "none": [0., 0.]}[middle]
    ref = np_traj(students[-1], start, experts[-1]) + sum(
        beta[i - 1] * np_traj(students[i - 1], start, experts[i - 1]) for i in range(1, m))
    np.testing.assert_allclose(float(got), ref, rtol=1e-10)
  # M = 1 is plain MTT
  one = jax.jit(L.ast_matching_loss)(stack(students[:1]), start, stack(experts[:1]))
  np.testing.assert_allclose(float(one), np_traj(students[0], start, experts[0]), rtol=1e-5)
  # an expert that did not move: finite (clamped denominator)
  assert np.isfinite(float(jax.jit(L.ast_trajectory_loss)(start, start, start)))


def np_unroll(w0, x, y, lr, steps, m, mom, factor):
  """SGD with heavy-ball momentum on factor * CE(x w) (linear softmax), recording (N//M) i and N."""
  w, buf, rec = w0.copy(), np.zeros_like(w0), []
  n, k = x.shape[0], w0.shape[1]
  for t in range(1, steps + 1):
    z = x @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(k)[y]
    g = factor * x.T @ (p - onehot) / n
    buf = mom * buf + g
    w = w - lr * buf
    if t in [(steps // m) * i for i in range(1, m)] + [steps]:
      rec.append(w.copy())
  return np.stack(rec)


def _linear_ce(w, x, y):
  z = x @ w
  return jnp.mean(jax.nn.logsumexp(z, 1) - jnp.take_along_axis(z, y[:, None], 1)[:, 0])


def test_unroll_vs_numpy_and_grad_through_it():
  x, y, w0 = RNG.normal(size=(6, 4)), np.array([0, 1, 2, 0, 1, 2]), RNG.normal(size=(4, 3)) * 0.1
  with jax.enable_x64(True):
    for steps, m, e, smax in ((7, 3, 2, 10), (4, 2, 9, 10), (5, 1, None, None)):
      got = jax.jit(lambda w, xx, lr: L.ast_unroll(_linear_ce, w, xx, y, lr, num_steps=steps, num_expert_epochs=m,
                                                   start_epoch=e, max_start_epoch=smax))(w0, x, 0.3)
      fac = 1.0 if e is None else (math.log(e - smax // 2 + 8, 5) if e >= smax // 2 else
                                   1 / math.log(smax // 2 - e + 8, 5))
      np.testing.assert_allclose(np.asarray(got), np_unroll(w0, x, y, 0.3, steps, m, 0.9, fac), rtol=1e-10)
    assert L.ast_record_steps(7, 3) == [2, 4, 7]
    assert L.ast_record_steps(3, 3) == [1, 2, 3]
    # the distillation gradient (images and lr) through the unroll and the matching loss vs finite differences
    experts = RNG.normal(size=(2, 4, 3)) * 0.1

    def objective(xx, lr):
      st = L.ast_unroll(_linear_ce, w0, xx, y, lr, num_steps=4, num_expert_epochs=2, start_epoch=3,
                        max_start_epoch=8)
      return L.ast_matching_loss(st, w0, experts)

    fd_check(objective, (x, np.float64(0.2)))
  # vmap over independent synthetic sets (e.g. several seeds); bf16 images
  xs = np.stack([x, 2 * x]).astype(np.float32)
  run = jax.jit(lambda xx: L.ast_unroll(_linear_ce, w0.astype(np.float32), xx, y, 0.1, num_steps=3,
                                        num_expert_epochs=1))
  vm = np.asarray(jax.jit(jax.vmap(run))(xs))
  np.testing.assert_allclose(vm[1], np.asarray(run(xs[1])), rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(run(xs[0].astype(jnp.bfloat16)), np.float32)))


def test_bad_inputs():
  p = (W1.astype(np.float32), V1.astype(np.float32))
  x = X.astype(np.float32)
  raises_while_tracing("channel_axis", lambda: L.ast_gradient_penalty(lambda z: net(p, z), x, channel_axis=0))
  raises_while_tracing("x must", lambda: L.ast_gradient_penalty(lambda z: z, np.ones(3, np.float32)))
  raises_while_tracing("labels", lambda: L.ast_expert_loss(lambda z: net(p, z), x, np.zeros(2, int), 0))
  raises_while_tracing("labels", lambda: L.ast_expert_loss(lambda z: net(p, z), x, np.zeros(B, np.float32), 0))
  raises_while_tracing("max_start_epoch", lambda: L.ast_balance_factor(3, -1))
  one, three = {"a": np.ones((2, 3))}, {"a": np.ones(3)}
  raises_while_tracing("middle", lambda: L.ast_matching_loss(one, three, one, middle="all"))
  raises_while_tracing("structure", lambda: L.ast_matching_loss(one, {"b": np.ones(3)}, one))
  raises_while_tracing("leading axis", lambda: L.ast_matching_loss(one, three, {"a": np.ones((3, 3))}))
  raises_while_tracing("num_steps", lambda: L.ast_record_steps(2, 3))
  raises_while_tracing("num_expert_epochs", lambda: L.ast_middle_weights(0))
  lin = (np.ones((4, 3), np.float32), np.ones((6, 4), np.float32))
  raises_while_tracing("together", lambda: L.ast_unroll(_linear_ce, *lin, np.zeros(6, int), 0.1, num_steps=2,
                                           num_expert_epochs=1, start_epoch=1))
  raises_while_tracing("syn_y", lambda: L.ast_unroll(_linear_ce, *lin, np.zeros(5, int), 0.1, num_steps=2, num_expert_epochs=1))
  raises_while_tracing("num_decay_epochs", lambda: L.ast_loss_scale(1, num_decay_epochs=-1))


@pytest.mark.slow  # kept out of the default run for time; `pytest -m slow tests` runs it
def test_digits_example_tiny():
  pytest.importorskip("sklearn")
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "ast_distill.py")
  spec = importlib.util.spec_from_file_location("ast_distill_example", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  out = mod.main(["--ipc=1", "--hidden=16", "--num_experts=1", "--expert_train_epochs=3", "--max_start_epoch=1",
                  "--expert_epochs=2", "--syn_steps=4", "--iterations=3", "--eval_steps=5", "--n_eval=2"])
  r = out["results"]["1"]
  for key in ("distilled_acc", "random_real_acc", "random_real_acc_learned_lr"):
    assert 0.0 <= r[key]["mean"] <= 1.0 and np.isfinite(r[key]["std"])
  assert 0.0 <= out["expert_test_acc"]["mean"] <= 1.0 and np.isfinite(r["learned_lr"])
