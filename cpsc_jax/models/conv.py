"""A 2-D convolution whose backward pass XLA:CPU runs on its fast path, also inside loops.

Inside a `lax.scan` body XLA:CPU runs the gradients JAX's autodiff writes for an NHWC/HWIO
convolution on a generic path about a hundred times slower than outside (docs/RESULTS.md,
"Figures behind design choices"). `canonical_conv` has the same forward and a custom VJP that
writes both gradients as standard-form convolutions; convolutions with very few input or output
channels, where XLA:CPU's kernels fall furthest behind, are computed from shifted windows.
`conv_function(config.conv_gradients)` is the drop-in for `lax.conv_general_dilated` that
`flax.linen.Conv` takes ("auto": the custom VJP on CPU only; reverse-mode autodiff only), and
`xla_cpu_conv_options()` keeps these convolutions on XLA's own kernels instead of YNNPACK.
"""
import functools
import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

CANONICAL = ("NHWC", "HWIO", "NHWC")

Padding = Tuple[Tuple[int, int], Tuple[int, int]]


def _plain_conv(x, w, strides, padding, precision):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=CANONICAL,
                                    precision=precision)


# Up to this many input channels dX is computed by col2im (`_input_grad_col2im`), above it as a
# transposed convolution: faster for a handful of input channels, slower for a generator's 32
# (measured on XLA:CPU; docs/RESULTS.md, "Figures behind design choices").
FEW_INPUT_CHANNELS = 8
# Output-channel counts whose forward is one dot and a sum of windows
# (`_few_output_channels_conv`): faster than XLA:CPU's convolution for 2-4 output channels,
# slower for 1 or 16 (docs/RESULTS.md, "Figures behind design choices"), hence the bounds.
FEW_OUTPUT_CHANNELS = (2, 4)


def _accumulator(dtype):
    """Where the sum-of-windows forms accumulate: float32 at least (as XLA's convolutions do)."""
    return jnp.promote_types(dtype, jnp.float32)


def _output_size(in_hw, k_hw, strides, padding):
    return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(in_hw, k_hw, strides, padding))


def _window(x_padded, i, j, out_hw, strides):
    """The padded array under kernel offset (i, j), for every output position: [B, H_out, W_out, C]."""
    (sh, sw), (ho, wo) = strides, out_hw
    return lax.slice(x_padded, (0, i, j, 0),
                     (x_padded.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1,
                      x_padded.shape[3]), (1, sh, sw, 1))


def _pad_spatial(x, padding):
    return jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))


def _single_channel_conv(x, w, strides, padding):
    """The forward for C_in = 1: sum over offsets of window * kernel row (an outer product)."""
    kh, kw = w.shape[:2]
    out_hw = _output_size(x.shape[1:3], (kh, kw), strides, padding)
    acc = _accumulator(x.dtype)
    xp = _pad_spatial(x.astype(acc), padding)
    w = w.astype(acc)
    terms = [_window(xp, i, j, out_hw, strides) * w[i, j, 0] for i in range(kh) for j in range(kw)]
    return functools.reduce(jnp.add, terms)


def _few_output_channels_conv(x, w, strides, padding, precision):
    """The forward for few output channels: one dot h = x @ W to [B, H, W, kh*kw*C_out], then
    the sum over offsets of each offset's slice of h under its window."""
    kh, kw, c_in, c_out = w.shape
    out_hw = _output_size(x.shape[1:3], (kh, kw), strides, padding)
    h = jnp.dot(_pad_spatial(x, padding), w.transpose(2, 0, 1, 3).reshape(c_in, kh * kw * c_out),
                precision=precision, preferred_element_type=_accumulator(x.dtype))
    terms = [_window(h, i, j, out_hw, strides)[..., (i * kw + j) * c_out:(i * kw + j + 1) * c_out]
             for i in range(kh) for j in range(kw)]
    return functools.reduce(jnp.add, terms)


