"""A three-conv BatchNorm CNN for 8x8 inputs: the embedded default's teacher and student."""
from typing import Any, Optional

import flax.linen as nn

from cpsc_jax.models.layers import DEFAULT_OPTIONS, BatchNorm, LayerOptions, conv, global_avg_pool


class SmallCNN(nn.Module):
    num_classes: int
    widths: tuple = (32, 64, 128)
    axis_name: Optional[str] = None
    dtype: Any = None
    options: LayerOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        x = x.astype(self.dtype or x.dtype)
        for i, width in enumerate(self.widths, start=1):
            x = conv(width, 3, 1 if i == 1 else 2, 1, dtype=self.dtype, name=f"conv{i}",
                     options=self.options)(x)
            x = nn.relu(BatchNorm(axis_name=self.axis_name, dtype=self.dtype,
                                  options=self.options, name=f"bn{i}")(x, train))
        feature = global_avg_pool(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="linear")(feature)
        return (logits, feature) if features else logits


def small_cnn(widths):
    def build(num_classes, **kw):
        return SmallCNN(num_classes, tuple(widths), **kw)
    return build
