"""Optimizer registry for the training loop.

`default_optim_config()` holds every hyperparameter of every optimizer in `optim/` (ConfigDicts are locked, so
`--config.optim.<field>=...` overrides only work for fields that exist here). `build_optimizer(cfg, lr)` returns
one `optax.GradientTransformation` (global-norm clipping included); `lr_schedule(cfg, total_steps)` is the
warmup + cosine schedule used by GaLore/FRUGAL/LOST pre-training (linear warmup for `warmup_frac` of the steps,
cosine decay to `min_lr_ratio * lr`).

Names: adamw, frugal, galore, lift, trp (normalized_gd is for logistic regression and needs per-sample
margins, so it is not offered here). Defaults: betas (0.9, 0.999) and eps 1e-8 as in the FRUGAL/GaLore C4
pre-training scripts (LOST's dev code uses b2 = 0.95: `--config.optim.b2=0.95`). FRUGAL defaults to the paper's
runs (proj_type='blockwise', descending, rho 0.25, T 200); GaLore to rank 128, scale 0.25, eps 1e-6 (its scripts use
lr 0.01: set `--config.optim.lr=0.01`). LIFT and TRP need `params` in `tx.update`; LIFT's filter_rank (64) must
not exceed the smaller side of any matrix.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import ml_collections
import optax

import optim

ScalarOrSchedule = Union[float, optax.Schedule]

KNOWN_OPTIMIZERS = ("adamw", "frugal", "galore", "lift", "trp")


def default_optim_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "adamw"
  c.lr = 1e-3
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0
  c.grad_clip = 1.0  # global-norm clip; 0 disables
  c.warmup_frac = 0.1
  c.min_lr_ratio = 0.1
  c.seed = 0  # PRNG seed of random projections / random block order
  # FRUGAL (arXiv 2411.07837) and GaLore (arXiv 2403.03507)
  c.rho = 0.25  # FRUGAL density: state-full fraction
  c.update_gap = 200  # T: projector / active-block refresh period (FRUGAL and GaLore)
  c.proj_type = "blockwise"  # FRUGAL: svd|random|randperm|randk|columns|rows|blockwise (paper runs: blockwise)
  c.proj_side = "std"  # std|reverse_std|left|right (torch-layout names; see optim/projection.py)
  c.block_order = "descending"  # blockwise order: descending (all paper scripts)|ascending|random|mirror
  c.reset_statistics = True  # FRUGAL: zero Adam moments + step counter at each refresh
  c.inactive_update_rule = "sign_sgd"  # FRUGAL state-free rule: sign_sgd|sgd|no
  c.proj_lr_scale = 1.0  # FRUGAL proj_params_lr_scale
  c.inactive_lr_scale = 1.0  # FRUGAL inactive_lr_scale
  c.rank = 128  # GaLore rank (on the smaller side of each matrix)
  c.scale = 0.25  # GaLore alpha (galore_scale)
  c.galore_eps = 1e-6  # galore_torch AdamW class default
  # LIFT (arXiv 2506.00772); uses b1/b2/eps above (reference: b2=0.95, eps=1e-6)
  c.lora_rank = 128  # budget k = (m+n)*lora_rank entries per matrix
  c.filter_rank = 64  # rank of the approximation used to pick principal weights
  c.lift_update_gap = 400
  c.freeze_others = False  # True: non-matrix leaves frozen (reference fine-tuning); False: AdamW
  # TRP (arXiv 1812.02402): wraps AdamW (trp_base='adamw') or SGD momentum 0.9 (trp_base='sgd')
  c.trp_energy = 0.9
  c.trp_period = 5
  c.trp_nuclear_weight = 3e-4
  c.trp_scheme = "channel"  # conv kernels: channel (NC)|spatial (VH)|decouple (ND, per-filter ranks)
  c.trp_nuclear_every_step = False  # False: nuclear sub-gradient on projection steps only (reference code)
  c.trp_base = "adamw"
  return c


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 for `warmup_frac*total_steps` steps, then cosine to `min_lr_ratio*lr`."""
  total_steps = int(total_steps)
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if not 0.0 <= optim_cfg.warmup_frac < 1.0:
    raise ValueError(f"warmup_frac must be in [0, 1), got {optim_cfg.warmup_frac}")
  if not 0.0 <= optim_cfg.min_lr_ratio <= 1.0:
    raise ValueError(f"min_lr_ratio must be in [0, 1], got {optim_cfg.min_lr_ratio}")
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
  Hyperparameters are validated when the optimizer is built (unknown names, rho, update_gap, ...) or, for
  shape-dependent checks (GaLore rank too large), at `init`.
  """
  name = optim_cfg.name
  if name not in KNOWN_OPTIMIZERS:
    raise ValueError(f"unknown optimizer name {name!r}; known: {KNOWN_OPTIMIZERS}")
  if optim_cfg.grad_clip < 0:
    raise ValueError(f"grad_clip must be >= 0, got {optim_cfg.grad_clip}")
  c = optim_cfg
  adamw = lambda: optax.adamw(learning_rate, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
  if name == "adamw":
    tx = adamw()
  elif name == "frugal":
    tx = optim.frugal(learning_rate, rho=c.rho, update_gap=c.update_gap, proj_type=c.proj_type,
                      proj_side=c.proj_side, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                      reset_statistics=c.reset_statistics, inactive_update_rule=c.inactive_update_rule,
                      proj_lr_scale=c.proj_lr_scale, inactive_lr_scale=c.inactive_lr_scale,
                      block_order=c.block_order, seed=c.seed, label_fn=label_fn)
  elif name == "galore":
    tx = optim.galore(learning_rate, rank=c.rank, update_gap=c.update_gap, scale=c.scale, proj_side=c.proj_side,
                      b1=c.b1, b2=c.b2, eps=c.galore_eps, weight_decay=c.weight_decay, label_fn=label_fn)
  elif name == "lift":
    tx = optim.lift(learning_rate, lora_rank=c.lora_rank, filter_rank=c.filter_rank,
                    update_gap=c.lift_update_gap, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                    freeze_others=c.freeze_others, label_fn=label_fn)
  else:  # trp
    if c.trp_base not in ("adamw", "sgd"):
      raise ValueError(f"unknown trp_base {c.trp_base!r}; expected 'adamw' or 'sgd'")
    base = adamw() if c.trp_base == "adamw" else optax.chain(
        optax.add_decayed_weights(c.weight_decay), optax.sgd(learning_rate, momentum=0.9))
    tx = optim.trp(base, energy=c.trp_energy, period=c.trp_period, nuclear_weight=c.trp_nuclear_weight,
                   scheme=c.trp_scheme, nuclear_every_step=c.trp_nuclear_every_step, label_fn=label_fn)
  if optim_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), tx)
  return tx
