"""Layers shared by every network: PyTorch-semantics BatchNorm and explicitly padded convs.

BatchNorm is written here rather than taken from `flax.linen` for three reasons: the teacher's
BN-statistics loss needs the moments of each BN *input* captured in the same forward pass (into
the `bn_moments` collection, same tree layout as `batch_stats`); PyTorch stores the unbiased
batch variance in its running average, which a converted teacher or an exported student
expects; and across devices the moments take one all-reduce per layer and direction (forward
and backward), with activations kept in their own dtype (bfloat16 under mixed precision).

`LayerOptions` carries the run's choices of how layers compute (`config.conv_gradients`,
`config.bn_sync`); every network takes it as its `options` attribute and hands it to each conv
and BatchNorm, like `axis_name` and `dtype`.
"""
import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpsc_jax.dtypes import at_least_float32
from cpsc_jax.models.conv import CONV_GRADIENTS, conv_function

BN_MOMENTS = "bn_moments"
BN_SYNC = ("global", "local")


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """How the layers of a network compute.

    conv_gradients: "auto" (custom VJP on CPU, lax's gradients elsewhere), "stock" or "custom"
        (see `cpsc_jax.models.conv`); the same numbers up to float rounding.
    bn_sync: "global" (BatchNorm moments of the global batch, across devices) or "local" (each
        device's own batch, as unsynchronised data parallelism; the running averages are still
        averaged across devices so that every device holds the same ones).
    """

    conv_gradients: str = "auto"
    bn_sync: str = "global"

    def __post_init__(self):
        if self.conv_gradients not in CONV_GRADIENTS:
            raise ValueError(f"conv_gradients must be one of {', '.join(CONV_GRADIENTS)}, got "
                             f"{self.conv_gradients!r}")
        if self.bn_sync not in BN_SYNC:
            raise ValueError(f"bn_sync must be one of {', '.join(BN_SYNC)}, got {self.bn_sync!r}")

    @classmethod
    def from_config(cls, config) -> "LayerOptions":
        return cls(config.conv_gradients, config.bn_sync)


DEFAULT_OPTIONS = LayerOptions()


# ----------------------------------------------------------------------------- moments


def _reduction_axes(x):
    return tuple(range(x.ndim - 1))


@jax.custom_vjp
def _shifted_sums(x: jax.Array, shift: jax.Array) -> jax.Array:
    """[sum(x - shift), sum((x - shift)^2)] per channel ([2, C]), in float32 or wider."""
    d = at_least_float32(x) - shift
    axes = _reduction_axes(x)
    return jnp.stack([jnp.sum(d, axes), jnp.sum(jnp.square(d), axes)])


def _shifted_sums_fwd(x, shift):
    # Saves x in its own dtype: autodiff would save x - shift in float32 (twice the memory of
    # a bfloat16 activation); the backward pass recomputes it.
    return _shifted_sums(x, shift), (x, shift)


def _shifted_sums_bwd(residuals, g):
    x, shift = residuals
    d = at_least_float32(x) - shift
    dx = g[0] + 2.0 * d * g[1]
    dshift = -jnp.sum(dx, _reduction_axes(x))
    return dx.astype(x.dtype), dshift.astype(shift.dtype)


_shifted_sums.defvjp(_shifted_sums_fwd, _shifted_sums_bwd)


def batch_moments(x: jax.Array, axis_name: Optional[str] = None,
                  shift: Optional[jax.Array] = None):
    """Per-channel mean and biased variance over every axis but the last; global over devices
    when `axis_name` is given.

    One pass and one all-reduce (in the backward pass too, psum's transpose): the sums of
    x - shift and of its square, stacked. Shifting by a value near the mean keeps E[d^2] -
    E[d]^2 from cancelling; BatchNorm passes its running mean, the same on every device."""
    x32 = at_least_float32(x)
    shift = jnp.zeros(x.shape[-1:], x32.dtype) if shift is None else shift.astype(x32.dtype)
    sums = _shifted_sums(x, jax.lax.stop_gradient(shift))
    count = x.size // x.shape[-1]
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
        count = count * jax.lax.axis_size(axis_name)
    mean_d, mean_d2 = sums[0] / count, sums[1] / count
    var = jnp.maximum(mean_d2 - jnp.square(mean_d), 0.0)
    return shift + mean_d, var


# ----------------------------------------------------------------------------- normalisation


def _sum_to(a: jax.Array, shape) -> jax.Array:
    """`a` summed over the axes that broadcasting an array of `shape` to `a.shape` expands."""
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                      if n == 1 and a.shape[lead + i] != 1)
    return jnp.sum(a, axes).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def normalize(x, mean, inv_std, scale, bias, dtype):
    """((x - mean) * inv_std) * scale + bias in float32 (or wider), returned in `dtype`.

    mean, inv_std: [C]; scale, bias: [C], or per example [B, 1, 1, C] (conditional BN), or None.
    Its VJP saves x in its own dtype and recomputes x - mean when it runs, so a bfloat16
    activation is kept once, in bfloat16 (autodiff would keep float32 copies of x - mean and
    of the normalised x)."""
    y = (at_least_float32(x) - mean) * inv_std
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


