"""Pre-activation wide ResNets (ZSKT/CMI layout): `block{g}.layer.{i}` is `block{g}/layer_{i}`."""
from typing import Any, Optional

import flax.linen as nn

from cpsc_jax.models.layers import DEFAULT_OPTIONS, BatchNorm, LayerOptions, conv, global_avg_pool


class WideBlock(nn.Module):
    planes: int
    stride: int
    axis_name: Optional[str] = None
    dtype: Any = None
    options: LayerOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda name: BatchNorm(axis_name=self.axis_name, dtype=self.dtype,
                                    options=self.options, name=name)
        a = nn.relu(bn("bn1")(x, train))
        out = conv(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv1",
                   options=self.options)(a)
        out = nn.relu(bn("bn2")(out, train))
        # Dropout is 0 in every published DFKD setting; it is left out rather than faked.
        out = conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2", options=self.options)(out)
        if x.shape[-1] == self.planes:
            shortcut = x
        else:  # the projection reads the pre-activated input, not x
            shortcut = conv(self.planes, 1, self.stride, 0, dtype=self.dtype,
                            name="convShortcut", options=self.options)(a)
        return out + shortcut


class WideGroup(nn.Module):
    num_blocks: int
    planes: int
    stride: int
    axis_name: Optional[str] = None
    dtype: Any = None
    options: LayerOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(self.num_blocks):
            x = WideBlock(self.planes, self.stride if i == 0 else 1, self.axis_name, self.dtype,
                          self.options, name=f"layer_{i}")(x, train)
        return x


class WideResNet(nn.Module):
    num_classes: int
    depth: int
    widen_factor: int
    axis_name: Optional[str] = None
    dtype: Any = None
    options: LayerOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        if (self.depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {self.depth}")
        n = (self.depth - 4) // 6
        k = self.widen_factor
        x = conv(16, 3, 1, 1, dtype=self.dtype, name="conv1",
                 options=self.options)(x.astype(self.dtype or x.dtype))
        for g, (planes, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
            x = WideGroup(n, planes, stride, self.axis_name, self.dtype, self.options,
                          name=f"block{g}")(x, train)
        x = nn.relu(BatchNorm(axis_name=self.axis_name, dtype=self.dtype, options=self.options,
                              name="bn1")(x, train))
        feature = global_avg_pool(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(feature)
        return (logits, feature) if features else logits


def wrn(depth: int, widen_factor: int):
    def build(num_classes, **kw):
        return WideResNet(num_classes, depth, widen_factor, **kw)
    return build
