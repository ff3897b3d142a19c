"""LLaMA decoder, presets and parameter accounting."""

from lostjax.models.accounting import count_params, lost_closed_form
from lostjax.models.config import PRESETS, LlamaConfig, preset
from lostjax.models.llama import Llama

__all__ = ["Llama", "LlamaConfig", "PRESETS", "preset", "count_params", "lost_closed_form"]
