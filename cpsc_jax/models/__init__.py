"""Model registry: classifiers by name, plus the generator and the feature adapter.

Every classifier is called as `model.apply(variables, x, train=False, features=False)` and
returns logits, or `(logits, feature)` with `features=True` (the pooled, un-normalised feature).

A user's architecture joins the registry with `register_model(name, constructor)`, where
`constructor(num_classes, axis_name=None, dtype=None)` returns a module following that protocol
(any Flax classifier does once wrapped: `cpsc_jax.teachers.flax_wrap.FlaxClassifier`). Registered names
work wherever a built-in one does: configs, checkpoints (`model.json` records the name; register
it again before loading), export. The command-line tools see them when the registering module is
imported first: list such modules in the environment variable `CPSC_JAX_MODELS` (comma-separated
import paths), or declare an entry point in the group `cpsc_jax.models` (name -> constructor).
"""
import functools
import importlib
import os
import sys
from typing import Any, Callable, Dict, Optional

from cpsc_jax.models.adapter import FeatureAdapter
from cpsc_jax.models.generator import ConditionalBatchNorm, ConditionalGenerator
from cpsc_jax.models.layers import BN_MOMENTS, BatchNorm
from cpsc_jax.models.lenet import lenet5
from cpsc_jax.models.resnet import resnet18, resnet34, resnet_option_a
from cpsc_jax.models.small import small_cnn
from cpsc_jax.models.vgg import vgg11_bn
from cpsc_jax.models.wrn import wrn

_CLASSIFIERS: Dict[str, Callable[..., Any]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "wrn_16_1": wrn(16, 1),
    "wrn_16_2": wrn(16, 2),
    "wrn_40_1": wrn(40, 1),
    "wrn_40_2": wrn(40, 2),
    "vgg11_bn": vgg11_bn,
    "lenet5": lenet5(1, False),
    "lenet5_half": lenet5(2, False),
    "lenet5_bn": lenet5(1, True),
    "lenet5_half_bn": lenet5(2, True),
    "small_cnn": small_cnn((32, 64, 128)),
    "small_cnn_half": small_cnn((16, 32, 64)),
}
for _depth in (8, 14, 20, 32, 44, 56, 110):
    _CLASSIFIERS[f"resnet{_depth}"] = resnet_option_a(_depth)


BUILT_IN = frozenset(_CLASSIFIERS)
_REGISTERED: Dict[str, Callable[..., Any]] = {}   # the user's, by register_model
PLUGIN_ENV = "CPSC_JAX_MODELS"
PLUGIN_GROUP = "cpsc_jax.models"
_plugins_loaded = False


def register_model(name: str, constructor: Callable[..., Any], replace: bool = False) -> str:
    """Adds `constructor(num_classes, axis_name=None, dtype=None) -> module` under `name`.

    Built-in names cannot be taken. Registering another constructor under a name already
    registered needs `replace=True` (a checkpoint records only the name, so a silent swap would
    load weights into the wrong network). Returns the name."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"a model name must be a non-empty string without surrounding spaces, "
                         f"got {name!r}")
    if not callable(constructor):
        raise TypeError(f"constructor for {name!r} must be callable "
                        "(num_classes, axis_name=None, dtype=None) -> module")
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is a built-in architecture; register yours under another name")
    current = _REGISTERED.get(name)
    if current is not None and current is not constructor and not replace:
        raise ValueError(f"a model {name!r} is already registered; pass replace=True to swap it "
                         "(checkpoints saved under that name then load into the new one)")
    _REGISTERED[name] = constructor
    if current is not constructor:
        _forget_cached(name)
    return name


def unregister_model(name: str) -> None:
    """Removes a name added by `register_model` (built-in names stay)."""
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is a built-in architecture and cannot be removed")
    if _REGISTERED.pop(name, None) is not None:
        _forget_cached(name)


def _forget_cached(name: str) -> None:
    # Shape caches keyed by name would otherwise describe the previous network.
    for key in [k for k in _MIN_SIZE if k[0] == name]:
        del _MIN_SIZE[key]
    _init_program.cache_clear()
    for module, function in (("cpsc_jax.teachers.convert", "_layout"),):
        cached = getattr(sys.modules.get(module), function, None)
        if cached is not None:
            cached.cache_clear()


def _load_plugins() -> None:
    """Imports the modules named in $CPSC_JAX_MODELS and the `cpsc_jax.models` entry points,
    once, so that the command-line tools know the user's architectures."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"${PLUGIN_ENV} names {module!r}, which cannot be imported: "
                              f"{e}") from e
    from importlib.metadata import entry_points
    for entry in entry_points(group=PLUGIN_GROUP):
        if entry.name not in _REGISTERED and entry.name not in BUILT_IN:
            register_model(entry.name, entry.load())


