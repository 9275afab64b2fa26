"""cpsc-jax: Conditional Pseudo-Supervised Contrast for data-free knowledge distillation.

    import cpsc_jax
    out = cpsc_jax.distill(model, variables, num_classes=10, input_shape=(32, 32, 3),
                           mean=..., std=...)

The names below are loaded on first use, so `import cpsc_jax` stays light (the command-line
tools and the PyTorch mirror import submodules directly).
"""
import importlib

__version__ = "0.2.0"

# public name -> module that defines it
_EXPORTS = {
    "distill": "cpsc_jax.api",
    "default_config": "cpsc_jax.api",
    "Distilled": "cpsc_jax.api",
    "as_eval_split": "cpsc_jax.api",
    "FlaxClassifier": "cpsc_jax.teachers.flax_wrap",
    "wrap": "cpsc_jax.teachers.flax_wrap",
    "Teacher": "cpsc_jax.teachers.teacher",
    "load_teacher": "cpsc_jax.teachers.teacher",
    "train_and_evaluate": "cpsc_jax.method.trainer",
    "register_model": "cpsc_jax.models",
    "unregister_model": "cpsc_jax.models",
    "available_models": "cpsc_jax.models",
    "get_model": "cpsc_jax.models",
    "AXIS": "cpsc_jax.infra.runtime",
    "load_split": "cpsc_jax.data",
}
# public submodules, also loaded on first use (`cpsc_jax.data.load_split(...)`)
_SUBMODULES = ("data",)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"cpsc_jax.{name}")
        globals()[name] = module
        return module
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value   # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'cpsc_jax' has no attribute {name!r}")


def __dir__():
    return __all__
