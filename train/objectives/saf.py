"""SAF trajectory loss with a per-example store, and MESA (its EMA-teacher variant), for language models.

Paper: Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022, arXiv 2205.14083.

SAF (paper Eq. 5-6; reference `SAF_train.py`):
    L = CE(f_θ(x), y) + λ·τ²·KL( softmax(y^{(e−Ẽ)}/τ) ‖ softmax(f_θ(x)/τ) ),
where y^{(e−Ẽ)} are the outputs the network gave for the same example Ẽ epochs earlier (constants: the gradient
flows only through the current output). Defaults λ=0.3, τ=5, Ẽ=3 (the script's `--minus_epoch` default; the
README also uses 2).
MESA (paper §4, Eq. 7; reference `MESA_train.py`): the same KL against an exponential moving average of the
weights, v_t = β·v_{t−1} + (1−β)·θ_t (β=0.9998, updated after every optimizer step, started from the initial
weights), evaluated on the same batch: L = CE + λ·τ²·KL(softmax(f_v(x)/τ) ‖ softmax(f_θ(x)/τ)), λ=0.8, τ=5.
No per-example memory; one extra forward pass per step. It is the practical variant for one-pass pretraining.

Language-model adaptation (deliberate deviations from the image-classification reference):
* The KL is per target position (next-token distribution over the vocabulary), averaged over the non-masked
  tokens of the batch; a sequence without a stored target contributes 0 (the paper's λ/|B| Σ_i form).
* What the SAF store keeps per example: for each position the top-k log-probabilities at temperature τ of the
  past output, log softmax(z/τ)_j for the k largest logits j, their token ids, and the log of the remaining
  (tail) probability mass. The target distribution is the coarsening of the past distribution onto the
  partition {j_1, ..., j_k, rest}; the KL is computed on that partition,
      KL_k = Σ_{j∈top-k} p_j (log p_j − log q_j) + p_rest (log p_rest − log q_rest),
  with q the current softmax(z/τ) and q_rest its mass outside the stored ids. This is a lower bound of the full KL
  (data-processing inequality) and equals it when k = vocabulary size. Storing full logits (the reference keeps
  all 1000 classes) would cost N·Ẽ·T·V floats, which is impossible for LMs.
* Memory: N examples × Ẽ slots × T positions × ((k+1)·bytes(store_dtype) + k·bytes(id)) + 4 bytes (visit
  counter); ids are uint16 when the vocabulary has ≤ 65536 tokens, else int32. N is rounded up to a multiple of
  1024 rows so that the shape does not depend on the device count. Example: T=256, k=8, Ẽ=3, bf16,
  uint16 → 3·256·(18+16) + 4 = 26,116 B ≈ 25.5 KiB per sequence (`store_bytes_per_example`).
* The store is keyed by the GLOBAL example id (the data pipeline's index of the packed sequence; with the
  streaming pipeline its stream position j·S + s in aligned epochs, `data.stream_aligned_epochs`), one array
  [N, Ẽ, T, ...] in the train state, sharded over the batch mesh axes (row i on the device that owns it; XLA
  partitions the gather/scatter by masking and an all-reduce of the batch-sized result, never an all-gather of the
  store). It is checkpointed with the train state, so it is correct under data parallelism, resume and a change of
  the device count. The reference keeps one host bank per rank and reads zeros (a uniform target) whenever the
  distributed sampler moved an example to another rank; that is not reproduced.
* "Ẽ epochs ago" is counted in visits of the example: the store keeps the last Ẽ outputs of each example in a ring
  (slot = visit count mod Ẽ; the slot is read, then overwritten with the current output), so the target is the
  output from Ẽ visits earlier. With the pipeline's one-visit-per-epoch permutation this is Ẽ epochs earlier;
  examples skipped at the end of an epoch simply wait for their next visit. The reference writes slot
  epoch mod (Ẽ+1) and needs Ẽ+1 slots; reading before writing needs only Ẽ.
* Schedules are in optimizer steps (`start_step`) instead of epochs. MESA's EMA is updated from step 0 (as timm's
  ModelEmaV2) and held in float32; its KL starts at `start_step`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from losses.dhkd import tempered_kl

STORE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _check_logits(name, x, ndim=3):
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dims [B, T, V], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")


def _check_tau(tau):
  if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau > 0 and math.isfinite(tau)):
    raise ValueError(f"temperature tau={tau!r} must be a positive finite number")


def kl_full(teacher_logits, student_logits, tau: float):
  """Per-position KL(softmax(teacher/τ) ‖ softmax(student/τ)) [B, T] over the full vocabulary (float32).

  The teacher is a constant (stop_gradient); the gradient flows through the student logits only. The KL itself is
  `losses.dhkd.tempered_kl` (shared with the Hinton KD loss).
  """
  _check_logits("teacher_logits", teacher_logits)
  _check_logits("student_logits", student_logits)
  if teacher_logits.shape != student_logits.shape:
    raise ValueError(f"teacher logits {teacher_logits.shape} and student logits {student_logits.shape} differ")
  _check_tau(tau)
  return tempered_kl(teacher_logits.astype(jnp.float32), student_logits.astype(jnp.float32), tau)


def topk_targets(logits, tau: float, k: int):
  """What the SAF store keeps per position: (log-probs [B, T, k+1], ids [B, T, k]) of softmax(logits/τ).

  log-probs[..., :k] are the k largest (normalised over the full vocabulary), log-probs[..., k] is the log of the
  remaining mass (−inf-free: it is floored at the float32 minimum when k = V).
  """
  _check_logits("logits", logits)
  _check_tau(tau)
  v = logits.shape[-1]
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= v:
    raise ValueError(f"saf.topk={k!r} must be an int in [1, vocab_size={v}]")
  z = jax.lax.stop_gradient(logits).astype(jnp.float32) / tau
  lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
  top, idx = jax.lax.top_k(z, k)
  rest = _log_rest(z, idx)
  logp = jnp.concatenate([top, rest[..., None]], axis=-1) - lse
  return logp, idx


def _log_rest(z, idx):
  """log Σ_{j ∉ idx} exp(z_j) [B, T], floored at a finite very negative value when nothing is left."""
  floor = jnp.finfo(jnp.float32).min / 4
  masked = jnp.put_along_axis(z, idx, -jnp.inf, axis=-1, inplace=False)
  m = jnp.max(masked, axis=-1)
  has_rest = jnp.isfinite(m)
  m_safe = jnp.where(has_rest, m, 0.0)
  s = jnp.sum(jnp.exp(masked - m_safe[..., None]), axis=-1)
  return jnp.where(has_rest, m_safe + jnp.log(jnp.where(has_rest, s, 1.0)), floor)


def kl_topk(target_logp, target_ids, student_logits, tau: float):
  """Per-position KL [B, T] of a stored top-k target against the current softmax(student/τ) (float32).

  KL = Σ_j p_j (log p_j − log q_j) + p_rest (log p_rest − log q_rest), see the module docstring.
  """
  _check_logits("student_logits", student_logits)
  _check_tau(tau)
  b, t, v = student_logits.shape
  k = target_ids.shape[-1]
  if target_ids.shape != (b, t, k) or target_logp.shape != (b, t, k + 1):
    raise ValueError(f"stored target shapes logp {target_logp.shape} / ids {target_ids.shape} do not match "
                     f"logits {student_logits.shape} (expected [B, T, k+1] and [B, T, k])")
  z = student_logits.astype(jnp.float32) / tau
  lse = jax.nn.logsumexp(z, axis=-1)
  ids = target_ids.astype(jnp.int32)
  lq_top = jnp.take_along_axis(z, ids, axis=-1) - lse[..., None]
  lq_rest = _log_rest(z, ids) - lse
  lq = jnp.concatenate([lq_top, lq_rest[..., None]], axis=-1)
  lp = jax.lax.stop_gradient(target_logp).astype(jnp.float32)
  p = jnp.exp(lp)
  # A (numerically) empty part contributes nothing: 0·log 0 = 0, and no gradient flows into its log q.
  return jnp.sum(jnp.where(p > 0, p * (lp - lq), 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# The per-example store (variant 'saf').


def id_dtype(vocab_size: int):
  return jnp.uint16 if vocab_size <= 1 << 16 else jnp.int32


def store_bytes_per_example(*, seq_len: int, topk: int, epochs_back: int, vocab_size: int,
                            store_dtype: str = "bfloat16") -> int:
  """Bytes of the SAF store per training example (values, token ids and the visit counter)."""
  if store_dtype not in STORE_DTYPES:
    raise ValueError(f"saf.store_dtype={store_dtype!r}; expected one of {sorted(STORE_DTYPES)}")
  vb = np.dtype(STORE_DTYPES[store_dtype]).itemsize
  ib = np.dtype(id_dtype(vocab_size)).itemsize
  return epochs_back * seq_len * ((topk + 1) * vb + topk * ib) + 4


# The store has N rounded up to a multiple of this many rows, whatever the mesh: its shape must not depend on the
# device count, or a checkpoint could not be restored on another mesh.
ROW_MULTIPLE = 1024


def _store_axes(rows: int):
  """The batch mesh axes of the current mesh context whose total size divides `rows` (() without a mesh)."""
  from lostjax import sharding as sharding_lib
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = sharding_lib.batch_axes(mesh)
  while axes and rows % int(np.prod([mesh.shape[a] for a in axes])):
    axes = axes[:-1]
  return axes


def store_init(*, num_examples: int, epochs_back: int, seq_len: int, topk: int, vocab_size: int,
               store_dtype: str = "bfloat16") -> dict:
  """Empty store {'logp': [N', Ẽ, T, k+1], 'ids': [N', Ẽ, T, k], 'count': int32[N'], 'size': int32 N}.

  N' = N rounded up to a multiple of ROW_MULTIPLE (the padding rows are never addressed), independent of the mesh.
  Inside a `jax.set_mesh` context the leading axis is sharded over the batch mesh axes (those whose size divides
  N'; replicated if none does). Without a mesh the arrays are plain.
  """
  for name, v in (("num_train_examples", num_examples), ("saf.epochs_back", epochs_back), ("seq_len", seq_len),
                  ("saf.topk", topk), ("vocab_size", vocab_size)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name}={v!r} must be a positive int" + (
          " (SAF needs a finite training set with global example ids; synthetic data has none — use "
          "objectives.mesa.enabled=True instead)" if name == "num_train_examples" else ""))
  if topk > vocab_size:
    raise ValueError(f"saf.topk={topk} exceeds vocab_size={vocab_size}")
  if store_dtype not in STORE_DTYPES:
    raise ValueError(f"saf.store_dtype={store_dtype!r}; expected one of {sorted(STORE_DTYPES)}")
  n = -(-int(num_examples) // ROW_MULTIPLE) * ROW_MULTIPLE
  axes = _store_axes(n)
  shapes = {"logp": ((n, epochs_back, seq_len, topk + 1), STORE_DTYPES[store_dtype]),
            "ids": ((n, epochs_back, seq_len, topk), id_dtype(vocab_size)),
            "count": ((n,), jnp.int32)}

  def make():
    out = {k: jnp.zeros(s, d) for k, (s, d) in shapes.items()}
    out["size"] = jnp.asarray(num_examples, jnp.int32)  # N: ids >= N are out of range
    return out

  if not axes:
    return make()
  lead = axes[0] if len(axes) == 1 else axes
  return jax.jit(make, out_shardings={**{k: jax.P(lead) for k in shapes}, "size": jax.P()})()


def _safe_ids(store, ids):
  """(row index, in-range mask); ids outside [0, N) address row N' (dropped by scatters, filled by gathers)."""
  ids = ids.astype(jnp.int32)
  ok = (ids >= 0) & (ids < store["size"])
  return jnp.where(ok, ids, store["count"].shape[0]), ok


def store_read(store, ids):
  """(logp [B, T, k+1] float32, ids int32 [B, T, k], has_target bool[B]) for global example ids [B].

  has_target is True when the example was visited at least Ẽ times before (the slot holds the output from Ẽ visits
  ago). Ids outside [0, N) have no target.
  """
  if ids.ndim != 1:
    raise ValueError(f"example ids must be 1-D [B], got shape {ids.shape}")
  e = store["logp"].shape[1]
  rows, ok = _safe_ids(store, ids)
  count = jnp.take(store["count"], rows, mode="fill", fill_value=0)
  slot = count % e
  logp = store["logp"].at[rows, slot].get(mode="fill", fill_value=0)
  tok = store["ids"].at[rows, slot].get(mode="fill", fill_value=0)
  return logp.astype(jnp.float32), tok.astype(jnp.int32), ok & (count >= e)


def store_write(store, ids, logp, tok):
  """Writes this visit's targets into slot (visit count mod Ẽ) of each example and increments its counter."""
  e = store["logp"].shape[1]
  rows, _ = _safe_ids(store, ids)
  count = jnp.take(store["count"], rows, mode="fill", fill_value=0)
  slot = count % e
  return {"logp": store["logp"].at[rows, slot].set(logp.astype(store["logp"].dtype), mode="drop"),
          "ids": store["ids"].at[rows, slot].set(tok.astype(store["ids"].dtype), mode="drop"),
          "count": store["count"].at[rows].add(1, mode="drop"), "size": store["size"]}


# ---------------------------------------------------------------------------------------------------------------
# The EMA teacher (variant 'mesa').


def ema_init(params):
  """A float32 copy of the parameters (same shardings): the teacher v_0 = θ_0."""
  return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.promote_types(x.dtype, jnp.float32), copy=True), params)


def ema_update(ema, params, decay: float):
  """v ← β·v + (1−β)·θ (in float32)."""
  if not (isinstance(decay, float) and 0.0 <= decay <= 1.0):
    raise ValueError(f"mesa.decay={decay!r} must be a float in [0, 1]")
  return jax.tree.map(lambda v, p: decay * v + (1.0 - decay) * p.astype(v.dtype), ema, params)
