"""Analysis metrics: RankMe, layer-wise gradient spectra, scaling-law fits, LLM Swiss round."""
from lostjax.metrics.rankme import rankme
from lostjax.metrics.scaling_law import fit_scaling_law
from lostjax.metrics.swiss_round import swiss_round
from lostjax.metrics.gradient_spectra import gradient_spectra
