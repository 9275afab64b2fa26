"""Class-conditional generator (the released "GeneratorD") and categorical conditional BatchNorm."""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpsc_jax.models.layers import DEFAULT_OPTIONS, BatchNorm, LayerOptions, conv


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then a per-class scale gamma[y] and shift beta[y]
    (applied in the BatchNorm's own pass: no float32 copy of the activation is kept)."""

    num_classes: int
    momentum: float = 0.9     # PyTorch momentum 0.1
    epsilon: float = 1e-3
    axis_name: Optional[str] = None
    dtype: Any = None
    options: LayerOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, y, train: bool = True):
        features = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (self.num_classes, features), jnp.float32)
        beta = self.param("beta", nn.initializers.zeros, (self.num_classes, features), jnp.float32)
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (features,)
        bn = BatchNorm(self.momentum, self.epsilon, use_affine=False, axis_name=self.axis_name,
                       dtype=self.dtype, options=self.options, name="bn")
        return bn(x, train, gamma[y].reshape(shape), beta[y].reshape(shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling of [B, H, W, C] by `factor` in H and W."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def _upsample_fwd(x, factor):
    return upsample_nearest(x, factor), None


def _upsample_bwd(factor, _, g):
    # The sum over each factor x factor block as adds of strided slices, not autodiff's
    # reduce: XLA:CPU fuses such a reduce with the convolution that produces g (the next conv's
    # input gradient) into one YNNPACK call, far slower than the two apart (docs/RESULTS.md,
    # "Figures behind design choices").
    parts = [g[:, i::factor, j::factor] for i in range(factor) for j in range(factor)]
    return (functools.reduce(jnp.add, parts),)


upsample_nearest.defvjp(_upsample_fwd, _upsample_bwd)


class ConditionalGenerator(nn.Module):
    """z, y -> image in the classifiers' normalised input space.

    For 32x32 (num_upsamples=2) this is the released generator: Linear to 8x8x(2 ngf), CBN,
    [up, conv 2ngf, CBN, LReLU], [up, conv ngf, CBN, LReLU], conv c, tanh, CBN. The 64x64 variant
    adds one more up+conv stage (nearest upsample + conv instead of transposed convs, which are
    slow in XLA). Any image size divisible by 2**num_upsamples works (the digits default is 8x8).
    """

    num_classes: int
    img_size: int = 32
    channels: int = 3
    nz: int = 256
    ngf: int = 64
    num_upsamples: int = 2
    axis_name: Optional[str] = None
    dtype: Any = None
    options: LayerOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, z, y, train: bool = True):
        init = self.img_size // 2 ** self.num_upsamples
        if init * 2 ** self.num_upsamples != self.img_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by 2**{self.num_upsamples}")
        cbn = lambda name: ConditionalBatchNorm(self.num_classes, axis_name=self.axis_name,
                                                dtype=self.dtype, options=self.options, name=name)
        h = nn.Dense(2 * self.ngf * init * init, dtype=self.dtype, name="l1")(z.astype(self.dtype or z.dtype))
        h = h.reshape(z.shape[0], init, init, 2 * self.ngf)
        h = cbn("bn0")(h, y, train)
        for i in range(1, self.num_upsamples + 1):
            width = self.ngf if i == self.num_upsamples else 2 * self.ngf
            h = upsample_nearest(h)
            h = conv(width, 3, 1, 1, use_bias=True, dtype=self.dtype, name=f"conv{i}",
                     options=self.options)(h)
            h = nn.leaky_relu(cbn(f"bn{i}")(h, y, train), 0.2)
        h = conv(self.channels, 3, 1, 1, use_bias=True, dtype=self.dtype,
                 name=f"conv{self.num_upsamples + 1}", options=self.options)(h)
        h = jnp.tanh(h)
        # The released code applies a CBN after the tanh; kept for faithfulness.
        return cbn(f"bn{self.num_upsamples + 1}")(h, y, train)