def _constructor(name: str) -> Optional[Callable[..., Any]]:
    if name not in _CLASSIFIERS and name not in _REGISTERED:
        _load_plugins()
    return _CLASSIFIERS.get(name) or _REGISTERED.get(name)


def available_models():
    _load_plugins()
    return sorted(set(_CLASSIFIERS) | set(_REGISTERED))


def get_model(name: str, num_classes: int, axis_name: Optional[str] = None, dtype: Any = None):
    """Builds a classifier by registry name; the error for an unknown name lists the valid ones."""
    constructor = _constructor(name)
    if constructor is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available_models())}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return constructor(num_classes, axis_name=axis_name, dtype=dtype)


def compiled_init(module, rng, *inputs):
    """`module.init(rng, *inputs)` as one program, compiled once per module and input shapes
    without XLA's backend optimisations: it runs once per run (or per generator
    re-initialisation), where those optimisations cost seconds of compile time and save nothing
    (docs/RESULTS.md, "Figures behind design choices"); op by op, every primitive would compile
    alone."""
    import jax
    import jax.numpy as jnp
    if any(isinstance(a, jax.core.Tracer) for a in (rng,) + inputs):   # inside a trace
        return jax.jit(module.init)(rng, *inputs)
    avals = tuple(jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in (rng,) + inputs)
    try:
        program = _init_program(module, avals, jnp.result_type(float))   # float: x64 on or off
    except TypeError:   # an unhashable module (a field holding a dict): compiled each time
        program = jax.jit(module.init)
    return program(rng, *inputs)


@functools.lru_cache(maxsize=32)
def _init_program(module, avals, float_dtype):
    import jax
    init = jax.jit(module.init)
    try:
        return init.lower(*avals).compile(compiler_options={"xla_backend_optimization_level": 0})
    except Exception:  # noqa: BLE001 - a backend without the option; errors of init surface below
        return init


__all__ = ["BN_MOMENTS", "BUILT_IN", "BatchNorm", "ConditionalBatchNorm", "ConditionalGenerator",
           "FeatureAdapter", "available_models", "compiled_init", "get_model", "register_model",
           "unregister_model"]


def _fits(name: str, num_classes: int, size: int, channels: int) -> bool:
    import jax
    import jax.numpy as jnp
    model = get_model(name, num_classes)
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    try:
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
    except Exception:  # noqa: BLE001 - too small an input fails in many ways inside flax/XLA
        return False
    return True


_MIN_SIZE: Dict[tuple, int] = {}


def min_input_size(name: str, num_classes: int = 10, channels: int = 3) -> int:
    """The smallest square input side the network accepts (shape tracing only, cached)."""
    key = (name, num_classes, channels)
    if key not in _MIN_SIZE:
        hi = 1
        while not _fits(name, num_classes, hi, channels):
            hi *= 2
            if hi > 4096:
                raise ValueError(f"{name} accepts no input size up to 4096")
        lo = hi // 2 + 1 if hi > 1 else 1
        while lo < hi:   # smallest fitting size in (hi/2, hi]
            mid = (lo + hi) // 2
            if _fits(name, num_classes, mid, channels):
                hi = mid
            else:
                lo = mid + 1
        _MIN_SIZE[key] = hi
    return _MIN_SIZE[key]
