"""LeNet-5 and LeNet-5-half (DAFL/DFAD MNIST setting, 32x32x1), optionally with BatchNorm.

The BN variant (`bn1..bn3` after each conv) exists because the BN-statistics loss needs BatchNorm
layers in the teacher; the original LeNet-5 has none.
"""
from typing import Any, Optional

import flax.linen as nn

from cpsc_jax.models.layers import DEFAULT_OPTIONS, BatchNorm, LayerOptions, conv, max_pool


class LeNet5(nn.Module):
    num_classes: int
    width_divisor: int = 1
    use_bn: bool = False
    axis_name: Optional[str] = None
    dtype: Any = None
    options: LayerOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        w1, w2, w3, w4 = (c // self.width_divisor for c in (6, 16, 120, 84))
        x = x.astype(self.dtype or x.dtype)
        for i, (width, pool) in enumerate(((w1, True), (w2, True), (w3, False)), start=1):
            x = conv(width, 5, use_bias=True, dtype=self.dtype, name=f"conv{i}",
                     options=self.options)(x)
            if self.use_bn:
                x = BatchNorm(axis_name=self.axis_name, dtype=self.dtype, options=self.options,
                              name=f"bn{i}")(x, train)
            x = nn.relu(x)
            if pool:
                x = max_pool(x)
        feature = x.reshape(x.shape[0], -1)  # 1x1x120 for 32x32 inputs, as in the reference
        h = nn.relu(nn.Dense(w4, dtype=self.dtype, name="fc1")(feature))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(h)
        return (logits, feature) if features else logits


def lenet5(width_divisor=1, use_bn=False):
    def build(num_classes, **kw):
        return LeNet5(num_classes, width_divisor, use_bn, **kw)
    return build
