"""MNIST from the official IDX files (`.gz` or uncompressed), resized to 32x32 like the DFKD
literature does (PIL bilinear, reproduced exactly by `files.resize_uint8`)."""
import os

import numpy as np

from cpsc_jax.data.base import Split
from cpsc_jax.data.files import DataError, open_maybe_gz, require_dir, resize_uint8

IMAGE_SIZE = 32
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
LAYOUT = ("a folder with the MNIST IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
          "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally .gz)")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (big-endian header: 0, 0, dtype code, ndim, then ndim uint32 sizes)."""
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    try:
        with open_maybe_gz(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({e}); expected an IDX file, "
                        "optionally gzipped") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int(v) for v in np.frombuffer(raw[4:header], ">u4"))
    dtype = np.dtype(dtypes[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(f"{path}: IDX header says shape {shape} but the file holds "
                        f"{len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype, count, header).reshape(shape)


def _find(directory: str, stem: str) -> str:
    dotted = stem.replace("-idx", ".idx")
    candidates = (stem, stem + ".gz", dotted, dotted + ".gz")
    for c in candidates:
        p = os.path.join(directory, c)
        if os.path.isfile(p):
            return p
    raise DataError(f"{directory}: no {stem}[.gz]; expected {LAYOUT}")


def load_mnist_dir(directory: str, split: str, image_size: int = IMAGE_SIZE,
                   name: str = "mnist") -> Split:
    directory = require_dir(directory, LAYOUT)
    img_path, lbl_path = (_find(directory, s) for s in _FILES[split])
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{img_path}: expected uint8 images N x H x W, got "
                        f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{lbl_path}: expected {len(images)} labels, got shape {labels.shape}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{lbl_path}: label {int(labels.max())} outside 0..9")
    x = resize_uint8(images[..., None], image_size) if image_size else images[..., None]
    return Split(np.ascontiguousarray(x), labels.astype(np.int32), 10, f"{name}/{split}")