def _forward(x, w, strides, padding, precision):
    if x.shape[3] == 1:
        return _single_channel_conv(x, w, strides, padding).astype(x.dtype)
    if FEW_OUTPUT_CHANNELS[0] <= w.shape[3] <= FEW_OUTPUT_CHANNELS[1]:
        return _few_output_channels_conv(x, w, strides, padding, precision).astype(x.dtype)
    return _plain_conv(x, w, strides, padding, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def canonical_conv(x: jax.Array, w: jax.Array, strides: Tuple[int, int], padding: Padding,
                   precision: Any = None) -> jax.Array:
    """NHWC x HWIO -> NHWC convolution, no dilation, one feature group; explicit padding with
    0 <= pad < kernel size on every side. Same forward as `lax.conv_general_dilated` (for one
    input channel or few output channels computed as a sum of windows: equal up to the order
    of the float sums).

    The custom VJP builds the gradients in XLA:CPU's standard `b01f_01io->b01f` form:
      * dX: the cotangent, dilated by the stride, convolved with the spatially flipped kernel
        whose in/out features are swapped (a transposed convolution);
      * dW: the input with batch and features exchanged ([C_in, H, W, B]) convolved with the
        cotangent as a kernel ([H_out, W_out, B, C_out], dilated by the stride).
    With few channels, from shifted windows instead: one input channel, the forward is a sum
    over the kernel's offsets of an input window times that offset's kernel row;
    `FEW_OUTPUT_CHANNELS` output channels, one dot x @ W whose offset slices are summed under
    their windows; at most `FEW_INPUT_CHANNELS` input channels, dX is col2im; one output
    channel, dX is the same sum of windows on g. dW stays a convolution (per-offset products
    measured slower)."""
    return _forward(x, w, strides, padding, precision)


def _canonical_conv_fwd(x, w, strides, padding, precision):
    return _forward(x, w, strides, padding, precision), (x, w)


def _input_grad(g, w, in_hw, strides, padding, precision):
    """dX: transposed convolution of g with the flipped, in/out-swapped kernel. With one output
    channel that convolution has one input channel (g): the sum-of-windows form
    (`_single_channel_conv`) on g dilated by the stride."""
    pads = []
    for size, k, s, (lo, _), out in zip(in_hw, w.shape[:2], strides, padding, g.shape[1:3]):
        # Output length (out-1)*s+1 + pad_lo + pad_hi - k + 1 must equal the input length.
        pads.append((k - 1 - lo, size - (out - 1) * s - 1 + lo))
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2).astype(g.dtype)
    if w.shape[3] == 1:
        dilated = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), (0, 0, strides[0] - 1),
                                                      (0, 0, strides[1] - 1), (0, 0, 0)])
        return _single_channel_conv(dilated, w_t, (1, 1), pads)
    return lax.conv_general_dilated(g, w_t, (1, 1), pads, lhs_dilation=strides,
                                    dimension_numbers=CANONICAL, precision=precision)


def _kernel_grad(x, g, k_hw, strides, padding, precision):
    """dW: the batch is the contraction axis, so exchange it with the features of x and g."""
    pads = []
    for axis, (k, s, (lo, _), out) in enumerate(zip(k_hw, strides, padding, g.shape[1:3])):
        # Output length x_len + lo + hi - ((out-1)*s+1) + 1 must equal k.
        hi = k + (out - 1) * s - x.shape[1 + axis] - lo
        if hi < 0:
            # The last -hi rows/columns of x fall outside every window (stride remainder).
            x = lax.slice_in_dim(x, 0, x.shape[1 + axis] + hi, axis=1 + axis)
            hi = 0
        pads.append((lo, hi))
    x_t = x.astype(g.dtype).transpose(3, 1, 2, 0)        # [C_in, H, W, B]
    g_t = g.transpose(1, 2, 0, 3)                        # [H_out, W_out, B, C_out]
    dw = lax.conv_general_dilated(x_t, g_t, (1, 1), pads, rhs_dilation=strides,
                                  dimension_numbers=CANONICAL, precision=precision)
    return dw.transpose(1, 2, 0, 3)                      # [kh, kw, C_in, C_out]