def _normalize_fwd(x, mean, inv_std, scale, bias, dtype):
    return normalize(x, mean, inv_std, scale, bias, dtype), (x, mean, inv_std, scale, bias)


def _normalize_bwd(dtype, residuals, g):
    x, mean, inv_std, scale, bias = residuals
    axes = _reduction_axes(x)
    g = g.astype(jnp.promote_types(g.dtype, mean.dtype))
    centred = at_least_float32(x) - mean
    d_bias = None if bias is None else _sum_to(g, bias.shape).astype(bias.dtype)
    d_scale = None
    if scale is not None:
        d_scale = _sum_to(g * (centred * inv_std), scale.shape).astype(scale.dtype)
        g = g * scale
    return ((g * inv_std).astype(x.dtype),
            (-jnp.sum(g, axes) * inv_std).astype(mean.dtype),
            jnp.sum(g * centred, axes).astype(inv_std.dtype),
            d_scale, d_bias)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class BatchNorm(nn.Module):
    """BatchNorm over the last axis with PyTorch semantics.

    momentum follows Flax (new = momentum * old + (1 - momentum) * batch), so PyTorch's 0.1 is 0.9.
    When the `bn_moments` collection is mutable, the batch moments of the input are stored there
    (also in inference mode), which is how the teacher's BN statistics are read inside jit.
    Statistics are float32 (or wider); the output has `dtype` (default: the input's).
    With `use_affine=False`, `scale` and `bias` may be given per example ([B, 1, 1, C]: the
    conditional BN) and are applied in the same pass.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    use_affine: bool = True
    axis_name: Optional[str] = None
    dtype: Any = None
    options: LayerOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, scale=None, bias=None) -> jax.Array:
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        capture = self.is_mutable_collection(BN_MOMENTS) and not self.is_initializing()
        synced = self.axis_name is not None and self.options.bn_sync == "global"
        if train or capture:
            mean, var = batch_moments(x, self.axis_name if synced else None, ra_mean.value)
        if capture:
            self.put_variable(BN_MOMENTS, "mean", mean)
            self.put_variable(BN_MOMENTS, "var", var)
        if train:
            if not self.is_initializing():
                count = x.size // features
                if synced:
                    count = count * jax.lax.axis_size(self.axis_name)
                unbiased = var * (count / max(count - 1, 1))
                batch = (mean, unbiased)
                if self.axis_name is not None and not synced:
                    # Per-device moments: average them for the running statistics, which must
                    # be the same on every device (the train state is returned unreplicated).
                    batch = tuple(jax.lax.pmean(jax.lax.stop_gradient(jnp.stack(batch)),
                                                self.axis_name))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * batch[0]
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * batch[1]
        else:
            mean, var = ra_mean.value, ra_var.value
        if self.use_affine:
            if scale is not None or bias is not None:
                raise ValueError("scale and bias are given only to a BatchNorm without affine "
                                 "parameters (use_affine=False)")
            scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
            bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return normalize(x, mean, jax.lax.rsqrt(var + self.epsilon), scale, bias,
                         jnp.dtype(self.dtype or x.dtype))


def with_options(module: nn.Module, options: LayerOptions) -> nn.Module:
    """`module` with its layers computing as `options` say. The project's networks take them as
    their `options` attribute; a network from elsewhere (e.g. a user's Flax teacher) is
    returned as it is."""
    if isinstance(getattr(module, "options", None), LayerOptions):
        return module.clone(options=options)
    return module


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, use_bias: bool = False,
         dtype: Any = None, name: Optional[str] = None,
         options: LayerOptions = DEFAULT_OPTIONS) -> nn.Conv:
    """A PyTorch-style Conv2d: symmetric explicit padding (Flax 'SAME' pads (0, 1) at stride 2).

    Same parameters and forward as a plain `nn.Conv`; its gradients follow
    `options.conv_gradients` (on CPU by default standard-form convolutions, see
    `cpsc_jax.models.conv`, which XLA:CPU runs fast also inside `lax.scan`)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                   dtype=dtype, conv_general_dilated=conv_function(options.conv_gradients),
                   name=name)


def max_pool(x: jax.Array, size: int = 2) -> jax.Array:
    """size x size max pooling, stride size, no padding (PyTorch's max_pool2d(x, size)).

    The maximum of the size*size strided slices (rows and columns past the last full window
    dropped, as PyTorch does): elementwise, so XLA fuses it with its producers and its gradient
    is a mask of the maxima, where `nn.max_pool` builds index arrays and a variadic
    reduce-window, and a reshape + max lets XLA:CPU hand the fused producers to a slow YNNPACK
    reduction (docs/RESULTS.md, "Figures behind design choices"). Tied maxima share the
    gradient (PyTorch gives it to the first); after a ReLU ties
    are zeros, whose gradient the ReLU drops either way."""
    ho, wo = x.shape[1] // size, x.shape[2] // size
    x = x[:, :ho * size, :wo * size]
    return functools.reduce(jnp.maximum, [x[:, i::size, j::size]
                                          for i in range(size) for j in range(size)])


def global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))
