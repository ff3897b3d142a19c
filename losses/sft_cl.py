"""SFT vs contrastive learning for LLM reranking: weight / direction decomposition.

Paper: Dai, Zhang, Li, Zhang, Long, Xie, M. Zhang, W. Li, M. Zhang, SFT or contrastive learning
for (M)LLM reranking (weight/direction analysis, "Unified Reranking Loss"), arXiv:2510.14824 (2025).
Code is not available; the decomposition below is derived from the paper's definitions as quoted
in summaries of the paper (assumptions listed below and in docs/losses.md).

Per example: 1 positive (index 0) and n negatives; yes/no logits z_y, z_n at the answer position.
  SFT:  sigma_i = sigmoid(z_y,i - z_n,i);  L_SFT = -log sigma_+ - sum_{i neg} log(1 - sigma_i)
  CL:   s_i = z_y,i;  L_CL = -log softmax(s / tau)_+
Gradient w.r.t. the scores = weight W x direction (d score / d h):
  SFT: W_+ = 1 - sigma_+, W_i = sigma_i,  score = z_y - z_n
  CL:  W_+ = (1 - p_+)/tau, W_i = p_i/tau (p = softmax(s/tau)),  score = z_y
Unified reranking loss (weight from one objective, direction from the other):
  L_URL = sum_i c_i stop_gradient(W_i) score_i,  c = -1 for the positive, +1 for negatives
so grad L_URL[W_SFT, z_y - z_n] == grad L_SFT and grad L_URL[W_CL, z_y] == grad L_CL exactly (loss
values differ). Assumptions: CL score = the yes-logit, tau = 1, L_SFT summed over the documents of an
example; all losses are averaged over examples.
"""
import jax
import jax.numpy as jnp

from losses import _utils as U


def _logits(z_yes, z_no=None):
  zy = U.check_float_array("z_yes", z_yes)
  if zy.ndim < 1 or zy.shape[-1] < 1:
    raise ValueError(f"z_yes must be [..., 1 + n] (positive first), got shape {zy.shape}")
  dt = U.compute_dtype(zy)
  if z_no is None:
    return zy.astype(dt), None
  U.check_shape("z_no", z_no, zy.shape)
  return zy.astype(dt), jnp.asarray(z_no).astype(dt)


def _sign(shape, dt):
  return jnp.where(jnp.arange(shape[-1]) == 0, -1., 1.).astype(dt)


def sft_loss(z_yes, z_no):
  """Pointwise yes/no cross-entropy, summed over the 1 + n documents, mean over examples."""
  zy, zn = _logits(z_yes, z_no)
  d = zy - zn
  per = jnp.where(jnp.arange(d.shape[-1]) == 0, jax.nn.softplus(-d), jax.nn.softplus(d))
  return jnp.mean(jnp.sum(per, -1))


def cl_loss(z_yes, *, temperature: float = 1.0):
  """InfoNCE over the group with the yes-logit as score; positive at index 0; mean over examples."""
  U.check_positive("temperature", temperature)
  zy, _ = _logits(z_yes)
  return -jnp.mean(jax.nn.log_softmax(zy / temperature, -1)[..., 0])


def sft_cl_decomposition(z_yes, z_no, *, temperature: float = 1.0):
  """Weights and scores of both objectives.

  Returns a dict of [..., 1 + n] arrays: `sft_weight`, `sft_score` (= z_y - z_n), `cl_weight`,
  `cl_score` (= z_y) and `sign` (-1 positive, +1 negatives). Weights are `stop_gradient`-ed.
  """
  U.check_positive("temperature", temperature)
  zy, zn = _logits(z_yes, z_no)
  d = zy - zn
  sig = jax.nn.sigmoid(d)
  pos = jnp.arange(d.shape[-1]) == 0
  w_sft = jnp.where(pos, 1 - sig, sig)
  p = jax.nn.softmax(zy / temperature, -1)
  w_cl = jnp.where(pos, 1 - p, p) / temperature
  sg = jax.lax.stop_gradient
  return dict(sft_weight=sg(w_sft), sft_score=d, cl_weight=sg(w_cl), cl_score=zy, sign=_sign(d.shape, d.dtype))


def unified_reranking_loss(weight, score):
  """L_URL = mean over examples of sum_i c_i stop_gradient(W_i) score_i (c = -1 positive, +1 negatives)."""
  w = U.check_float_array("weight", weight)
  s = U.check_float_array("score", score)
  U.check_shape("score", s, w.shape)
  if w.ndim < 1:
    raise ValueError(f"weight must be [..., 1 + n], got shape {w.shape}")
  dt = U.compute_dtype(w, s)
  c = _sign(w.shape, dt)
  return jnp.mean(jnp.sum(c * jax.lax.stop_gradient(w.astype(dt)) * s.astype(dt), -1))
