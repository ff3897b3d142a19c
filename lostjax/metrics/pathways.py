"""Expert-pathway metrics of a mixture-of-experts model (grokking in LLM pretraining).

Paper: "Where to find Grokking in LLM Pretraining? Monitor Memorization-to-Generalization without Test"
(Ziyue Li, Chenrui Fan, Tianyi Zhou; arXiv 2506.21551). The paper tracks, over pretraining checkpoints and on
*training* samples, how the experts a sample is routed through evolve: after a sample is memorised its pathway
becomes shared with other samples (smaller pairwise distance) and smoother across layers (higher consistency).
The paper gives no code; the details below that it does not pin down are our choices (docs/moe_pathways.md).

Implemented:
  * pathway of a sample x: s(x) = concat(e^(1)(x), …, e^(L)(x)), e^(ℓ) = the top-k experts of layer ℓ, as a
    sequence of expert ids (`sample_pathways`). Choice: token-level routing becomes one set per sample by averaging
    the router probabilities over the sample's (unmasked) tokens, then taking the top-k, listed by ascending expert
    id; the weights w_{ℓ,e} are those averaged probabilities renormalised over the top-k.
  * pathway distance D(s_i, s_j) = Levenshtein edit distance over the expert-id sequences (unit insert, delete and
    substitute costs; a symbol is one expert id, so ids 12 and 13 differ by one substitution). The monitored value is
    the mean over all sample pairs i < j (`mean_pathway_distance`; `normalize=True` divides each distance by the
    longer length, an option the paper does not use).
  * pathway consistency of one sample: h_ℓ = Σ_{e ∈ top-k_ℓ} w_{ℓ,e} u_{ℓ,e},
    C(x) = 1/(L−1) Σ_{ℓ<L} cos(h_ℓ, h_{ℓ+1}) (`pathway_consistency`; complexity = 1 − C in the paper's earlier
    version). Choice (unverified in the paper): the expert embedding u_{ℓ,e} is the expert's router column
    W_r^(ℓ)[:, e] (`router_embeddings`), which lives in the d_model space shared by all layers, so that cosines
    across layers are defined. The cosine is scale-invariant per layer, so the renormalisation of w does not
    change C.

Everything is numpy (float64) on arrays that `Llama.route` returns; nothing here imports the training code.
"""

from __future__ import annotations

import numpy as np


def _check_probs(probs) -> np.ndarray:
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 4:
    raise ValueError(f"probs must be [layers, samples, seq, experts] (Llama.route(...).probs), got shape {probs.shape}")
  if not np.all(np.isfinite(probs)):
    raise ValueError("probs contains non-finite values")
  return probs


def sample_pathways(probs, top_k: int, mask=None) -> tuple[np.ndarray, np.ndarray]:
  """Per-sample pathways from per-token router probabilities.

  probs: [L, N, S, E] (`Llama.route(tokens).probs`); mask: optional [N, S] (1 = token counts).
  Returns (ids [N, L, k] int64, ascending within a layer; weights [N, L, k] float64, summing to 1 per layer).
  """
  probs = _check_probs(probs)
  n_layers, n, s, e = probs.shape
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= e:
    raise ValueError(f"top_k must be an int in [1, {e}] (the number of experts), got {top_k!r}")
  if mask is None:
    mask = np.ones((n, s))
  mask = np.asarray(mask, np.float64)
  if mask.shape != (n, s):
    raise ValueError(f"mask must have shape {(n, s)} (samples, seq), got {mask.shape}")
  count = mask.sum(-1)
  if np.any(count <= 0):
    raise ValueError(f"every sample needs at least one unmasked token; samples {np.nonzero(count <= 0)[0].tolist()} "
                     f"have none")
  mean = np.einsum("lnse,ns->nle", probs, mask) / count[:, None, None]         # [N, L, E]
  top = np.argsort(-mean, axis=-1, kind="stable")[..., :top_k]                  # ties -> smaller id
  ids = np.sort(top, axis=-1)
  w = np.take_along_axis(mean, ids, -1)
  w = w / np.maximum(w.sum(-1, keepdims=True), np.finfo(np.float64).tiny)
  return ids.astype(np.int64), w


def _as_sequence(x) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim != 1:
    raise ValueError(f"a pathway must be a 1-D sequence of expert ids, got shape {a.shape}")
  if a.size and not np.issubdtype(a.dtype, np.integer):
    raise ValueError(f"expert ids must be integers, got dtype {a.dtype}")
  return a.astype(np.int64)


