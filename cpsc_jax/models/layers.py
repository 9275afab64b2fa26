"""Layers shared by every network: PyTorch-semantics BatchNorm and explicitly padded convs.

BatchNorm is written here rather than taken from `flax.linen` for two reasons: the teacher's
BN-statistics loss needs the moments of each BN *input* captured in the same forward pass (into
the `bn_moments` collection, same tree layout as `batch_stats`), and PyTorch stores the unbiased
batch variance in its running average, which a converted teacher or an exported student expects.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpsc_jax.dtypes import at_least_float32
from cpsc_jax.models.conv import conv_general_dilated

BN_MOMENTS = "bn_moments"


def batch_moments(x: jax.Array, axis_name: Optional[str] = None):
    """Per-channel mean and biased variance over every axis but the last; global over devices."""
    axes = tuple(range(x.ndim - 1))
    x = at_least_float32(x)
    mean = jnp.mean(x, axes)
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
    # Two-pass variance around the global mean: better conditioned than E[x^2] - E[x]^2.
    var = jnp.mean(jnp.square(x - mean), axes)
    if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
    return mean, var


class BatchNorm(nn.Module):
    """BatchNorm over the last axis with PyTorch semantics.

    momentum follows Flax (new = momentum * old + (1 - momentum) * batch), so PyTorch's 0.1 is 0.9.
    When the `bn_moments` collection is mutable, the batch moments of the input are stored there
    (also in inference mode), which is how the teacher's BN statistics are read inside jit.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    use_affine: bool = True
    axis_name: Optional[str] = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        capture = self.is_mutable_collection(BN_MOMENTS) and not self.is_initializing()
        if train or capture:
            mean, var = batch_moments(x, self.axis_name)
        if capture:
            self.put_variable(BN_MOMENTS, "mean", mean)
            self.put_variable(BN_MOMENTS, "var", var)
        if train:
            if not self.is_initializing():
                count = x.size // features
                if self.axis_name is not None:
                    count = count * jax.lax.psum(1, self.axis_name)
                unbiased = var * (count / max(count - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (at_least_float32(x) - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_affine:
            y = y * self.param("scale", nn.initializers.ones, (features,), jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return y.astype(self.dtype or x.dtype)


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, use_bias: bool = False,
         dtype: Any = None, name: Optional[str] = None) -> nn.Conv:
    """A PyTorch-style Conv2d: symmetric explicit padding (Flax 'SAME' pads (0, 1) at stride 2).

    Same parameters and forward as a plain `nn.Conv`; on CPU its gradients are built as
    standard-form convolutions (see `cpsc_jax.models.conv`), which XLA:CPU runs fast also
    inside `lax.scan`."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                   dtype=dtype, conv_general_dilated=conv_general_dilated, name=name)


def max_pool(x: jax.Array, size: int = 2) -> jax.Array:
    return nn.max_pool(x, (size, size), strides=(size, size))


def global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))
