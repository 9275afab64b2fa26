"""Model registry: classifiers by name, plus the generator and the feature adapter.

Every classifier is called as `model.apply(variables, x, train=False, features=False)` and
returns logits, or `(logits, feature)` with `features=True` (the pooled, un-normalised feature).
"""
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
for _depth in (20, 32, 44, 56, 110):
    _CLASSIFIERS[f"resnet{_depth}"] = resnet_option_a(_depth)


def available_models():
    return sorted(_CLASSIFIERS)


def get_model(name: str, num_classes: int, axis_name: Optional[str] = None, dtype: Any = None):
    """Builds a classifier by registry name; the error for an unknown name lists the valid ones."""
    if name not in _CLASSIFIERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available_models())}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return _CLASSIFIERS[name](num_classes, axis_name=axis_name, dtype=dtype)


__all__ = ["BN_MOMENTS", "BatchNorm", "ConditionalBatchNorm", "ConditionalGenerator",
           "FeatureAdapter", "available_models", "get_model"]


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