def levenshtein(a, b) -> int:
  """Edit distance between two sequences of ints (unit insertion, deletion and substitution costs).

  One row of the dynamic programme per symbol of `a`; each row is vectorised: with t_j = min(prev_j + 1,
  prev_{j-1} + [a_i ≠ b_j]), insertions give row_j = min_{j' ≤ j} (t_{j'} + j − j') = cummin(t − j) + j.
  """
  a, b = _as_sequence(a), _as_sequence(b)
  return int(_levenshtein_rows(a[None], b[None])[0])


def _levenshtein_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Edit distances of P sequence pairs of equal lengths at once: a [P, m], b [P, n] -> [P]."""
  p, m = a.shape
  n = b.shape[1]
  j = np.arange(n + 1)
  row = np.broadcast_to(j, (p, n + 1)).astype(np.int64)
  for i in range(m):
    sub = row[:, :-1] + (a[:, i:i + 1] != b)
    t = np.concatenate([np.full((p, 1), i + 1), np.minimum(row[:, 1:] + 1, sub)], axis=1)
    row = np.minimum.accumulate(t - j, axis=1) + j
  return row[:, n]


def pathway_distances(pathways, *, normalize: bool = False) -> np.ndarray:
  """Pairwise edit distances [N, N] between the pathways of N samples.

  pathways: [N, L, k] or [N, M] expert ids (each sample's pathway is its row, flattened: L·k symbols).
  normalize: divide by the longer sequence length (all equal here), giving values in [0, 1].
  """
  ids = np.asarray(pathways)
  if ids.ndim < 2:
    raise ValueError(f"pathways must be [samples, layers, top_k] or [samples, length], got shape {ids.shape}")
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"expert ids must be integers, got dtype {ids.dtype}")
  n = ids.shape[0]
  flat = ids.reshape(n, -1).astype(np.int64)
  out = np.zeros((n, n), np.float64)
  if n < 2:
    return out
  ii, jj = np.triu_indices(n, 1)
  d = _levenshtein_rows(flat[ii], flat[jj]).astype(np.float64)
  if normalize and flat.shape[1]:
    d = d / flat.shape[1]
  out[ii, jj] = d
  out[jj, ii] = d
  return out


def mean_pathway_distance(pathways, *, normalize: bool = False) -> float:
  """Mean edit distance over all sample pairs i < j (the paper's monitored value); needs at least 2 samples."""
  ids = np.asarray(pathways)
  if ids.ndim < 2 or ids.shape[0] < 2:
    raise ValueError(f"the mean pathway distance needs at least 2 samples, got pathways of shape {ids.shape}")
  d = pathway_distances(ids, normalize=normalize)
  return float(d[np.triu_indices(ids.shape[0], 1)].mean())


def router_embeddings(model) -> np.ndarray:
  """Expert embeddings u_{ℓ,e} = the router columns of every MoE layer: [L, E, d_model] (float64)."""
  rows = []
  for block in model.layers:
    router = getattr(block.mlp, "router", None)
    if router is None:
      raise ValueError("router_embeddings needs a mixture-of-experts model (model.moe_experts > 0)")
    rows.append(np.asarray(router.kernel[...], np.float64).T)
  return np.stack(rows)


def pathway_consistency(ids, weights, embeddings, *, eps: float = 1e-12) -> np.ndarray:
  """Per-sample consistency [N]: mean over consecutive layers of cos(h_ℓ, h_{ℓ+1}), h_ℓ = Σ_e w_{ℓ,e} u_{ℓ,e}.

  ids, weights: [N, L, k] (from `sample_pathways`); embeddings: [L, E, D] (e.g. `router_embeddings(model)`).
  A zero h_ℓ (all-zero embeddings) gives cosine 0. Needs L ≥ 2.
  """
  ids = np.asarray(ids)
  w = np.asarray(weights, np.float64)
  u = np.asarray(embeddings, np.float64)
  if ids.ndim != 3 or w.shape != ids.shape:
    raise ValueError(f"ids and weights must both be [samples, layers, top_k], got {ids.shape} and {w.shape}")
  if u.ndim != 3 or u.shape[0] != ids.shape[1]:
    raise ValueError(f"embeddings must be [layers={ids.shape[1]}, experts, dim], got shape {u.shape}")
  if ids.shape[1] < 2:
    raise ValueError(f"pathway consistency compares consecutive layers: needs at least 2 layers, got {ids.shape[1]}")
  if ids.size and (ids.min() < 0 or ids.max() >= u.shape[1]):
    raise ValueError(f"expert ids must lie in [0, {u.shape[1]}), got range [{ids.min()}, {ids.max()}]")
  layer = np.arange(ids.shape[1])[None, :, None]
  h = np.einsum("nlk,nlkd->nld", w, u[layer, ids])                             # [N, L, D]
  a, b = h[:, :-1], h[:, 1:]
  norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
  cos = np.where(norm > eps, np.sum(a * b, -1) / np.maximum(norm, eps), 0.0)
  return cos.mean(-1)
