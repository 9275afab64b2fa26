"""Datasets by name: `load_split(data_config, split)` returns a `Split` (uint8 NHWC, int32 labels).

`data_config` is the `data` block of a run config (a ConfigDict, a dict or any object with these
attributes; absent fields take the defaults shown):

    name        one of digits, mnist, cifar10, cifar100, svhn, tiny_imagenet
    dir = ""    local copy of the dataset in its official layout (see `DATASETS[name].layout`),
                or a folder holding `train.npz`/`test.npz` (arrays `data`, `labels`). Empty:
                read the TFDS array_record data source (mnist, cifar10, cifar100, svhn only).
    protocol = "standard"
                "standard": the official train and test splits. "holdout" (cifar10 only, local
                folder only): train on data_batch_1..4, test on data_batch_5 (the
                "cifar10-holdout" protocol, for copies without the official test set).
    extra_eval = ""
                optional extra evaluation set, evaluated and reported beside the test split: an
                `.npz` file with `data`/`labels`, or a single CIFAR pickle batch file
                (e.g. .../test_batch_first1017.npz).
    tfds_dir = ""
                TFDS data directory when `dir` is empty (empty: $TFDS_DATA_DIR or
                ~/tensorflow_datasets).

Nothing here ever downloads. A missing or malformed location raises `DataError` (a ValueError)
with a one-line message naming the path and the layout expected there.
"""
import dataclasses
import os
from typing import Any, Dict, Optional

from cpsc_jax.data.base import NORMALIZATION, Split, denormalize, normalize
from cpsc_jax.data.files import DataError, abspath, load_npz, resize_split, resize_uint8

PROTOCOLS = ("standard", "holdout")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    channels: int
    tfds_name: Optional[str]
    layout: str


DATASETS: Dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 8, 1, None, "scikit-learn's bundled digits (no files)"),
    "mnist": DatasetInfo("mnist", 10, 32, 1, "mnist",
                         "a folder with the MNIST IDX files (train-images-idx3-ubyte[.gz], "
                         "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
                         "t10k-labels-idx1-ubyte[.gz])"),
    "cifar10": DatasetInfo("cifar10", 10, 32, 3, "cifar10",
                           "the cifar-10-batches-py folder (or its parent)"),
    "cifar100": DatasetInfo("cifar100", 100, 32, 3, "cifar100",
                            "the cifar-100-python folder (or its parent)"),
    "svhn": DatasetInfo("svhn", 10, 32, 3, "svhn_cropped",
                        "a folder with train_32x32.mat and test_32x32.mat"),
    "tiny_imagenet": DatasetInfo("tiny_imagenet", 200, 64, 3, None,
                                 "the tiny-imagenet-200 folder (or its parent)"),
}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except (AttributeError, KeyError):
        value = default
    return default if value is None else value


def available_datasets():
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: "
                         f"{', '.join(available_datasets())}")
    return DATASETS[name]


def protocol_label(data_config) -> str:
    """How results on this data must be labelled, e.g. 'cifar10' or 'cifar10-holdout'."""
    name = _get(data_config, "name")
    return f"{name}-holdout" if _get(data_config, "protocol", "standard") == "holdout" else name


def _read_local(name: str, directory: str, split: str, protocol: str) -> Split:
    if name == "mnist":
        from cpsc_jax.data.mnist import load_mnist_dir
        return load_mnist_dir(directory, split)
    if name == "cifar10":
        from cpsc_jax.data.cifar import load_cifar10_dir
        return load_cifar10_dir(directory, split, protocol)
    if name == "cifar100":
        from cpsc_jax.data.cifar import load_cifar100_dir
        return load_cifar100_dir(directory, split)
    if name == "svhn":
        from cpsc_jax.data.svhn import load_svhn_dir
        return load_svhn_dir(directory, split)
    if name == "tiny_imagenet":
        from cpsc_jax.data.tiny_imagenet import load_tiny_imagenet_dir
        return load_tiny_imagenet_dir(directory, split)
    raise ValueError(f"no local reader for {name!r}")  # pragma: no cover


def _conform(split: Split, info: DatasetInfo, where: str) -> Split:
    """Checks channels and label range against the dataset; resizes to its image size."""
    if split.images.shape[-1] != info.channels:
        raise DataError(f"{where}: images have {split.images.shape[-1]} channels; {info.name} "
                        f"has {info.channels}")
    if len(split) and int(split.labels.max()) >= info.num_classes:
        raise DataError(f"{where}: label {int(split.labels.max())} out of range for "
                        f"{info.name} ({info.num_classes} classes)")
    split = resize_split(split, info.image_size)
    return Split(split.images, split.labels, info.num_classes, split.name)


