"""CIFAR ResNets: ResNet-18/34 (DAFL/CMI/DFAD/CPSC layout) and ResNet-20..110 (option A).

Submodule names mirror the PyTorch state_dict: `layer1.0.conv1` is `layer1_0/conv1`,
`layer2.0.shortcut.0` is `layer2_0/shortcut_0`.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cpsc_jax.models.layers import DEFAULT_OPTIONS, BatchNorm, LayerOptions, conv, global_avg_pool


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    option_a: bool = False  # parameter-free shortcut (subsample + zero channel padding)
    axis_name: Optional[str] = None
    dtype: Any = None
    options: LayerOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda name: BatchNorm(axis_name=self.axis_name, dtype=self.dtype,
                                    options=self.options, name=name)
        out = conv(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv1",
                   options=self.options)(x)
        out = nn.relu(bn("bn1")(out, train))
        out = conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2", options=self.options)(out)
        out = bn("bn2")(out, train)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            if self.option_a:
                pad = self.planes // 4
                shortcut = x[:, ::2, ::2, :]
                shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (pad, pad)))
            else:
                shortcut = conv(self.planes, 1, self.stride, 0, dtype=self.dtype,
                                name="shortcut_0", options=self.options)(x)
                shortcut = bn("shortcut_1")(shortcut, train)
        return nn.relu(out + shortcut)


class CifarResNet(nn.Module):
    """3x3 stem, no max-pool, BasicBlock stages, global average pool, `linear`."""

    num_classes: int
    stage_sizes: Sequence[int]
    widths: Sequence[int]
    strides: Sequence[int]
    option_a: bool = False
    axis_name: Optional[str] = None
    dtype: Any = None
    options: LayerOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        x = conv(self.widths[0], 3, 1, 1, dtype=self.dtype, name="conv1",
                 options=self.options)(x.astype(self.dtype or x.dtype))
        x = nn.relu(BatchNorm(axis_name=self.axis_name, dtype=self.dtype, options=self.options,
                              name="bn1")(x, train))
        for stage, (blocks, width, stride) in enumerate(
                zip(self.stage_sizes, self.widths, self.strides), start=1):
            for i in range(blocks):
                x = BasicBlock(width, stride if i == 0 else 1, self.option_a, self.axis_name,
                               self.dtype, self.options, name=f"layer{stage}_{i}")(x, train)
        feature = global_avg_pool(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="linear")(feature)
        return (logits, feature) if features else logits


def resnet18(num_classes, **kw):
    return CifarResNet(num_classes, (2, 2, 2, 2), (64, 128, 256, 512), (1, 2, 2, 2), **kw)


def resnet34(num_classes, **kw):
    return CifarResNet(num_classes, (3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2), **kw)


def resnet_option_a(depth: int):
    if (depth - 2) % 6:
        raise ValueError(f"option-A ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6

    def build(num_classes, **kw):
        return CifarResNet(num_classes, (n, n, n), (16, 32, 64), (1, 2, 2), option_a=True, **kw)
    return build
