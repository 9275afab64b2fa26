"""The models' conv: same parameters, forward and gradients as a plain nn.Conv / lax autodiff,
and (on CPU) only standard-form convolutions in a compiled lax.scan body."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cpsc_jax.models.conv import (CANONICAL, FEW_INPUT_CHANNELS, FEW_OUTPUT_CHANNELS,
                                  canonical_conv, conv_general_dilated)
from cpsc_jax.models.layers import conv

# (batch, size, c_in, c_out, kernel, stride, padding); the stride-2 cases include sizes where
# (size + 2 * padding - kernel) % stride != 0 (the last input row/column is in no window).
CASES = [
    (2, 8, 3, 4, 3, 1, 1),
    (2, 8, 3, 4, 3, 2, 1),
    (2, 7, 3, 4, 3, 2, 1),
    (2, 8, 3, 4, 1, 2, 0),
    (2, 9, 2, 3, 5, 1, 0),
    (2, 8, 2, 3, 5, 1, 2),
    (2, 8, 2, 3, 5, 2, 2),
    # One input channel (forward as a sum of windows), one output channel (dX likewise), and
    # either side of FEW_INPUT_CHANNELS (dX by col2im up to it).
    (2, 8, 1, 4, 3, 1, 1),
    (2, 7, 1, 4, 3, 2, 1),
    (2, 9, 1, 3, 5, 1, 0),
    (2, 8, 12, 1, 3, 1, 1),
    (2, 7, 12, 1, 3, 2, 1),
    (2, 8, 1, 1, 3, 2, 1),
    (2, 8, FEW_INPUT_CHANNELS, 3, 3, 2, 1),
    (2, 8, FEW_INPUT_CHANNELS + 1, 3, 3, 2, 1),
    # Either side of FEW_OUTPUT_CHANNELS (forward by one dot and a sum of windows inside it).
    (2, 8, FEW_INPUT_CHANNELS + 1, FEW_OUTPUT_CHANNELS[1], 3, 1, 1),
    (2, 7, FEW_INPUT_CHANNELS + 1, FEW_OUTPUT_CHANNELS[1] + 1, 3, 2, 1),
]


def _inputs(b, size, c_in, c_out, k, dtype=jnp.float32):
    x = jax.random.normal(jax.random.PRNGKey(0), (b, size, size, c_in)).astype(dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), (k, k, c_in, c_out)).astype(dtype)
    return x, w


def _loss(conv_fn, stride, pad):
    # sin makes the cotangent depend on the output, so every gradient entry is exercised.
    return lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w, (stride, stride), ((pad, pad), (pad, pad)))
                                        .astype(jnp.promote_types(x.dtype, jnp.float32))))


def _lax_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=CANONICAL)


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_lax_autodiff(case):
    b, size, c_in, c_out, k, s, p = case
    x, w = _inputs(b, size, c_in, c_out, k)
    # Compiled whole: op by op, each of canonical_conv's ops would compile alone.
    got, want = (jax.jit(canonical_conv, static_argnums=(2, 3))(x, w, (s, s), ((p, p), (p, p))),
                 jax.jit(_lax_conv, static_argnums=(2, 3))(x, w, (s, s), ((p, p), (p, p))))
    if c_in == 1 or FEW_OUTPUT_CHANNELS[0] <= c_out <= FEW_OUTPUT_CHANNELS[1]:
        # A sum of windows: the same terms, summed in another order.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(got, want)
    want = jax.jit(jax.grad(_loss(_lax_conv, s, p), (0, 1)))(x, w)
    got = jax.jit(jax.grad(_loss(canonical_conv, s, p), (0, 1)))(x, w)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    # In float64 the summation order no longer hides anything: equal to 1e-10.
    with jax.enable_x64(True):
        x, w = (jnp.asarray(np.asarray(a), jnp.float64) for a in (x, w))
        want = jax.jit(jax.grad(_loss(_lax_conv, s, p), (0, 1)))(x, w)
        got = jax.jit(jax.grad(_loss(canonical_conv, s, p), (0, 1)))(x, w)
        for g, r in zip(got, want):
            assert g.dtype == jnp.float64
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]])
def test_bfloat16_gradient_dtypes_match_lax_autodiff(case):
    b, size, c_in, c_out, k, s, p = case
    x, w = _inputs(b, size, c_in, c_out, k, jnp.bfloat16)
    # lax's gradient op by op, each result rounded to bfloat16 (under jit XLA drops some of
    # those roundings around lax's own convolutions, not around the sum-of-windows forms).
    want = jax.grad(_loss(_lax_conv, s, p), (0, 1))(x, w)
    got = jax.jit(jax.grad(_loss(canonical_conv, s, p), (0, 1)))(x, w)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   rtol=2e-2, atol=2e-2)


def _scan_grads(module, variables, x, length=2):
    """Parameter and input gradients, summed over a jitted lax.scan of `length` steps."""
    def loss(params, x):
        return jnp.sum(jnp.sin(module.apply({"params": params}, x)))

    @jax.jit
    def run(params, x):
        def body(acc, i):
            gp, gx = jax.grad(loss, (0, 1))(params, x * (1.0 + 0.5 * i))
            return jax.tree.map(jnp.add, acc, (gp, gx)), None
        zeros = jax.tree.map(jnp.zeros_like, (params, x))
        return lax.scan(body, zeros, jnp.arange(length, dtype=jnp.float32))[0]

    return run(variables["params"], x)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6]])
def test_layer_matches_plain_flax_conv_inside_scan(case):
    b, size, c_in, c_out, k, s, p = case
    x, _ = _inputs(b, size, c_in, c_out, k)
    ours = conv(c_out, k, s, p, use_bias=True)
    plain = nn.Conv(c_out, (k, k), strides=(s, s), padding=((p, p), (p, p)), use_bias=True)
    variables = ours.init(jax.random.PRNGKey(2), x)
    # Same parameter tree (names, shapes) as a plain nn.Conv: conversion and checkpoints rely on it.
    ref_vars = plain.init(jax.random.PRNGKey(2), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref_vars)
    # Equal up to summation order (few output channels: a dot and a sum of windows).
    np.testing.assert_allclose(ours.apply(variables, x), plain.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
    (gp, gx), (rp, rx) = _scan_grads(ours, variables, x), _scan_grads(plain, variables, x)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(gp[name], rp[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)


def test_unsupported_convolutions_fall_back_to_lax():
    x = jnp.ones((1, 6, 6, 4))
    w = jnp.ones((3, 3, 2, 4))
    grouped = conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=CANONICAL,
                                   feature_group_count=2)
    ref = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=CANONICAL,
                                   feature_group_count=2)
    np.testing.assert_array_equal(grouped, ref)
    g = jax.grad(lambda w: jnp.sum(conv_general_dilated(
        x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=CANONICAL,
        feature_group_count=2) ** 2))(w)
    assert g.shape == w.shape


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the custom VJP is used on CPU only")
@pytest.mark.parametrize("stride,kernel,pad", [(1, 3, 1), (2, 3, 1), (2, 1, 0)])
def test_scan_body_has_only_standard_form_convolutions(stride, kernel, pad):
    """XLA:CPU's fast path takes `b01f_01io->b01f` convolutions; autodiff's own gradient forms
    (e.g. `f01b_i01o->01bf` for dW) are what ran slowly inside loop bodies."""
    # Enough channels for the forward and dX to be convolutions too (with few output channels
    # the forward is a dot and a sum of windows, with few input channels dX is col2im).
    layer = conv(FEW_OUTPUT_CHANNELS[1] + 1, kernel, stride, pad)
    x = jnp.ones((2, 8, 8, FEW_INPUT_CHANNELS + 1))
    variables = layer.init(jax.random.PRNGKey(0), x)

    def run(params, x):
        def body(carry, _):
            p, x = carry
            gp, gx = jax.grad(lambda p, x: jnp.sum(jnp.tanh(layer.apply({"params": p}, x))),
                              (0, 1))(p, x)
            return (jax.tree.map(lambda a, b: a - 1e-3 * b, p, gp), x - 1e-3 * gx), None
        return lax.scan(body, (params, x), None, length=2)[0]

    hlo = jax.jit(run).lower(variables["params"], x).compile().as_text()
    labels = re.findall(r"\bconvolution\(.*?dim_labels=([\w>-]+)", hlo)
    assert len(labels) >= 3, hlo           # forward, dX, dW
    assert set(labels) == {"b01f_01io->b01f"}, labels


# ----------------------------------------------------------------------------- the switch


def _conv_forms(fn, *args):
    """The dimension numbers of every convolution in jit(fn)'s StableHLO (before XLA)."""
    text = jax.jit(fn).lower(*args).as_text()
    return set(re.findall(r"stablehlo\.convolution.*?dim_numbers = (\[.*?\]x\[.*?\]->\[.*?\])",
                          text))


