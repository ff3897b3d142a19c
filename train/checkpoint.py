"""Orbax checkpoints of the train state, the model's static variables and the data-iterator position.

Layout: <workdir>/checkpoints/<step>/{state, data}. `state` holds the donated train state (params, optimizer,
objective state, step) under 'train' and the non-trainable model variables (LOST channel indices) under 'static';
`data` is the JSON position
of the training iterator, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import math

import jax
import orbax.checkpoint as ocp
from etils import epath

CKPT_DIR = "checkpoints"


class CheckpointError(ValueError):
  pass


def checkpoint_dir(workdir):
  """<workdir>/checkpoints as an epath.Path: absolute for local paths, unchanged for remote ones (gs://...)."""
  path = epath.Path(workdir)
  if "://" not in str(workdir):
    path = path.absolute()
  return path / CKPT_DIR


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _drop_empty(tree):
  """Zero-size leaves (e.g. FRUGAL's active-block state at rho=0) -> None: orbax cannot save empty arrays."""
  return jax.tree.map(lambda x: None if math.prod(x.shape) == 0 else x, tree)


def _put_back_empty(restored, like):
  """The zero-size leaves dropped by `_drop_empty`, taken from the freshly built `like` (they hold no data)."""
  return jax.tree.map(lambda r, x: x if r is None else r, restored, like, is_leaf=lambda r: r is None)


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"train.keep_ckpts must be a positive int, got {keep!r}")
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, rest, data_state: dict) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_drop_empty({"train": state, "static": rest})),
        data=ocp.args.JsonSave(data_state)))
    self.manager.wait_until_finished()

  def restore(self, step: int, state_like, rest_like):
    """Restores into the shapes/shardings of freshly initialised `state_like`/`rest_like`."""
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_drop_empty(_abstract({"train": state_like, "static": rest_like}))),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for missing/corrupt files and structure mismatches
      raise CheckpointError(
          f"cannot restore checkpoint step {step} from {self.directory}: {type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}. The checkpoint is corrupt or was written by a different "
          f"model/optimizer; nothing was changed on disk.") from e
    restored = _put_back_empty(out["state"], {"train": state_like, "static": rest_like})
    return restored["train"], restored["static"], out["data"]

  def close(self):
    self.manager.close()


def load_model(workdir: str, step: int | None = None):
  """Rebuilds the trained model of a run directory: returns (model, config) from its latest (or given) checkpoint.

  The config is read in the current layout (`train.workdir.read_config`), so runs of older releases load too.
  """
  from flax import nnx

  from train import state as state_lib
  from train.workdir import read_config

  cfg = read_config(workdir)
  ckpt = Checkpointer(workdir)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    ckpt.close()
    raise ValueError(f"no checkpoint in {ckpt.directory}")
  graphdef, params, rest = state_lib.init_model(state_lib.llama_config(cfg), seed=cfg.train.seed)
  try:
    # Restore onto this process's first device whatever mesh or process count wrote the checkpoint: the target
    # is the stored shapes and dtypes with a single-device sharding.
    meta = ckpt.manager.item_metadata(step)["state"]
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    raw = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:  # orbax raises many types for missing/corrupt files
    raise CheckpointError(f"cannot read checkpoint step {step} from {ckpt.directory}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
  finally:
    ckpt.close()
  return nnx.merge(graphdef, _fill(params, raw["train"]["params"]), _fill(rest, raw.get("static", {}))), cfg


def _fill(like, raw):
  """Copies arrays from a raw restored nested dict into the nnx.State `like`, matching paths by name."""
  from flax import nnx
  flat = []
  for path, var in nnx.to_flat_state(like):
    node = raw
    for key in path:
      node = node[key] if key in node else node[str(key)]
    if hasattr(node, "keys") and "value" in node:
      node = node["value"]
    if tuple(node.shape) != tuple(var.shape):
      raise CheckpointError(f"checkpoint leaf {'/'.join(map(str, path))} has shape {node.shape}, "
                            f"the model expects {var.shape}")
    flat.append((path, var.replace(jax.numpy.asarray(node))))
  return nnx.from_flat_state(flat)
