"""SVHN (cropped digits, format 2) from the official MATLAB files `train_32x32.mat` and
`test_32x32.mat`: X is 32 x 32 x 3 x N, y is N x 1 with the digit 0 stored as 10."""
import os

import numpy as np

from cpsc_jax.data.base import Split
from cpsc_jax.data.files import DataError, require_dir

LAYOUT = "a folder with the official SVHN files train_32x32.mat and test_32x32.mat"


def read_svhn_mat(path: str, name: str = "svhn") -> Split:
    try:
        from scipy.io import loadmat  # scipy comes with scikit-learn
    except ImportError:  # pragma: no cover
        raise DataError(f"{path}: reading SVHN .mat files needs scipy "
                        "(pip install scipy)") from None
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist; expected {LAYOUT}")
    try:
        d = loadmat(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e}); "
                        f"expected {LAYOUT}") from None
    if "X" not in d or "y" not in d:
        raise DataError(f"{path}: no 'X'/'y' arrays; expected {LAYOUT}")
    x, y = np.asarray(d["X"]), np.asarray(d["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
        raise DataError(f"{path}: X has shape {x.shape}, y {y.shape}; "
                        "expected 32 x 32 x 3 x N and N")
    y = np.where(y == 10, 0, y)
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels outside 1..10")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8)
    return Split(images, y.astype(np.int32), 10, name)


def load_svhn_dir(directory: str, split: str) -> Split:
    directory = require_dir(directory, LAYOUT)
    return read_svhn_mat(os.path.join(directory, f"{split}_32x32.mat"), f"svhn/{split}")
