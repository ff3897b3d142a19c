"""The one registry of implementations of the LOST sparse branch, and its one resolver.

LOST: Low-rank and Sparse Pre-training for Large Language Models (Li et al., arXiv 2508.02668). A LOST
layer is ``y = gamma * sigma(x A) B + (1 - gamma) * x[..., I] W_s``; the channel-sparse term
``x[..., I] W_s`` (forward: a column gather and a thin GEMM; backward: ``dW_s = x[..., I]^T dy`` and a
scatter of ``dy W_s^T`` into the I columns of dx) can be computed in several ways, listed here once:

  name                 how (see docs/sparse_paths.md)                                         runs on
  gather_xla           jnp.take + dot; dx by an XLA scatter-add                               cpu gpu tpu
  gather_onehot_grad   as gather_xla, but dx by a one-hot GEMM instead of a scatter           cpu gpu tpu
  fused_concat         both branches as ONE output GEMM over [sigma(xA), x[..., I]] (take)    cpu gpu tpu
  fused_onehot         as fused_concat with the selection as one-hot columns of x [A, P]      cpu gpu tpu
  pallas_gpu           Pallas/Triton fused gather+GEMM forward; dW, dx in XLA                 gpu (cpu: interpret)
  pallas_tpu           Pallas/Mosaic TPU kernels: forward, dW_s and the dx scatter            tpu (cpu: interpret)

Every level takes these names and calls :func:`resolve_sparse_impl`: the layer (``Lost``, whose resolved name
the grouped projections use), ``kernels.lost_matmul``/``lost_group_matmul`` and ``kernels.gather_matmul``. The
model config (``LlamaConfig.sparse_impl``) checks and stores the name with :func:`canonical_name`, the
resolver's first step, without querying the backend (configs are built before ``jax.distributed.initialize``).
``'auto'`` is resolved only here, from :data:`AUTO`, one entry
per backend chosen by the whole-train-step measurements in BENCHMARKS.md (a backend not listed gets
``gather_xla``). Names used before this registry existed are mapped by :data:`ALIASES`, so configs of old
runs (``model.sparse_impl`` in their config.json) build the same model.

Where only the sparse term is computed (``gather_matmul``), a fused entry runs its sparse part on its own:
``fused_concat`` as ``gather_xla`` and ``fused_onehot`` as ``gather_onehot_grad``.
"""
from __future__ import annotations

import dataclasses

import jax

__all__ = ["SparseImpl", "IMPLS", "ALIASES", "AUTO", "NAMES", "resolve_sparse_impl", "canonical_name"]


@dataclasses.dataclass(frozen=True)
class SparseImpl:
  """One way of computing the LOST sparse branch.

  Attributes:
    name: the registry name.
    backends: backends it is meant for (the XLA entries run anywhere; CPU runs the Pallas entries in
      interpret mode, for tests).
    gather: the sparse term on its own: 'xla', 'pallas_gpu' or 'pallas_tpu'.
    dx: how the XLA paths build the input gradient: 'scatter' or 'onehot' (a one-hot GEMM).
    fused: None (the two branches are separate GEMMs) or the one-GEMM mode of ``lost_matmul``:
      'concat' (gather) or 'onehot' (selection inside the down-projection GEMM). Only fused entries share
      work across q/k/v and gate/up (``lost_group_matmul``).
    doc: one line for error messages.
  """
  name: str
  backends: tuple[str, ...]
  gather: str
  dx: str
  fused: str | None
  doc: str

  @property
  def is_pallas(self) -> bool:
    return self.gather != "xla"


_ALL = ("cpu", "gpu", "tpu")
IMPLS: dict[str, SparseImpl] = {e.name: e for e in (
    SparseImpl("gather_xla", _ALL, "xla", "scatter", None, "jnp.take + dot, dx by scatter-add"),
    SparseImpl("gather_onehot_grad", _ALL, "xla", "onehot", None, "jnp.take + dot, dx by a one-hot GEMM"),
    SparseImpl("fused_concat", _ALL, "xla", "scatter", "concat", "both branches as one GEMM (gather)"),
    SparseImpl("fused_onehot", _ALL, "xla", "onehot", "onehot", "both branches as one GEMM (one-hot selection)"),
    SparseImpl("pallas_gpu", ("gpu",), "pallas_gpu", "scatter", None, "Pallas Triton gather+GEMM forward"),
    SparseImpl("pallas_tpu", ("tpu",), "pallas_tpu", "scatter", None, "Pallas Mosaic TPU forward, dW and dx"),
)}

# 'auto' per backend, from the whole-train-step measurements in BENCHMARKS.md. TPU: the XLA gather until a
# TPU run of bench/sparse_tpu.py shows the Pallas TPU kernel faster in the train step.
AUTO: dict[str, str] = {"cpu": "fused_concat", "gpu": "gather_xla", "tpu": "gather_xla"}
AUTO_DEFAULT = "gather_xla"

# Names accepted before the registry (model.sparse_impl of old runs; lost_matmul/gather_matmul arguments).
ALIASES: dict[str, str] = {
    "xla": "gather_xla",
    "xla_onehot": "gather_onehot_grad",
    "pallas": "pallas_gpu",
    "fused": "fused_concat",
    "concat": "fused_concat",
    "onehot": "fused_onehot",
    "separate": "gather_xla",
}

NAMES = ("auto",) + tuple(IMPLS)


def canonical_name(name: str) -> str:
  """Registry name for ``name`` (an alias is mapped; 'auto' stays 'auto'); ValueError naming a bad value."""
  if not isinstance(name, str):
    raise ValueError(f"sparse_impl must be a string, got {name!r}")
  name = ALIASES.get(name, name)
  if name != "auto" and name not in IMPLS:
    raise ValueError(f"unknown sparse_impl {name!r}; expected one of {NAMES} "
                     f"(or a legacy alias: {sorted(ALIASES)})")
  return name


def resolve_sparse_impl(name: str = "auto", backend: str | None = None) -> SparseImpl:
  """The registry entry that ``name`` selects on ``backend`` (default: JAX's default backend).

  'auto' is looked up in :data:`AUTO`; legacy names in :data:`ALIASES`. The XLA entries run on every backend;
  a Pallas entry on another accelerator than its own raises a ValueError (on CPU the Pallas entries run in
  interpret mode, for tests).
  """
  name = canonical_name(name)
  if backend is None:
    backend = jax.default_backend()
  if name == "auto":
    name = AUTO.get(backend, AUTO_DEFAULT)
  impl = IMPLS[name]
  if impl.is_pallas and backend not in impl.backends + ("cpu",):
    raise ValueError(f"sparse_impl {name!r} ({impl.doc}) runs on {impl.backends}, not on backend {backend!r}; "
                     f"use 'auto' or one of {[n for n, e in IMPLS.items() if not e.is_pallas]}")
  return impl
