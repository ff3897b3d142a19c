"""Distil scikit-learn's digits (8x8, 10 classes) with AST trajectory matching; prints JSON.

AST (arXiv:2310.10541): experts trained with the clipping loss and the input-gradient penalty, students unrolled
with the balanced inner loop and matched to the expert trajectory with intermediate matching (`losses.ast`).

Protocol (all on CPU, sizes set by flags):
1. Split digits 70/30 (stratified, seed 0); pixels / 16, then standardised with the training mean and std.
2. Train `--num_experts` expert MLPs (64 -> hidden -> 10, ReLU) for `--expert_train_epochs` epochs of minibatch
   SGD-momentum (0.9, lr `--lr_teacher`, batch 32) on AST's expert loss (clipping loss for the first
   `--loss_decay_epochs` epochs + gradient penalty `--gp_weight`), recording the parameters after every epoch.
   Unlike the reference recipe there is no data augmentation and no weight decay (digits are 8x8 grey images).
3. For each IPC: initialise the synthetic set with IPC random real training images per class, then for
   `--iterations` steps sample an expert and a start epoch e <= `--max_start_epoch`, unroll `--syn_steps` student
   steps on the synthetic set from theta*_e, and update the images and the learnable student lr with SGD
   (momentum 0.5) on the AST matching loss against theta*_{e+1..e+M}, M = `--expert_epochs`.
4. Evaluate: train `--n_eval` fresh MLPs on the distilled set (full batch, `--eval_steps` steps, the learned lr)
   and on the initial random real images (same steps, lr_teacher and the learned lr); report the test accuracy
   (mean, std) of each and of the experts trained on all the training data.

Usage: python examples/ast_distill.py --ipc=1,10
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from losses.ast import ast_expert_loss, ast_matching_loss, ast_unroll  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ipc", default="1,10", help="comma-separated images per class")
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--num_experts", type=int, default=5)
  p.add_argument("--expert_train_epochs", type=int, default=20)
  p.add_argument("--lr_teacher", type=float, default=0.01)
  p.add_argument("--gp_weight", type=float, default=2.0, help="AST gradient penalty (0 = off)")
  p.add_argument("--loss_decay_epochs", type=int, default=10, help="AST clipping loss epochs (0 = off)")
  p.add_argument("--syn_steps", type=int, default=20)
  p.add_argument("--expert_epochs", type=int, default=2)
  p.add_argument("--max_start_epoch", type=int, default=10)
  p.add_argument("--iterations", type=int, default=500)
  p.add_argument("--lr_img", type=float, default=1.0)
  p.add_argument("--lr_lr", type=float, default=1e-4)
  p.add_argument("--inner_momentum", type=float, default=0.9)
  p.add_argument("--no_balance", action="store_true", help="disable the balanced inner loop")
  p.add_argument("--middle", default="agg", choices=("agg", "adaptive", "none"))
  p.add_argument("--eval_steps", type=int, default=300)
  p.add_argument("--n_eval", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  args.ipc = [int(v) for v in str(args.ipc).split(",") if v]
  if args.max_start_epoch + args.expert_epochs > args.expert_train_epochs:
    p.error("max_start_epoch + expert_epochs must be <= expert_train_epochs")
  return args


def load_data(seed: int = 0):
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  d = load_digits()
  x = d.images.astype(np.float32)[..., None] / 16.0            # [N, 8, 8, 1]
  xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.3, stratify=d.target, random_state=seed)
  mu, sd = xtr.mean(), xtr.std()
  return (xtr - mu) / sd, ytr.astype(np.int32), (xte - mu) / sd, yte.astype(np.int32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def init_mlp(key, hidden: int, d_in: int = 64, n_cls: int = 10):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (d_in, hidden)) * np.sqrt(2.0 / d_in), "b1": jnp.zeros(hidden),
          "w2": jax.random.normal(k2, (hidden, n_cls)) * np.sqrt(1.0 / hidden), "b2": jnp.zeros(n_cls)}


def apply_mlp(p, x):
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"]


def ce(p, x, y):
  logits = apply_mlp(p, x)
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])


@jax.jit
def _accuracy(p, x, y):
  return jnp.mean(jnp.argmax(apply_mlp(p, x), -1) == y)


def accuracy(p, x, y):
  return float(_accuracy(p, x, y))


def stack_trees(trees):
  """Stacks pytrees of arrays on a new leading axis (host-side numpy: no per-shape compilation)."""
  return jax.tree.map(lambda *a: np.stack([np.asarray(v) for v in a]), *trees)


def train_expert(key, xtr, ytr, args):
  """One expert trajectory: params after epochs 0..E (stacked leaves [E+1, ...])."""
  kinit, kperm = jax.random.split(key)
  params = init_mlp(kinit, args.hidden)
  bs = 32
  nb = xtr.shape[0] // bs

  @jax.jit
  def epoch_fn(params, buf, epoch, key):
    perm = jax.random.permutation(key, xtr.shape[0])[:nb * bs].reshape(nb, bs)

    def step(carry, idx):
      p, b = carry
      xb, yb = xtr[idx], ytr[idx]
      g = jax.grad(lambda q: ast_expert_loss(lambda z: apply_mlp(q, z), xb, yb, epoch, gp_weight=args.gp_weight,
                                             num_decay_epochs=args.loss_decay_epochs))(p)
      b = jax.tree.map(lambda m, gg: 0.9 * m + gg, b, g)
      return (jax.tree.map(lambda w, m: w - args.lr_teacher * m, p, b), b), None

    (params, buf), _ = jax.lax.scan(step, (params, buf), perm)
    return params, buf

  traj = [params]
  buf = jax.tree.map(jnp.zeros_like, params)
  for e in range(args.expert_train_epochs):
    params, buf = epoch_fn(params, buf, e, jax.random.fold_in(kperm, e))
    traj.append(params)
  return stack_trees(traj)


def train_eval(key, x, y, lr, steps, hidden, xte, yte):
  """Fresh MLP trained full-batch (SGD momentum 0.9) on (x, y); returns its test accuracy."""
  p = init_mlp(key, hidden)

  def step(carry, _):
    p, b = carry
    g = jax.grad(ce)(p, x, y)
    b = jax.tree.map(lambda m, gg: 0.9 * m + gg, b, g)
    return (jax.tree.map(lambda w, m: w - lr * m, p, b), b), None

  (p, _), _ = jax.lax.scan(step, (p, jax.tree.map(jnp.zeros_like, p)), None, length=steps)
  return jnp.mean(jnp.argmax(apply_mlp(p, xte), -1) == yte)


def distill(key, xtr, ytr, trajs, ipc, args):
  """AST distillation of `ipc` images per class; returns (syn_x, syn_y, init_x, learned lr, final loss)."""
  rng = np.random.default_rng(args.seed + 1000 * ipc)
  idx = np.concatenate([rng.choice(np.flatnonzero(ytr == c), ipc, replace=False) for c in range(10)])
  syn_x0, syn_y = np.asarray(xtr)[idx], np.asarray(ytr)[idx]
  m, n = args.expert_epochs, args.syn_steps
  max_start = args.max_start_epoch

  def matching(syn_x, syn_lr, k, e):
    expert = jax.tree.map(lambda a: a[k], trajs)
    start = jax.tree.map(lambda a: a[e], expert)
    targets = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, e + 1, m), expert)
    bal = {} if args.no_balance else {"start_epoch": e, "max_start_epoch": max_start}
    students = ast_unroll(ce, start, syn_x, syn_y, syn_lr, num_steps=n, num_expert_epochs=m,
                          momentum=args.inner_momentum, **bal)
    return ast_matching_loss(students, start, targets, middle=args.middle)

  @jax.jit
  def update(state, key):
    syn_x, syn_lr, mx, ml = state
    kk, ke = jax.random.split(key)
    k = jax.random.randint(kk, (), 0, args.num_experts)
    e = jax.random.randint(ke, (), 0, max_start + 1)
    loss, (gx, gl) = jax.value_and_grad(matching, argnums=(0, 1))(syn_x, syn_lr, k, e)
    mx = 0.5 * mx + gx
    ml = 0.5 * ml + gl
    return (syn_x - args.lr_img * mx, jnp.maximum(syn_lr - args.lr_lr * ml, 1e-5), mx, ml), loss

  state = (syn_x0, np.float32(args.lr_teacher), np.zeros_like(syn_x0), np.float32(0.))
  losses = []
  for it in range(args.iterations):
    state, loss = update(state, jax.random.fold_in(key, it))
    losses.append(float(loss))
  first = float(np.mean(losses[:max(1, len(losses) // 10)]))
  last = float(np.mean(losses[-max(1, len(losses) // 10):]))
  return state[0], syn_y, syn_x0, float(state[1]), first, last


def main(argv=None):
  args = parse_args(argv)
  t0 = time.time()
  xtr, ytr, xte, yte = load_data(0)   # fixed split; --seed varies experts, init and evaluation
  xtr, ytr, xte, yte = map(jnp.asarray, (xtr, ytr, xte, yte))
  key = jax.random.PRNGKey(args.seed)
  experts = [train_expert(jax.random.fold_in(key, k), xtr, ytr, args) for k in range(args.num_experts)]
  trajs = jax.tree.map(jnp.asarray, stack_trees(experts))
  final = [accuracy(jax.tree.map(lambda a: a[-1], ex), xte, yte) for ex in experts]
  t_exp = time.time() - t0
  out = {"dataset": "sklearn digits (8x8, 10 classes), 1257 train / 540 test",
         "model": f"MLP 64-{args.hidden}-10",
         "args": {k: v for k, v in vars(args).items()},
         "expert_test_acc": {"mean": float(np.mean(final)), "std": float(np.std(final))},
         "expert_seconds": round(t_exp, 1), "results": {}}
  ev = jax.jit(jax.vmap(train_eval, in_axes=(0, None, None, None, None, None, None, None)),
               static_argnums=(4, 5))
  keys = jax.random.split(jax.random.fold_in(key, 10_000), args.n_eval)
  for ipc in args.ipc:
    t1 = time.time()
    syn_x, syn_y, init_x, lr, first, last = distill(jax.random.fold_in(key, 20_000 + ipc), xtr, ytr, trajs, ipc, args)
    acc_syn = np.asarray(ev(keys, syn_x, syn_y, lr, args.eval_steps, args.hidden, xte, yte))
    acc_real = np.asarray(ev(keys, init_x, syn_y, args.lr_teacher, args.eval_steps, args.hidden, xte, yte))
    acc_real_lr = np.asarray(ev(keys, init_x, syn_y, lr, args.eval_steps, args.hidden, xte, yte))
    stat = lambda a: {"mean": float(np.mean(a)), "std": float(np.std(a))}
    out["results"][str(ipc)] = {
        "distilled_acc": stat(acc_syn), "random_real_acc": stat(acc_real),
        "random_real_acc_learned_lr": stat(acc_real_lr), "learned_lr": lr,
        "matching_loss_first_10pct": first, "matching_loss_last_10pct": last,
        "seconds": round(time.time() - t1, 1)}
  out["total_seconds"] = round(time.time() - t0, 1)
  return out


if __name__ == "__main__":
  print(json.dumps(main(), indent=1))
