"""lostjax.sharding.init_module(..., sharded=True): the SPMD-partitioned init (for models larger than one device)
gives the same parameter values as the unsharded init, with each leaf placed by its logical axes.

Fast: a tiny dense + LOST LLaMA on the 8 fake CPU devices of tests/conftest.py, mesh data=2 x fsdp=2 x tensor=2.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lostjax import sharding
from lostjax.models import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=64, d_model=16, d_ff=32, n_heads=2, n_layers=1, max_seq_len=16, attn_kind="lost",
                  mlp_kind="dense", attn_rank=4, sparsity=0.25, sparse_impl="xla")

# leaf path -> PartitionSpec expected from the logical axes and DEFAULT_RULES (embed->fsdp, heads/mlp/vocab->tensor);
# a weight without an embed dimension is split over fsdp on its largest dimension too (sharding.param_spec)
EXPECTED = {
    ("embed", "embedding"): P("tensor", "fsdp"),                   # (vocab, embed)
    ("layers", 0, "attn_norm", "scale"): P("fsdp"),               # (embed,)
    ("layers", 0, "attn", "q", "a"): P("fsdp", None),             # LOST (embed, rank)
    ("layers", 0, "attn", "q", "b"): P(None, ("tensor", "fsdp")),         # (rank, heads)
    ("layers", 0, "attn", "q", "w_sparse"): P(None, ("tensor", "fsdp")),  # (sparse, heads)
    ("layers", 0, "attn", "o", "a"): P(("tensor", "fsdp"), None),         # (heads, rank)
    ("layers", 0, "attn", "o", "b"): P(None, "fsdp"),             # (rank, embed)
    ("layers", 0, "mlp", "gate", "kernel"): P("fsdp", "tensor"),  # dense (embed, mlp)
    ("layers", 0, "mlp", "down", "kernel"): P("tensor", "fsdp"),  # (mlp, embed)
    ("lm_head", "kernel"): P("fsdp", "tensor"),                   # (embed, vocab)
}


def _leaves(state):
  return {tuple(path): leaf for path, leaf in nnx.to_flat_state(state)}


def _norm(spec):
  """PartitionSpec without trailing Nones (P('fsdp', None) == P('fsdp') as a placement)."""
  parts = list(spec)
  while parts and parts[-1] is None:
    parts.pop()
  return tuple(parts)


def test_sharded_init_equals_unsharded_with_expected_shardings():
  build = lambda: Llama(CFG, rngs=nnx.Rngs(3))
  _, ref_params, ref_rest = sharding.init_module(build)                 # one device, no mesh
  mesh = sharding.make_mesh(2, 2, 2)
  assert [mesh.shape[a] for a in ("data", "fsdp", "tensor")] == [2, 2, 2]
  _, params, rest = sharding.init_module(build, mesh, sharded=True)
  got, ref = _leaves(params), _leaves(ref_params)
  assert set(got) == set(ref) and set(EXPECTED) <= set(got)
  for path, leaf in got.items():
    value = leaf[...]
    np.testing.assert_allclose(np.asarray(value), np.asarray(ref[path][...]), rtol=1e-5, atol=1e-7,
                               err_msg=str(path))
    assert value.sharding.mesh.shape == mesh.shape, path
  for path, spec in EXPECTED.items():
    value = got[path][...]
    assert _norm(value.sharding.spec) == _norm(spec), (path, value.sharding.spec)
    # really split: each device holds 1/2 of a dimension per mesh axis splitting it
    shard = value.addressable_shards[0].data.shape
    ways = lambda ax: 1 if ax is None else (2 if isinstance(ax, str) else 2 ** len(ax))
    want = tuple(d // ways(ax) for d, ax in zip(value.shape, tuple(spec) + (None,) * 2))
    assert shard == want, (path, shard, want)
  # the LOST channel indices (non-trainable state) are identical and replicated
  key = ("layers", 0, "attn", "q", "idx")
  idx, ref_idx = _leaves(rest)[key][...], _leaves(ref_rest)[key][...]
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
  assert idx.shape == (4,) and _norm(idx.sharding.spec) == ()
