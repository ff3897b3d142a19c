"""The run directory's config: what makes two configs the same run, and how configs of older releases are read.

A workdir holds `config.json` (the full config of the run) beside its checkpoints. Rerunning with the same workdir
resumes, but only with a config that trains the same model on the same data with the same optimizer: the
sections in `FINGERPRINT` must be equal (train.steps may change, to extend a run; logging, evaluation and
checkpoint cadence may change too). A workdir that has no checkpoint yet holds no training to protect: its
config.json is simply replaced.

Older releases wrote config.json in other layouts. `upgrade_config` maps them to the current one before any
comparison (and before `load_model` rebuilds a model):
* fields added later are filled with the value that reproduces the old runs (`ADDED_FIELDS`), or else with the
  current default, which by the rule below reproduces them;
* `LEGACY_OPTIM`: the flat optimizer table (`rho`, `galore_eps`, `trp_energy`, ...) became sub-configs per
  optimizer (`optim.frugal.rho`, `optim.galore.eps`, `optim.trp.energy`, ...);
* `objectives.trajectory='none'|'mesa'|'saf'` became `objectives.<name>.enabled` switches.
Rule for new fields: a field added to a section gets a default that reproduces the runs written before it; when
that is not possible (the new default changes behaviour) the field goes into `ADDED_FIELDS` with its legacy value.
"""
from __future__ import annotations

import copy
import json

import ml_collections
from etils import epath

# Config sections whose change makes an existing workdir incompatible (train.steps may change: extend a run).
FINGERPRINT = ("model", "optim", "objectives", "data", "train.seed", "train.global_batch", "train.seq_len",
               "train.grad_accum")

# Fields added after runs were already written, whose current default does not reproduce those runs: a stored
# config.json without the field is read as if it held this value (so an old run resumes with that setting).
ADDED_FIELDS = {
    "model.fuse_projections": False,   # q/k/v and gate/up computed together (same parameters, other rounding)
    "data.pipeline": "cached",         # 'auto' now streams HF/TFDS sources; older runs read them through the cache
}

# Old flat optimizer field -> its place(s) in the sub-configs ('update_gap' and 'proj_side' were shared by FRUGAL
# and GaLore).
LEGACY_OPTIM = {
    "rho": ("frugal.rho",), "update_gap": ("frugal.update_gap", "galore.update_gap"),
    "proj_type": ("frugal.proj_type",), "proj_side": ("frugal.proj_side", "galore.proj_side"),
    "block_order": ("frugal.block_order",), "reset_statistics": ("frugal.reset_statistics",),
    "inactive_update_rule": ("frugal.inactive_update_rule",), "proj_lr_scale": ("frugal.proj_lr_scale",),
    "inactive_lr_scale": ("frugal.inactive_lr_scale",),
    "rank": ("galore.rank",), "scale": ("galore.scale",), "galore_eps": ("galore.eps",),
    "lora_rank": ("lift.lora_rank",), "filter_rank": ("lift.filter_rank",), "lift_update_gap": ("lift.update_gap",),
    "freeze_others": ("lift.freeze_others",),
    "trp_energy": ("trp.energy",), "trp_period": ("trp.period",), "trp_nuclear_weight": ("trp.nuclear_weight",),
    "trp_scheme": ("trp.scheme",), "trp_nuclear_every_step": ("trp.nuclear_every_step",), "trp_base": ("trp.base",),
}
CONFIG_FILE = "config.json"


def as_path(workdir) -> epath.Path:
  """A workdir as an `etils.epath.Path`: local paths, and remote ones (gs://, s3://, ...) kept remote."""
  return epath.Path(workdir)


