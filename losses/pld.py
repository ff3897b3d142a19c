"""PLD: Plackett-Luce Distillation.

Paper: Bassam, Zhu, Bian, "A Choice-Theoretic List-Wise Knowledge Distillation" (PLD),
arXiv:2506.12542 (NeurIPS 2025). No official code is public; the formula below is reconstructed
from the paper's abstract and summaries (assumptions listed below and in docs/losses.md):

  pi*   = (y, then the other classes by decreasing teacher logit)        teacher-optimal permutation
  a_k   = softmax(t / T)[pi*_k]                                          teacher confidence weights
  L     = sum_k a_k ( log sum_{l >= k} exp(s_{pi*_l} / T_s) - s_{pi*_k} / T_s )   per sample, mean over batch

Properties used as tests: with unit weights it is ListMLE on pi* (== `rax.listmle_loss`); the k = 1
term is a_1 * CE(s, y); translation invariance in s; the k = C term is 0.
Assumptions (documented): teacher temperature T defaults to 1 and the student logits are not
temperature-scaled (T_s = 1) unless `student_temperature` is given; teacher ties are broken by class
index (stable sort). The teacher side is under `stop_gradient`.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U


def pld_loss(student_logits, teacher_logits, labels, *, temperature: float = 1.0,
             student_temperature: float = 1.0, weighting: str = "teacher",
             where: Optional[jax.Array] = None):
  """Plackett-Luce distillation loss.

  Args:
    student_logits, teacher_logits: [B, C] float logits.
    labels: [B] integer ground-truth classes (placed first in the target permutation).
    temperature: teacher softmax temperature for the weights a_k.
    student_temperature: divides the student logits (assumption: 1 = unscaled).
    weighting: "teacher" (a_k from the teacher softmax) or "unit" (a_k = 1, ListMLE on pi*).
    where: optional [B] validity mask.

  Returns: scalar, mean over valid samples.
  """
  U.check_choice("weighting", weighting, ("teacher", "unit"))
  U.check_positive("temperature", temperature)
  U.check_positive("student_temperature", student_temperature)
  s, labels = U.check_labeled_matrix("student_logits", student_logits, "labels", labels)
  t = U.check_float_array("teacher_logits", teacher_logits)
  U.check_shape("teacher_logits", t, s.shape)
  where = U.mask_or_ones("where", where, s.shape[:1])
  dt = U.compute_dtype(s, t)
  s, t = s.astype(dt) / student_temperature, jax.lax.stop_gradient(t.astype(dt))
  onehot = labels[:, None] == jnp.arange(s.shape[1])[None, :]
  order = jnp.argsort(jnp.where(onehot, -jnp.inf, -t), axis=1, stable=True)
  s_perm = jnp.take_along_axis(s, order, axis=1)
  suffix_lse = jax.lax.cumlogsumexp(s_perm[:, ::-1], axis=1)[:, ::-1]
  terms = suffix_lse - s_perm
  if weighting == "teacher":
    alpha = jnp.take_along_axis(jax.nn.softmax(t / temperature, axis=1), order, axis=1)
    terms = alpha * terms
  return U.safe_mean(jnp.sum(terms, axis=1), where)
