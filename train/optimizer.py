"""Optimizer registry for the training loop: `optim.name` plus one sub-config per optimizer (big_vision style).

    --config.optim.name=frugal --config.optim.frugal.rho=0.25 --config.optim.lr=1e-3

`default_optim_config()` holds the fields every optimizer shares (lr, betas, eps, weight decay, clipping, schedule,
seed) at the top level and each optimizer's own hyperparameters in a sub-config named after it (`optim.frugal`,
`optim.galore`, `optim.lift`, `optim.trp`). The keys of a sub-config are the keyword names of the transform in
`optim/`, so the builder passes them through unchanged (`optim.frugal(lr, **cfg.frugal)`): a field added to a
transform is exposed by adding one line to its sub-config. Only the chosen optimizer's sub-config is used (and
compared when a run resumes, see train/workdir.py).

`build_optimizer(cfg, lr)` returns one `optax.GradientTransformation` (global-norm clipping included);
`lr_schedule(cfg, total_steps)` is the warmup + cosine schedule of GaLore/FRUGAL/LOST pre-training (linear warmup
for `warmup_frac` of the steps, cosine decay to `min_lr_ratio * lr`).

Weight decay (`optim.weight_decay`, default 0 as in every GaLore/FRUGAL/LOST pre-training script) and
`optim.decay_mask`: 'all' (default) decays every leaf, RMSNorm scales and embeddings included — the reference
scripts' parameter groups all carry the same weight_decay, so this reproduces them; 'matrices' decays only the
'matrix'-labelled leaves (2-D projection kernels, low-rank factors and LOST sparse rows; not the embedding,
lm_head or norms), the usual no-decay groups of GPT-style training. With 'matrices' the transform runs with
weight_decay 0 and a decoupled decay −lr(t)·wd·W (same schedule, same unscaled lr as AdamW) is added to the
masked leaves afterwards; for AdamW, FRUGAL and GaLore that is exactly their own decay restricted to the mask
(LIFT decays only its selected entries internally; with 'matrices' its whole matrices are decayed instead).

Learning-rate multipliers per parameter group (`optim.lr_mult.embed`, `.head`, `.norm`; the projection matrices —
kernels, low-rank factors, LOST and SLTrain sparse values — always 1): the update of every leaf of a group is
multiplied by its multiplier after the optimizer (`scale_by_group`), which is the same as running that group at
lr × multiplier for AdamW, the Adam-handled leaves of FRUGAL and GaLore, and any transform whose update is linear in
its learning rate (the decoupled weight decay of a group is scaled with it, as torch's per-group lr does). A
multiplier of 0 freezes the group. Groups by path: 'lm_head' → head, 'embed' → embed, 'norm' → norm. With every
multiplier 1 (the default) nothing is added to the chain, so older runs and their checkpoints are unchanged.
Why: methods whose matrix learning rate is far from AdamW's (GaLore's scripts use 1e-2) would otherwise also run
the embedding, head and norms at that rate, and a comparison would measure that as well.

Defaults: betas (0.9, 0.999) and eps 1e-8 as in the FRUGAL/GaLore C4 pre-training scripts (LOST's development
code uses b2 = 0.95: `--config.optim.b2=0.95`). FRUGAL defaults to the paper's runs (blockwise, descending, ρ 0.25,
T 200); GaLore to rank 128, scale 0.25 and its own eps 1e-6 (its scripts use lr 0.01). LIFT and TRP need `params`
in `tx.update`; LIFT's filter_rank must not exceed the smaller side of any matrix. normalized_gd is for logistic
regression and needs per-sample margins, so it is not offered here. Method notes: docs/frugal_galore.md,
docs/lift.md, docs/trp.md.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import optax

import optim
import optim.projection
from lostjax.pytree import path_to_str
from train.cli import did_you_mean

ScalarOrSchedule = Union[float, optax.Schedule]


def _frugal_config():
  return ml_collections.ConfigDict(dict(
      rho=0.25,                         # density: state-full fraction
      update_gap=200,                   # T: projector / active-block refresh period
      proj_type="blockwise",            # svd|random|randperm|randk|columns|rows|blockwise (paper runs: blockwise)
      proj_side="std",                  # std|reverse_std|left|right (torch-layout names; optim/projection.py)
      block_order="descending",         # blockwise order: descending (paper scripts)|ascending|random|mirror
      reset_statistics=True,            # zero Adam moments + step counter at each refresh
      inactive_update_rule="sign_sgd",  # state-free rule: sign_sgd|sgd|no
      proj_lr_scale=1.0,                # FRUGAL proj_params_lr_scale
      inactive_lr_scale=1.0,            # FRUGAL inactive_lr_scale
  ))


def _galore_config():
  return ml_collections.ConfigDict(dict(
      rank=128,         # projection rank (on the smaller side of each matrix)
      update_gap=200,   # T: projector refresh period
      scale=0.25,       # alpha (galore_scale)
      proj_side="std",
      eps=1e-6,         # galore_torch AdamW default (replaces optim.eps for GaLore)
  ))


def _lift_config():
  return ml_collections.ConfigDict(dict(
      lora_rank=128,        # budget k = (m+n)·lora_rank entries per matrix
      filter_rank=64,       # rank of the approximation used to pick principal weights
      update_gap=400,       # principal-weight refresh period
      freeze_others=False,  # True: non-matrix leaves frozen (reference fine-tuning); False: AdamW
  ))


def _trp_config():
  return ml_collections.ConfigDict(dict(
      energy=0.9,                # energy threshold of the truncation
      period=5,                  # m: project every `period` steps
      nuclear_weight=3e-4,       # λ of the nuclear-norm sub-gradient
      scheme="channel",          # conv kernels: channel (NC)|spatial (VH)|decouple (ND, per-filter ranks)
      nuclear_every_step=False,  # False: nuclear sub-gradient on projection steps only (reference code)
      base="adamw",              # wrapped optimizer: adamw | sgd (momentum 0.9)
  ))


class _Entry(NamedTuple):
  config: Optional[Callable[[], ml_collections.ConfigDict]]  # default sub-config (None: no sub-config)
  build: Callable[..., optax.GradientTransformation]         # (cfg, lr, label_fn) -> transform


def _adamw(c, lr):
  return optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)


def _build_frugal(c, lr, label_fn):
  return optim.frugal(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, seed=c.seed,
                      label_fn=label_fn, **c.frugal.to_dict())


def _build_galore(c, lr, label_fn):
  return optim.galore(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, label_fn=label_fn, **c.galore.to_dict())


def _build_lift(c, lr, label_fn):
  return optim.lift(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, label_fn=label_fn,
                    **c.lift.to_dict())


def _build_trp(c, lr, label_fn):
  sub = c.trp.to_dict()
  base = sub.pop("base")
  if base == "adamw":
    base_tx = _adamw(c, lr)
  elif base == "sgd":
    base_tx = optax.chain(optax.add_decayed_weights(c.weight_decay), optax.sgd(lr, momentum=0.9))
  else:
    raise ValueError(f"unknown optim.trp.base={base!r}; expected 'adamw' or 'sgd'")
  return optim.trp(base_tx, label_fn=label_fn, **sub)


# name -> (sub-config, builder). Adding an optimizer: one builder function and one line here.
OPTIMIZERS: dict[str, _Entry] = {
    "adamw": _Entry(None, lambda c, lr, label_fn: _adamw(c, lr)),
    "frugal": _Entry(_frugal_config, _build_frugal),
    "galore": _Entry(_galore_config, _build_galore),
    "lift": _Entry(_lift_config, _build_lift),
    "trp": _Entry(_trp_config, _build_trp),
}
KNOWN_OPTIMIZERS = tuple(OPTIMIZERS)


def default_optim_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "adamw"
  c.lr = 1e-3
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0
  c.decay_mask = "all"  # 'all' (reference scripts: every leaf) | 'matrices' (no norms, embeddings, lm_head)
  c.grad_clip = 1.0  # global-norm clip; 0 disables
  c.warmup_frac = 0.1
  c.min_lr_ratio = 0.1
  c.seed = 0  # PRNG seed of random projections / random block order
  # Learning-rate multipliers of the non-matrix parameter groups (matrices: 1); see the module docstring.
  c.lr_mult = ml_collections.ConfigDict(dict(embed=1.0, head=1.0, norm=1.0))
  for name, entry in OPTIMIZERS.items():
    if entry.config is not None:
      c[name] = entry.config()
  return c


def _number(name, v, *, lo=None, hi=None, lo_open=False, hi_open=False):
  if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
    raise ValueError(f"optim.{name}={v!r} must be a number")
  if lo is not None and (v < lo or (lo_open and v == lo)):
    raise ValueError(f"optim.{name}={v!r} must be {'>' if lo_open else '>='} {lo}")
  if hi is not None and (v > hi or (hi_open and v == hi)):
    raise ValueError(f"optim.{name}={v!r} must be {'<' if hi_open else '<='} {hi}")


def check_optim_config(c) -> None:
  """Raises ValueError naming the first bad field of the shared optimizer fields (the transforms check their own)."""
  if c.name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer optim.name={c.name!r} (known: {', '.join(KNOWN_OPTIMIZERS)})"
                     f"{did_you_mean(c.name, KNOWN_OPTIMIZERS)}")
  _number("lr", c.lr, lo=0.0, lo_open=True)
  _number("b1", c.b1, lo=0.0, hi=1.0, hi_open=True)
  _number("b2", c.b2, lo=0.0, hi=1.0, hi_open=True)
  _number("eps", c.eps, lo=0.0)
  _number("weight_decay", c.weight_decay, lo=0.0)
  _number("grad_clip", c.grad_clip, lo=0.0)
  _number("warmup_frac", c.warmup_frac, lo=0.0, hi=1.0, hi_open=True)
  _number("min_lr_ratio", c.min_lr_ratio, lo=0.0, hi=1.0)
  if isinstance(c.seed, bool) or not isinstance(c.seed, int):
    raise ValueError(f"optim.seed={c.seed!r} must be an int")
  for group, m in lr_multipliers(c).items():
    _number(f"lr_mult.{group}", m, lo=0.0)
  if c.get("decay_mask", "all") not in DECAY_MASKS:
    raise ValueError(f"optim.decay_mask={c.decay_mask!r}; expected one of {DECAY_MASKS}")


DECAY_MASKS = ("all", "matrices")
LR_GROUPS = ("embed", "head", "norm")


def lr_multipliers(c) -> dict:
  """{'embed': m, 'head': m, 'norm': m} from optim.lr_mult (all 1 when a config predates the field)."""
  mult = c.get("lr_mult", None)
  d = mult.to_dict() if mult is not None else {}
  unknown = sorted(set(d) - set(LR_GROUPS))
  if unknown:
    raise ValueError(f"optim.lr_mult: unknown group(s) {unknown}; expected {LR_GROUPS}")
  return {g: d.get(g, 1.0) for g in LR_GROUPS}


def param_group(path: str) -> str:
  """The learning-rate group of a parameter path: 'head', 'embed', 'norm' or 'matrix' (everything else)."""
  p = path.lower()
  if "lm_head" in p:
    return "head"
  if "embed" in p:
    return "embed"
  if "norm" in p:
    return "norm"
  return "matrix"


def scale_by_group(multipliers: dict) -> optax.GradientTransformation:
  """Multiplies the update of every leaf by `multipliers[param_group(path)]` (1 for matrices and missing groups)."""
  mult = dict(multipliers)

  def update_fn(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: (u * mult.get(param_group(path_to_str(path)), 1.0)).astype(u.dtype), updates)
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def masked_weight_decay(learning_rate: ScalarOrSchedule, weight_decay: float,
                        mask_fn: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Adds −lr(t)·wd·W to the updates of the leaves where mask_fn(params) is True (decoupled weight decay)."""
  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("masked_weight_decay needs params in update()")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    mask = mask_fn(params)
    updates = jax.tree.map(lambda u, p, m: u - (lr * weight_decay * p).astype(u.dtype) if m else u,
                           updates, params, mask)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _matrix_mask(label_fn):
  labels = label_fn or optim.projection.default_label_fn
  return lambda params: jax.tree.map(lambda lab: lab == optim.projection.MATRIX, labels(params))


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 for `warmup_frac*total_steps` steps, then cosine to `min_lr_ratio*lr`."""
  total_steps = int(total_steps)
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if not 0.0 <= optim_cfg.warmup_frac < 1.0:
    raise ValueError(f"optim.warmup_frac must be in [0, 1), got {optim_cfg.warmup_frac}")
  if not 0.0 <= optim_cfg.min_lr_ratio <= 1.0:
    raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {optim_cfg.min_lr_ratio}")
  warmup = int(optim_cfg.warmup_frac * total_steps)
  peak = float(optim_cfg.lr)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=peak * optim_cfg.min_lr_ratio)


def build_optimizer(optim_cfg, learning_rate: ScalarOrSchedule,
                    label_fn: Optional[Callable[[Any], Any]] = None) -> optax.GradientTransformation:
  """Returns clip_by_global_norm(grad_clip) followed by the named optimizer.

  label_fn(params) -> tree of 'matrix'/'other' overrides the default rule (a 2-D leaf whose path does not contain
  'embed', 'lm_head' or 'norm' is a matrix; see optim/projection.py). LIFT and TRP need `params` in update().
  Hyperparameters are validated here (shared fields) and by the transform (its own fields); shape-dependent
  checks (GaLore rank too large) happen at `init`. A transform's ValueError is re-raised naming the sub-config.
  """
  check_optim_config(optim_cfg)
  name = optim_cfg.name
  decay_matrices = optim_cfg.get("decay_mask", "all") == "matrices" and optim_cfg.weight_decay > 0
  build_cfg = optim_cfg
  if decay_matrices:
    build_cfg = optim_cfg.copy_and_resolve_references()
    with build_cfg.unlocked():
      build_cfg.weight_decay = 0.0
  try:
    tx = OPTIMIZERS[name].build(build_cfg, learning_rate, label_fn)
  except (ValueError, TypeError) as e:
    raise ValueError(f"bad optim.{name} config: {e}") from None
  if decay_matrices:
    tx = optax.chain(tx, masked_weight_decay(learning_rate, optim_cfg.weight_decay, _matrix_mask(label_fn)))
  mult = lr_multipliers(optim_cfg)
  if any(m != 1.0 for m in mult.values()):
    tx = optax.chain(tx, scale_by_group(mult))
  if optim_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), tx)
  return tx
