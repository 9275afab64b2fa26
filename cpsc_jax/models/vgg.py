"""VGG-11-BN (RepDistiller/CMI layout): Sequential positions become `block{b}_{i}`."""
from typing import Any, Optional

import flax.linen as nn

from cpsc_jax.models.layers import (DEFAULT_OPTIONS, BatchNorm, LayerOptions, conv,
                                    global_avg_pool, max_pool)

VGG11_BLOCKS = ((64,), (128,), (256, 256), (512, 512), (512, 512))


class VGG(nn.Module):
    num_classes: int
    blocks: tuple = VGG11_BLOCKS
    axis_name: Optional[str] = None
    dtype: Any = None
    options: LayerOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        x = x.astype(self.dtype or x.dtype)
        large = x.shape[1] == 64
        for b, widths in enumerate(self.blocks):
            for j, width in enumerate(widths):
                # PyTorch Sequential per conv: conv (3j), BN (3j+1), ReLU (3j+2).
                x = conv(width, 3, 1, 1, use_bias=True, dtype=self.dtype, name=f"block{b}_{3 * j}",
                         options=self.options)(x)
                x = BatchNorm(axis_name=self.axis_name, dtype=self.dtype, options=self.options,
                              name=f"block{b}_{3 * j + 1}")(x, train)
                x = nn.relu(x)
            if b < 3 or (b == 3 and large):
                x = max_pool(x)
        feature = global_avg_pool(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(feature)
        return (logits, feature) if features else logits


def vgg11_bn(num_classes, **kw):
    return VGG(num_classes, **kw)
