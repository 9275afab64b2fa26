"""Helpers shared by the on-disk readers: one-line errors, array coercion, PIL-exact resizing.

Nothing here downloads anything: every reader takes a local path and fails with a one-line
`DataError` naming the path and the layout it expected.
"""
import gzip
import os
from typing import Optional

import numpy as np

from cpsc_jax.data.base import Split
from cpsc_jax.errors import UserError


class DataError(UserError, ValueError):
    """A missing or malformed dataset location (the message is a single line)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def require_dir(path: str, expected: str) -> str:
    path = abspath(path)
    if not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise DataError(f"{path} {what}; expected {expected}")
    return path


def require_file(path: str, expected: str) -> str:
    path = abspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist; expected {expected}")
    return path


def open_maybe_gz(path: str):
    """Opens `path`, transparently decompressing `.gz` (by name or by magic bytes)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def as_nhwc_uint8(data: np.ndarray, where: str) -> np.ndarray:
    """Accepts NHWC, NHW (grey), NCHW (C in 1, 3) or flat CIFAR-style rows (N, C*H*W, planes
    R, G, B) and returns uint8 NHWC. Float data must be raw pixels: in [0, 1] (scaled to
    0..255) or whole numbers in 0..255; already-normalised images (negative values, or other
    fractions above 1) are refused rather than silently misread."""
    x = np.asarray(data)
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating):
            lo = float(np.min(x)) if x.size else 0.0
            hi = float(np.max(x)) if x.size else 0.0
            whole = bool(np.all(x == np.round(x)))
            if lo < 0 or (hi > 1.0 + 1e-6 and not (whole and hi <= 255)):
                raise DataError(
                    f"{where}: float pixels in [{lo:.3g}, {hi:.3g}] look already normalised; "
                    "give raw pixels (uint8 0..255, or floats in [0, 1]): the input "
                    "normalisation is applied here, with the model's own mean/std")
            x = np.clip(np.round(x * 255.0) if hi <= 1.0 + 1e-6 else np.round(x), 0, 255)
        elif x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{where}: pixel values outside 0..255 (dtype {x.dtype})")
        x = x.astype(np.uint8)
    if x.ndim == 2:  # flat rows: (N, C*S*S) with C in (1, 3), planes first (the CIFAR layout)
        n, d = x.shape
        for c in (3, 1):
            s = int(round((d // c) ** 0.5))
            if c * s * s == d:
                return np.ascontiguousarray(x.reshape(n, c, s, s).transpose(0, 2, 3, 1))
        raise DataError(f"{where}: cannot read flat rows of {d} values as C x S x S images")
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4:
        if x.shape[-1] in (1, 3, 4):
            return x[..., :3] if x.shape[-1] == 4 else x
        if x.shape[1] in (1, 3):
            return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    raise DataError(f"{where}: images of shape {x.shape} are not NHWC, NHW, NCHW or flat rows")


def as_labels(labels, n: int, where: str) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if len(y) != n:
        raise DataError(f"{where}: {n} images but {len(y)} labels")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
        if not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0:
            raise DataError(f"{where}: labels must be non-negative integers")
    return y.astype(np.int32)


def load_npz(path: str, name: Optional[str] = None, num_classes: Optional[int] = None) -> Split:
    """An `.npz` with `data` (images: NHWC/NHW/NCHW/flat rows) and `labels`."""
    path = require_file(path, "an .npz file with arrays 'data' (images) and 'labels'")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"data", "labels"} <= keys:
                raise DataError(f"{path}: has arrays {sorted(keys)}; expected 'data' (images) and "
                                "'labels'")
            data, labels = f["data"], f["labels"]
    except DataError:
        raise
    except Exception as e:  # not a zip, truncated, ...
        raise DataError(f"{path}: not a readable .npz ({type(e).__name__}: {e}); expected arrays "
                        "'data' and 'labels'") from None
    images = as_nhwc_uint8(data, path)
    y = as_labels(labels, len(images), path)
    k = num_classes or (int(y.max()) + 1 if y.size else 1)
    if y.size and y.max() >= k:
        raise DataError(f"{path}: label {int(y.max())} out of range for {k} classes")
    return Split(images, y, max(k, 2), name or os.path.splitext(os.path.basename(path))[0])


# ---------------------------------------------------------------------------------------------
# Resizing with the exact arithmetic of PIL's Image.resize(..., BILINEAR) on 8-bit images (what
# torchvision's Resize does to MNIST in the DAFL/DFAD pipelines): a triangle filter stretched by
# the down-scaling factor, weights normalised per output pixel and quantised to 22 fractional
# bits, a horizontal pass rounded to uint8, then a vertical pass.

_PRECISION_BITS = 32 - 8 - 2


def _pil_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] fixed-point weights (integers held in float64)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    w = np.zeros((out_size, in_size), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax)
        k = np.maximum(0.0, 1.0 - np.abs((taps - center + 0.5) / filterscale))
        total = k.sum()
        if total != 0.0:
            k = k / total
        k = np.where(k < 0, np.trunc(-0.5 + k * (1 << _PRECISION_BITS)),
                     np.trunc(0.5 + k * (1 << _PRECISION_BITS)))
        w[xx, xmin:xmax] = k
    return w


def _apply_pass(x: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    # x: float64 integers 0..255; every partial sum stays far below 2**53: exact.
    moved = np.moveaxis(x, axis, -1)
    out = moved @ w.T + float(1 << (_PRECISION_BITS - 1))
    out = np.clip(np.floor(out / float(1 << _PRECISION_BITS)), 0, 255)
    return np.moveaxis(out, -1, axis)


def resize_uint8(images: np.ndarray, size: int, chunk: int = 8192) -> np.ndarray:
    """uint8 NHWC -> uint8 N x size x size x C, bilinear exactly as PIL resizes 8-bit images."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    wx = _pil_bilinear_weights(w, size)
    wy = _pil_bilinear_weights(h, size)
    out = np.empty((n, size, size, c), np.uint8)
    for i in range(0, n, chunk):
        x = images[i:i + chunk].astype(np.float64)
        if w != size:
            x = _apply_pass(x, wx, 2)
        if h != size:
            x = _apply_pass(x, wy, 1)
        out[i:i + chunk] = x.astype(np.uint8)
    return out


def resize_split(split: Split, size: int) -> Split:
    if split.images.shape[1:3] == (size, size):
        return split
    return Split(resize_uint8(split.images, size), split.labels, split.num_classes, split.name)