def _input_grad_col2im(g, w, in_hw, strides, padding, precision):
    """dX for few input channels: h = g @ W^T holds, per output position, what flows back to each
    (offset, channel) of its window; each offset's slice of h is added back at its window."""
    kh, kw, c_in, c_out = w.shape
    b, ho, wo, _ = g.shape
    h = jnp.dot(g, w.reshape(kh * kw * c_in, c_out).T.astype(g.dtype), precision=precision,
                preferred_element_type=_accumulator(g.dtype))
    h = h.reshape(b, ho, wo, kh, kw, c_in)
    padded_hw = [n + lo + hi for n, (lo, hi) in zip(in_hw, padding)]
    terms = []
    for i in range(kh):
        for j in range(kw):
            # Rows i, i+s, ..., i+(ho-1)*s of the padded input (interior padding s-1).
            config = [(0, 0, 0)]
            for start, n_out, s, size in ((i, ho, strides[0], padded_hw[0]),
                                          (j, wo, strides[1], padded_hw[1])):
                config.append((start, size - start - ((n_out - 1) * s + 1), s - 1))
            config.append((0, 0, 0))
            terms.append(lax.pad(h[:, :, :, i, j, :], jnp.zeros((), h.dtype), config))
    dx = functools.reduce(jnp.add, terms)
    (top, _), (left, _) = padding
    return dx[:, top:top + in_hw[0], left:left + in_hw[1], :].astype(g.dtype)


def _canonical_conv_bwd(strides, padding, precision, residuals, g):
    x, w = residuals
    input_grad = _input_grad_col2im if x.shape[3] <= FEW_INPUT_CHANNELS else _input_grad
    dx = input_grad(g, w, x.shape[1:3], strides, padding, precision)
    dw = _kernel_grad(x, g, w.shape[:2], strides, padding, precision)
    # Same dtypes as lax's own transpose rules: each gradient in its primal's dtype.
    return dx.astype(x.dtype), dw.astype(w.dtype)


canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def _canonical_args(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, batch_group_count,
                    preferred_element_type) -> Optional[Tuple[Tuple[int, int], Padding]]:
    """(strides, padding) if `canonical_conv` computes this convolution, else None."""
    if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
        return None
    if preferred_element_type is not None:
        return None
    if any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())):
        return None
    if (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            != lax.conv_dimension_numbers(lhs.shape, rhs.shape, CANONICAL)):
        return None
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if not all(0 <= p < k for (lo, hi), k in zip(pads, rhs.shape[:2]) for p in (lo, hi)):
        return None
    return strides, pads


CONV_GRADIENTS = ("auto", "stock", "custom")


def uses_custom_gradients(gradients: str) -> bool:
    """Whether convs with this `conv_gradients` setting take `canonical_conv`'s backward pass.

    "auto" decides at trace time by the default backend: the custom VJP on CPU only, since
    XLA:GPU already maps lax's own gradient convolutions to cuDNN's backward-data and
    backward-filter kernels, which explicit transposes would only get in the way of."""
    if gradients not in CONV_GRADIENTS:
        raise ValueError(f"conv_gradients must be one of {', '.join(CONV_GRADIENTS)}, got "
                         f"{gradients!r}")
    if gradients == "auto":
        return jax.default_backend() == "cpu"
    return gradients == "custom"


def _conv_general_dilated(gradients: str, lhs, rhs, window_strides: Sequence[int], padding,
                          lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                          feature_group_count: int = 1, batch_group_count: int = 1,
                          precision=None, preferred_element_type=None):
    if uses_custom_gradients(gradients):
        args = _canonical_args(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                               dimension_numbers, feature_group_count, batch_group_count,
                               preferred_element_type)
        if args is not None:
            return canonical_conv(lhs, rhs, *args, precision)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)


