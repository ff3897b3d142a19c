"""lostjax: low-rank + sparse LLaMA pretraining in JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
  # `lostjax.generate(model, prompt, n)`: imported on first use (importing lostjax itself stays free of JAX, so
  # that train.cpu_malloc can run before JAX/numpy start threads). The module is callable (see its docstring).
  if name == "generate":
    import importlib
    return importlib.import_module("lostjax.generate")
  raise AttributeError(f"module 'lostjax' has no attribute {name!r}")
