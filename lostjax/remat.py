"""Rematerialisation whose recomputation waits for the backward pass.

`jax.checkpoint` saves only what its policy names and recomputes the rest from the saved inputs in the backward
pass. Nothing in the program says *when* that recomputation runs: it depends on the saved inputs only, and
XLA:CPU's scheduler places it right beside the forward computation it repeats, so every recomputed intermediate
is alive from the forward pass on and remat costs memory instead of saving it (a stack of 8 tanh-MLP layers,
[4096, 512] activations: 136 MiB of temporaries without remat, 192 MiB with `jax.checkpoint`, 80 MiB with
`checkpoint` below; the small LLaMA with `model.remat=True`: 592 MB without the tie, 198 MB with it).

`checkpoint(fn, policy)` is `jax.checkpoint(fn, policy=policy)` under a `jax.custom_vjp` whose backward adds an
exact zero computed from the cotangent to every saved floating-point value before the recomputation reads it, so
the recomputation cannot start before the cotangent of its block exists. The zero is `(c > 0) * 0` for one
element c of the cotangent: exactly 0.0 for every c, NaN and ±inf included, and not folded away by XLA (the
compiler does not know a converted comparison is finite). Gradients are those of `jax.checkpoint` bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable):
  """`jax.checkpoint(fn, policy=policy)` (positional array/pytree arguments) whose backward recomputation is
  ordered after the arrival of the cotangent (module docstring)."""
  ckpt = jax.checkpoint(fn, policy=policy)

  @jax.custom_vjp
  def call(*args):
    return ckpt(*args)   # = fn(*args); the checkpoint (and its policy) shows in the jaxpr

  def fwd(*args):
    return jax.vjp(ckpt, *args)

  def bwd(vjp, ct):
    return after(ct, vjp)(ct)

  call.defvjp(fwd, bwd)
  return call


def after(ct, tree):
  """`tree` with each floating leaf plus an exact zero computed from the cotangent `ct`, so that whatever reads
  those leaves cannot be scheduled before `ct` exists (module docstring). Unchanged when `ct` has no non-empty
  floating leaf."""
  floats = [c for c in jax.tree.leaves(ct) if _is_float(c) and c.size]
  if not floats:
    return tree
  zero = (floats[0].reshape(-1)[0] > 0).astype(jnp.float32) * 0.0
  return jax.tree.map(lambda l: l + zero.astype(l.dtype) if _is_float(l) else l, tree)


def switch(index, branches, *operands):
  """`jax.lax.switch(index, branches, *operands)` whose backward recomputes the chosen branch only.

  Differentiating `lax.switch` keeps the residuals of every branch for the backward pass: JAX merges the
  branches' residual lists and each branch zero-fills the slots it does not produce, so branches of different
  shapes (the dropless capacities of a mixture of experts) keep the sum of all their intermediates alive. Here
  the forward keeps only the operands, and the backward runs one `lax.switch` whose chosen branch recomputes its
  forward and applies its VJP; nothing crosses from the forward but the operands, and no other branch's buffers
  exist. Operands and outputs that are not floating point (indices, masks) get zero (float0) cotangents.
  Gradients equal those of `lax.switch`; the branch's forward runs twice.
  """
  @jax.custom_vjp
  def call(index, *ops):
    return jax.lax.switch(index, branches, *ops)

  def fwd(index, *ops):
    return call(index, *ops), (index, ops)

  def bwd(res, ct):
    index, ops = res
    flat, tree = jax.tree.flatten(ops)
    is_f = [_is_float(x) for x in flat]
    cts = [c for c in jax.tree.leaves(ct) if c.dtype != jax.dtypes.float0]

    def grad_of(fn):
      def g(cts, floats):
        def f(*fl):
          it = iter(fl)
          return fn(*jax.tree.unflatten(tree, [next(it) if k else x for x, k in zip(flat, is_f)]))
        out, vjp = jax.vjp(f, *floats)
        it = iter(cts)
        full = [next(it) if _is_float(o) else np.zeros(o.shape, jax.dtypes.float0) for o in jax.tree.leaves(out)]
        return vjp(jax.tree.unflatten(jax.tree.structure(out), full))
      return g

    grads = iter(jax.lax.switch(index, [grad_of(fn) for fn in branches], cts,
                                [x for x, k in zip(flat, is_f) if k]))
    full = [next(grads) if k else np.zeros(x.shape, jax.dtypes.float0) for x, k in zip(flat, is_f)]
    return (np.zeros((), jax.dtypes.float0), *jax.tree.unflatten(tree, full))

  call.defvjp(fwd, bwd)
  return call(index, *operands)
