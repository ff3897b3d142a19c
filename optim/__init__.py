"""Memory-efficient optimizers as optax transforms (FRUGAL, GaLore, TRP, LIFT, Normalized LR+GD)."""
from optim.frugal import frugal, scale_by_frugal
from optim.galore import galore, scale_by_galore
from optim.lift import lift, scale_by_lift
from optim.normalized_gd import normalized_gd
from optim.projection import default_label_fn, make_label_fn
from optim.state import StateSize, state_size
from optim.trp import trp, trp_factorize, trp_project_params

__all__ = ["frugal", "galore", "trp", "lift", "normalized_gd", "state_size", "StateSize", "scale_by_frugal",
           "scale_by_galore", "scale_by_lift", "trp_factorize", "trp_project_params", "default_label_fn",
           "make_label_fn"]