def _set(d: dict, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  for p in parents:
    d = d.setdefault(p, {})
  d[leaf] = value


def _merge_defaults(old: dict, defaults: dict) -> dict:
  """`old` with every key missing from it taken from `defaults` (recursively); old values win."""
  out = dict(old)
  for k, v in defaults.items():
    if k not in out:
      out[k] = copy.deepcopy(v)
    elif isinstance(v, dict) and isinstance(out[k], dict):
      out[k] = _merge_defaults(out[k], v)
  return out


def upgrade_config(old: dict) -> dict:
  """A config dict written by any earlier release, in the current layout (see the module docstring)."""
  from train.configs.base import base_config  # the current defaults

  d = copy.deepcopy(old)
  opt = d.get("optim")
  if isinstance(opt, dict):
    for key, targets in LEGACY_OPTIM.items():
      if key in opt and not isinstance(opt[key], dict):
        value = opt.pop(key)
        for t in targets:
          _set(opt, t, value)
  obj = d.get("objectives")
  if isinstance(obj, dict) and "trajectory" in obj:
    traj = obj.pop("trajectory")
    for name in ("mesa", "saf"):
      if isinstance(obj.get(name), dict):
        obj[name]["enabled"] = traj == name
  for key, legacy in ADDED_FIELDS.items():
    section, _, field = key.rpartition(".")
    node = d
    for part in section.split("."):
      node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.setdefault(field, legacy)
  return _merge_defaults(d, base_config().to_dict())


def fingerprint(cfg) -> dict:
  """The FINGERPRINT sections of a config (ConfigDict or dict), without the sub-configs that are not in use
  (the sub-configs of the optimizers not chosen, of the objectives switched off)."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else copy.deepcopy(cfg)
  out = {}
  for key in FINGERPRINT:
    node = d
    for part in key.split("."):
      node = node.get(part) if isinstance(node, dict) else None
    out[key] = node
  model = out.get("model")
  if isinstance(model, dict) and isinstance(model.get("sparse_impl"), str):
    # legacy sparse-path names and their registry names select the same implementation
    from lostjax.kernels.registry import canonical_name
    try:
      model["sparse_impl"] = canonical_name(model["sparse_impl"])
    except ValueError:
      pass
  data = out.get("data")
  if isinstance(data, dict) and "pipeline" in data and "source" in data:
    from train.data import resolve_pipeline   # 'auto' compared as the pipeline it selects for this source
    data["pipeline"] = resolve_pipeline(ml_collections.ConfigDict(data))
  opt = out.get("optim")
  if isinstance(opt, dict):
    out["optim"] = {k: v for k, v in opt.items() if not isinstance(v, dict) or k == opt.get("name")}
  obj = out.get("objectives")
  if isinstance(obj, dict):
    out["objectives"] = {k: v for k, v in obj.items() if not isinstance(v, dict) or v.get("enabled", True)}
  return json.loads(json.dumps(out, default=str))


def diff(a, b, prefix: str = "") -> list[str]:
  """'path: old -> new' for every leaf that differs between two nested dicts."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config.json in the current layout. ValueError if there is none or it is not valid JSON."""
  path = as_path(workdir) / CONFIG_FILE
  if not path.exists():
    raise ValueError(f"no {CONFIG_FILE} in workdir {str(workdir)!r}: not a lostjax run directory")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); refusing to reuse this workdir") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{path} does not hold a config object")
  return ml_collections.ConfigDict(upgrade_config(raw))


def prepare_workdir(cfg, workdir: str, *, has_checkpoint: bool, write: bool = True) -> bool:
  """Checks `cfg` against an existing run in `workdir` and writes config.json. Returns True when resuming.

  With a checkpoint present, the stored config must have the same fingerprint (else ValueError listing the
  differences; nothing is written). Without one, config.json is (re)written. `write=False` (processes other
  than 0 in a multi-process run) checks but does not write.
  """
  path = as_path(workdir) / CONFIG_FILE
  if has_checkpoint:
    old = read_config(workdir)
    diffs = diff(fingerprint(old), fingerprint(cfg))
    if diffs:
      raise ValueError(f"workdir {workdir!r} holds a run with a different config; refusing to resume or overwrite "
                       f"it. Differences: {'; '.join(diffs[:8])}. Use a new --workdir.")
    return True
  if write:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    tmp.replace(path)
  return False