# One function object per setting (stable identities: a module holding one compares equal to
# another built with the same setting).
_CONV_FUNCTIONS: Dict[str, Callable] = {
    g: functools.partial(_conv_general_dilated, g) for g in CONV_GRADIENTS}


def conv_function(gradients: str = "auto") -> Callable:
    """`lax.conv_general_dilated` with the backward pass `gradients` selects ("auto": the
    custom VJP on CPU; "stock": lax's own; "custom": `canonical_conv`'s where it applies)."""
    uses_custom_gradients(gradients)   # validates the name
    return _CONV_FUNCTIONS[gradients]


conv_general_dilated = _CONV_FUNCTIONS["auto"]   # today's default, for direct callers


# ----------------------------------------------------------------------------- XLA:CPU options

# By default XLA:CPU (jaxlib 0.10.2) hands each convolution, each dot and reductions to YNNPACK
# (`xla_cpu_experimental_ynn_fusion_type` = REDUCE, INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION, as
# its optimised HLO shows). YNNPACK's weight-gradient convolutions are 3-6x slower than XLA's
# own (Eigen) ones on this workload (cpsc_jax.tools.benchmark.CPU_TUNED_XLA_FLAGS; docs/RESULTS.md).
# The XLA_FLAGS spelling `-individual_convolution` removes
# convolutions from that list; a compiler option cannot say "minus" and sets the whole list,
# so it names the rest (`_takes_convs_off_ynnpack` checks that it leaves everything else as
# the default has it). As a compiler option it applies per executable, and a jaxlib that does
# not know it rejects it at compile time instead of aborting the process as XLA_FLAGS would.
XLA_CPU_CONV_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def xla_cpu_conv_options() -> Dict[str, str]:
    """`XLA_CPU_CONV_OPTIONS` when the default backend is CPU and they do what they are for on
    its jaxlib (`_takes_convs_off_ynnpack`), else {}: compiler options for `jax.jit`."""
    if (jax.default_backend() != "cpu"
            or not _takes_convs_off_ynnpack(tuple(XLA_CPU_CONV_OPTIONS.items()))):
        return {}
    return dict(XLA_CPU_CONV_OPTIONS)


def ynn_fusions(hlo_text: str) -> Dict[str, int]:
    """How many convolutions, dots and reductions of an optimised HLO module run in YNNPACK
    fusions."""
    called = re.findall(r"calls=(%[\w.-]+)[^\n]*__ynn_fusion", hlo_text)
    counts = {"convolution": 0, "dot": 0, "reduce": 0}
    for name in called:
        body = re.search(re.escape(name) + r" [^\n]*\{\n(.*?)\n\}", hlo_text, re.S)
        for op in counts:
            counts[op] += len(re.findall(rf"\b{op}\(", body.group(1))) if body else 0
    return counts


@functools.lru_cache(maxsize=None)
def _takes_convs_off_ynnpack(options: Tuple[Tuple[str, str], ...]) -> bool:
    """Whether, on this jaxlib, `options` take a convolution off YNNPACK, where the default
    puts it, and leave dots and reductions where the default puts them (tried once, compiling a
    small program; False also when XLA rejects the options, or when XLA_FLAGS already keeps
    convolutions off YNNPACK)."""
    def probe(x, w, a, b):   # shapes large enough for XLA to consider YNNPACK (never run)
        y = _plain_conv(x, w, (1, 1), ((1, 1), (1, 1)), None)
        return y, a @ b, jnp.sum(x, (0, 1, 2))

    args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in
            ((8, 16, 16, 32), (3, 3, 32, 32), (2048, 32), (32, 32))]
    try:
        lowered = jax.jit(probe).lower(*args)
        default = ynn_fusions(lowered.compile().as_text())
        chosen = ynn_fusions(lowered.compile(compiler_options=dict(options)).as_text())
    except Exception:  # noqa: BLE001 - an unknown option or value: XLA's error type varies
        return False
    return (default["convolution"] > 0 and chosen["convolution"] == 0
            and chosen["dot"] == default["dot"] and chosen["reduce"] == default["reduce"])