def load_split(data_config, split: str) -> Split:
    name = _get(data_config, "name")
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    protocol = _get(data_config, "protocol", "standard") or "standard"
    if protocol not in PROTOCOLS:
        raise ValueError(f"data.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "holdout" and name != "cifar10":
        raise ValueError(f"data.protocol='holdout' is defined for cifar10 only, not {name!r}")
    if name == "digits":
        from cpsc_jax.data.digits import load_digits_split
        return load_digits_split(split)
    directory = _get(data_config, "dir", "") or ""
    if not directory:
        if info.tfds_name is None:
            raise DataError(f"data.dir is empty and {name} has no TFDS source; set data.dir to "
                            f"{info.layout}")
        if protocol == "holdout":
            raise DataError("data.protocol='holdout' needs the cifar-10-batches-py folder "
                            "(data_batch_1..5) in data.dir; TFDS does not keep the batch order")
        from cpsc_jax.data.tfds_source import load_tfds
        tfds_dir = _get(data_config, "tfds_dir", "") or None
        return _conform(load_tfds(name, split, tfds_dir), info, f"TFDS {info.tfds_name}:{split}")
    npz = os.path.join(abspath(directory), f"{split}.npz")
    if os.path.isfile(npz):
        if protocol == "holdout":
            raise DataError(f"{npz}: data.protocol='holdout' needs the cifar-10-batches-py folder, "
                            "not .npz splits")
        return _conform(load_npz(npz, f"{name}/{split}", info.num_classes), info, npz)
    return _conform(_read_local(name, directory, split, protocol), info, abspath(directory))


def load_extra_eval(data_config) -> Optional[Split]:
    """The `data.extra_eval` set, resized to the dataset's image size; None when unset."""
    path = _get(data_config, "extra_eval", "") or ""
    if not path:
        return None
    info = dataset_info(_get(data_config, "name"))
    split = load_path(path, num_classes=info.num_classes)
    split = _conform(split, info, abspath(path))
    stem = os.path.splitext(os.path.basename(abspath(path)))[0]
    return Split(split.images, split.labels, split.num_classes, f"extra:{stem}")


def eval_splits(data_config) -> Dict[str, Split]:
    """Every labelled set a model is evaluated on: {'test': ..., 'extra': ... (when set)}."""
    out = {"test": load_split(data_config, "test")}
    extra = load_extra_eval(data_config)
    if extra is not None:
        out["extra"] = extra
    return out


# --- Loading by location, for evaluation tools -------------------------------------------------

def detect_dataset(directory: str) -> str:
    """Names the dataset whose official layout `directory` (or one of its children) holds."""
    d = abspath(directory)
    has = lambda *p: os.path.exists(os.path.join(d, *p))  # noqa: E731
    if has("train.npz") or has("test.npz"):
        return "npz"
    if has("data_batch_1") or has("test_batch") or has("cifar-10-batches-py"):
        return "cifar10"
    if has("cifar-100-python") or (has("meta") and os.path.isfile(os.path.join(d, "train"))):
        return "cifar100"
    if any(has(f) for f in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz",
                            "t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz")):
        return "mnist"
    if has("train_32x32.mat") or has("test_32x32.mat"):
        return "svhn"
    if has("tiny-imagenet-200") or (has("train") and has("val")):
        return "tiny_imagenet"
    raise DataError(f"{d}: no known dataset layout (cifar-10-batches-py, cifar-100-python, MNIST "
                    "IDX files, SVHN *_32x32.mat, tiny-imagenet-200, or train.npz/test.npz)")


def _looks_like_tfds_spec(spec: str) -> bool:
    if ":" not in spec or os.path.exists(spec) or "/" in spec.split(":", 1)[0]:
        return False
    return bool(spec.split(":", 1)[0]) and bool(spec.split(":", 1)[1])


def load_path(spec: str, split: str = "test", dataset: Optional[str] = None,
              protocol: str = "standard", tfds_dir: str = "",
              num_classes: Optional[int] = None, image_size: Optional[int] = None) -> Split:
    """A labelled set by location: an `.npz` (data/labels), a CIFAR pickle batch file, an SVHN
    `.mat` file, a dataset folder in its official layout (detected, or named by `dataset`), or
    a TFDS spec `name:split` (e.g. `cifar10:test`, `mnist:test`, `svhn_cropped:test[:1000]`).
    Resized (PIL bilinear) to `image_size` when given."""
    path = abspath(spec)
    if os.path.isfile(path):
        if path.endswith(".npz"):
            out = load_npz(path, num_classes=num_classes)
        elif path.endswith(".mat"):
            from cpsc_jax.data.svhn import read_svhn_mat
            out = read_svhn_mat(path, os.path.basename(path))
        else:
            from cpsc_jax.data.cifar import read_batch
            images, labels = read_batch(path, label_key=b"fine_labels")
            k = num_classes or int(labels.max()) + 1
            out = Split(images, labels, max(k, 2), os.path.basename(path))
    elif os.path.isdir(path):
        name = dataset or detect_dataset(path)
        if name == "npz":
            out = load_npz(os.path.join(path, f"{split}.npz"), num_classes=num_classes)
        else:
            out = load_split({"name": name, "dir": path, "protocol": protocol}, split)
    elif _looks_like_tfds_spec(spec):
        name, tsplit = spec.split(":", 1)
        from cpsc_jax.data.tfds_source import load_tfds
        out = load_tfds(name, tsplit, tfds_dir or None)
    else:
        raise DataError(f"{path} does not exist, and {spec!r} is not a TFDS spec NAME:SPLIT; "
                        "expected a dataset folder, an .npz with data/labels, or e.g. cifar10:test")
    if num_classes is not None and len(out) and int(out.labels.max()) >= num_classes:
        raise DataError(f"{spec}: label {int(out.labels.max())} out of range for "
                        f"{num_classes} classes")
    if num_classes is not None:
        out = Split(out.images, out.labels, num_classes, out.name)
    if image_size:
        out = resize_split(out, image_size)
    return out


__all__ = ["DATASETS", "DataError", "DatasetInfo", "NORMALIZATION", "PROTOCOLS", "Split",
           "available_datasets", "dataset_info", "denormalize", "detect_dataset", "eval_splits",
           "load_extra_eval", "load_npz", "load_path", "load_split", "normalize",
           "protocol_label", "resize_uint8"]
