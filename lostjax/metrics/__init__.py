"""Analysis metrics: RankMe, layer-wise gradient spectra, scaling-law fits, LLM Swiss round."""
import warnings

from lostjax.metrics.gradient_spectra import gradient_spectra
from lostjax.metrics.rankme import rankme
from lostjax.metrics.scaling_law import fit_scaling_law
from lostjax.metrics.swiss_round import swiss_round

# `python -m lostjax.metrics.<cli>` runs a module this package has already imported; runpy's warning about
# that is harmless here (the CLIs keep no module state), so it is silenced for these modules only.
warnings.filterwarnings("ignore", category=RuntimeWarning,
                        message=r".*'lostjax\.metrics\.(gradient_spectra|scaling_law)' found in sys\.modules.*")

__all__ = ["rankme", "gradient_spectra", "fit_scaling_law", "swiss_round"]
