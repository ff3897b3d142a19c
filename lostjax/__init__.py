"""lostjax: low-rank + sparse LLaMA pretraining in JAX/Flax NNX."""

__version__ = "0.1.0"