STANDARD_FORM = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"


@pytest.mark.parametrize("gradients,custom", [("stock", False), ("custom", True),
                                              ("auto", jax.default_backend() == "cpu")])
def test_conv_gradients_setting_selects_the_backward_pass(gradients, custom):
    """With the custom VJP every gradient convolution is in the standard form; with lax's own
    gradients dX and dW are convolutions in other layouts."""
    from cpsc_jax.models.conv import conv_function
    from cpsc_jax.models.layers import LayerOptions
    x, w = _inputs(2, 8, 3, 4, 3)
    fn = lambda x, w, s, p: conv_function(gradients)(x, w, s, p, dimension_numbers=CANONICAL)
    forms = _conv_forms(jax.grad(_loss(fn, 2, 1), (0, 1)), x, w)
    assert (forms == {STANDARD_FORM}) == custom, forms
    layer = conv(4, 3, 2, 1, options=LayerOptions(conv_gradients=gradients))
    variables = layer.init(jax.random.PRNGKey(0), x)
    forms = _conv_forms(jax.grad(lambda v, x: jnp.sum(layer.apply(v, x) ** 2), (0, 1)),
                        variables, x)
    assert (forms == {STANDARD_FORM}) == custom, forms
    with pytest.raises(ValueError, match="conv_gradients must be one of"):
        conv_function("fast")


