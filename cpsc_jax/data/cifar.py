"""CIFAR-10 / CIFAR-100 from the official python-pickle folders (`cifar-10-batches-py`,
`cifar-100-python`). Only `data` and the labels are read, so batches without the `filenames`
key (as in the project's shared copy) load like the official files."""
import os
import pickle
from typing import Sequence

import numpy as np

from cpsc_jax.data.base import Split
from cpsc_jax.data.files import DataError, abspath, as_nhwc_uint8

CIFAR10_LAYOUT = ("the official cifar-10-batches-py folder (data_batch_1..data_batch_5, "
                  "test_batch; python pickles) or a folder that contains it")
CIFAR100_LAYOUT = ("the official cifar-100-python folder (train, test; python pickles) or a "
                   "folder that contains it")
HOLDOUT_TRAIN = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4")
HOLDOUT_TEST = ("data_batch_5",)


def _locate(directory: str, subdir: str, marker: str, layout: str) -> str:
    """`directory` itself when it holds `marker`, else `directory/subdir` when that does."""
    path = abspath(directory)
    if not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise DataError(f"{path} {what}; expected {layout}")
    for candidate in (path, os.path.join(path, subdir)):
        if os.path.isfile(os.path.join(candidate, marker)):
            return candidate
    raise DataError(f"{path}: no {marker} (nor {subdir}/{marker}); expected {layout}")


def read_batch(path: str, label_key: bytes = b"labels"):
    """One pickled batch -> (uint8 NHWC images, int32 labels)."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; expected a CIFAR python-pickle batch") from None
    except Exception as e:
        raise DataError(f"{path}: not a CIFAR python-pickle batch "
                        f"({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR python-pickle batch "
                        f"(a {type(d).__name__}, not a dict)")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    key = label_key.decode()
    if key not in d and "labels" in d:
        key = "labels"
    if "data" not in d or key not in d:
        raise DataError(f"{path}: keys {sorted(d)}; expected 'data' and '{label_key.decode()}'")
    data = np.asarray(d["data"], np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' has shape {data.shape}; expected N x 3072")
    images = as_nhwc_uint8(data, path)
    labels = np.asarray(d[key], np.int64).reshape(-1)
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int32)


def _read_batches(folder: str, names: Sequence[str], layout: str, label_key=b"labels"):
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; expected {layout}")
    parts = [read_batch(os.path.join(folder, n), label_key) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_cifar10_dir(directory: str, split: str, protocol: str = "standard") -> Split:
    folder = _locate(directory, "cifar-10-batches-py", "data_batch_1", CIFAR10_LAYOUT)
    if protocol == "holdout":
        names = HOLDOUT_TRAIN if split == "train" else HOLDOUT_TEST
        label = "cifar10-holdout"
    else:
        names = (tuple(f"data_batch_{i}" for i in range(1, 6)) if split == "train"
                 else ("test_batch",))
        label = "cifar10"
        if split == "test" and not os.path.isfile(os.path.join(folder, "test_batch")):
            raise DataError(f"{folder}: no test_batch; expected {CIFAR10_LAYOUT} (without the "
                            "official test set, set data.protocol='holdout': train on "
                            "data_batch_1..4, evaluate on data_batch_5)")
    images, labels = _read_batches(folder, names, CIFAR10_LAYOUT)
    if labels.size and labels.max() > 9:
        raise DataError(f"{folder}: label {int(labels.max())} outside 0..9")
    return Split(images, labels, 10, f"{label}/{split}" if protocol != "holdout"
                 else f"{label}/{'+'.join(names) if split == 'test' else 'data_batch_1-4'}")


def load_cifar100_dir(directory: str, split: str) -> Split:
    folder = _locate(directory, "cifar-100-python", "train", CIFAR100_LAYOUT)
    images, labels = _read_batches(folder, ("train" if split == "train" else "test",),
                                   CIFAR100_LAYOUT, label_key=b"fine_labels")
    if labels.size and labels.max() > 99:
        raise DataError(f"{folder}: label {int(labels.max())} outside 0..99")
    return Split(images, labels, 100, f"cifar100/{split}")
