"""AnyLoss: classification metrics (accuracy, F-beta, G-mean, balanced accuracy) as losses.

Paper: Han, Moniz, Chawla, "AnyLoss: Transforming Classification Metrics into Loss Functions",
arXiv:2405.14745 (KDD 2024); authors' code doheonhan/anyloss_extension (notes in docs/losses.md).

  y_hat = A(p) = 1 / (1 + exp(-L (p - 1/2)))       approximation ("amplifying") function, L = 73
  TP = sum y y_hat,  FN = y1 - TP,  FP = sum y_hat - TP,  TN = N - y1 - sum y_hat + TP
  accuracy (TP + TN)/N;  F_beta (1 + b^2) TP / (b^2 y1 + sum y_hat);
  G-mean sqrt(TP/y1 * TN/y0);  balanced accuracy (TP/y1 + TN/y0) / 2;   loss = 1 - metric

Binary classification, inputs are probabilities p in [0, 1] (sigmoid outputs). Defaults: L = 73,
beta = 1. Deviations from the authors' code: accuracy is normalised by the batch size N (the original
notebook divides by the training-set size); denominators are guarded: a ratio with a zero
denominator (one-class batch) is 0 instead of NaN, and `eps` (default 0; the extension code uses
1e-5) is added to every denominator; G-mean uses sqrt(x + sqrt_eps) (sqrt_eps = 1e-12) so its
gradient stays finite at 0, and `gmean_sqrt=False` gives the extension's surrogate without sqrt.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from losses import _utils as U

METRICS = ("accuracy", "f_beta", "gmean", "balanced_accuracy")


def _div(num, den, eps):
  den = den + eps
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.), 0.)


def anyloss(probs, labels, *, metric: str = "accuracy", beta: float = 1.0,
            amplifier: float = 73.0, eps: float = 0.0, gmean_sqrt: bool = True,
            sqrt_eps: float = 1e-12, where: Optional[jax.Array] = None):
  """1 - soft metric over the batch (see module docstring).

  Args:
    probs: [N] predicted probabilities of the positive class.
    labels: [N] binary labels in {0, 1}.
    metric: "accuracy", "f_beta", "gmean" or "balanced_accuracy".
    beta: F-beta weight. amplifier: L of the approximation function.
    eps: added to denominators. where: optional [N] validity mask.
  """
  U.check_choice("metric", metric, METRICS)
  U.check_positive("amplifier", amplifier)
  U.check_positive("beta", beta)
  p = U.check_float_array("probs", probs)
  U.check_ndim("probs", p, 1)
  U.check_shape("labels", labels, p.shape)
  dt = U.compute_dtype(p)
  w = U.mask_or_ones("where", where, p.shape).astype(dt)
  y = jnp.asarray(labels).astype(dt) * w
  yh = jax.nn.sigmoid(amplifier * (p.astype(dt) - 0.5)) * w
  n, y1 = jnp.sum(w), jnp.sum(y)
  y0, syh = n - y1, jnp.sum(yh)
  tp = jnp.sum(y * yh)
  tn = n - y1 - syh + tp
  if metric == "accuracy":
    m = _div(tp + tn, n, eps)
  elif metric == "f_beta":
    b2 = beta ** 2
    m = _div((1 + b2) * tp, b2 * y1 + syh, eps)
  elif metric == "gmean":
    prod = _div(tp, y1, eps) * _div(tn, y0, eps)
    m = jnp.sqrt(prod + sqrt_eps) if gmean_sqrt else prod
  else:
    m = 0.5 * (_div(tp, y1, eps) + _div(tn, y0, eps))
  return 1.0 - m