# ----------------------------------------------------------------------------- XLA:CPU options


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compiler options")
def test_data_parallel_compiles_convolutions_off_ynnpack():
    """The data-parallel wrapper's executables keep convolutions off YNNPACK where this jaxlib
    supports it (seen in the optimised HLO); the benchmark's override puts them back."""
    from cpsc_jax.infra import runtime
    from cpsc_jax.tools.benchmark import YNN_CONVOLUTION_OPTIONS
    from cpsc_jax.models.conv import XLA_CPU_CONV_OPTIONS, xla_cpu_conv_options, ynn_fusions
    options = xla_cpu_conv_options()
    if not options:
        pytest.skip("this jaxlib does not take convolutions off YNNPACK by compiler option")
    assert options == XLA_CPU_CONV_OPTIONS

    def step(w, x, ids):
        del ids
        y = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=CANONICAL)
        return w, jax.lax.pmean(y, runtime.AXIS)   # no reduction for YNNPACK to fuse it into

    fn = runtime.data_parallel(step, num_unmapped=2)
    topo = runtime.topology(max_devices=1)
    lowered = fn.lower(jnp.ones((3, 3, 32, 32)), jnp.ones((8, 16, 16, 32)), topo.device_ids())
    assert ynn_fusions(lowered.compile().as_text())["convolution"] == 0
    back_on = lowered.compile(compiler_options=YNN_CONVOLUTION_OPTIONS)
    assert ynn_fusions(back_on.as_text())["convolution"] == 1


def test_unknown_xla_options_fall_back_silently():
    from cpsc_jax.models.conv import _takes_convs_off_ynnpack
    assert not _takes_convs_off_ynnpack((("xla_cpu_experimental_ynn_fusion_type", "NO_SUCH_TYPE"),))
    assert not _takes_convs_off_ynnpack((("xla_no_such_option_at_all", "1"),))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compiler options")
def test_options_that_change_more_than_convolutions_are_refused():
    """The option sets XLA's whole list of YNNPACK fusion types: one that also took reductions
    (or dots) off YNNPACK would do more than XLA_FLAGS' `-individual_convolution`."""
    from cpsc_jax.models.conv import _takes_convs_off_ynnpack, ynn_fusions
    x = jnp.ones((8, 16, 16, 32))
    if not ynn_fusions(jax.jit(lambda x: jnp.sum(x, (0, 1, 2))).lower(x).compile().as_text())[
            "reduce"]:
        pytest.skip("this jaxlib puts no reduction on YNNPACK by default")
    dots_only = (("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),)
    assert not _takes_convs_off_ynnpack(dots_only)
