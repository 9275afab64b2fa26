"""Datasets by name: `load_split(data_config, split)` returns a `Split` (uint8 NHWC, int32 labels).

`data_config` is the `data` block of a run config (a ConfigDict, a dict or any object with these
attributes; absent fields take the defaults shown):

    name        a name of `registry.DATASETS`: digits, mnist, cifar10, cifar100, svhn,
                tiny_imagenet
    dir = ""    local copy of the dataset in its official layout (`DATASETS[name].layout`),
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
import os
from typing import Any, Dict, Optional

from cpsc_jax.data import registry
from cpsc_jax.data.base import Split, denormalize, normalize
from cpsc_jax.data.files import DataError, abspath, load_npz, resize_split, resize_uint8
from cpsc_jax.data.registry import DATASETS, Dataset

PROTOCOLS = ("standard", "holdout")


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
    return list(registry.available())


def dataset_info(name: str) -> Dataset:
    return registry.get(name)


def protocol_label(data_config) -> str:
    """How results on this data must be labelled, e.g. 'cifar10' or 'cifar10-holdout'."""
    name = _get(data_config, "name")
    return f"{name}-holdout" if _get(data_config, "protocol", "standard") == "holdout" else name


def _conform(split: Split, info: Dataset, where: str) -> Split:
    """Checks channels and label range against the dataset; resizes to its image size."""
    if split.images.shape[-1] != info.channels:
        raise DataError(f"{where}: images have {split.images.shape[-1]} channels; {info.name} "
                        f"has {info.channels}")
    if len(split) and int(split.labels.max()) >= info.num_classes:
        raise DataError(f"{where}: label {int(split.labels.max())} out of range for "
                        f"{info.name} ({info.num_classes} classes)")
    split = resize_split(split, info.image_size)
    return Split(split.images, split.labels, info.num_classes, split.name)


def check_protocol(name: str, protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise DataError(f"data.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "holdout" and name != "cifar10":
        raise DataError(f"data.protocol='holdout' is defined for cifar10 only (train on "
                        f"data_batch_1..4, test on data_batch_5), not {name!r}; use 'standard'")


def load_split(data_config, split: str, dir: str = "") -> Split:
    """A dataset's labelled split as uint8 NHWC images and int labels (`Split`).

    `data_config` is a dataset name ("digits", "mnist", "cifar10", ...) with its files in `dir`
    (the layouts in README; nothing is downloaded), or a run config's `data` block.

        test = cpsc_jax.data.load_split("digits", "test")
        test = cpsc_jax.data.load_split("mnist", "test", dir="/path/to/mnist")
    """
    if isinstance(data_config, str):
        data_config = {"name": data_config, "dir": dir}
    name = _get(data_config, "name")
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    protocol = _get(data_config, "protocol", "standard") or "standard"
    check_protocol(name, protocol)
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
    if directory.endswith(".npz") and os.path.isfile(abspath(directory)):
        # One labelled file (e.g. test_batch_first1017.npz): distillation reads no training
        # images, so it serves as the test split of a data-free run.
        if split != "test":
            raise DataError(f"data.dir {directory} is a single .npz file: it can serve as the "
                            f"test split only, not {split!r}; give a folder for training data")
        return _conform(load_npz(abspath(directory), f"{name}/test", info.num_classes), info,
                        abspath(directory))
    npz = os.path.join(abspath(directory), f"{split}.npz")
    if os.path.isfile(npz):
        if protocol == "holdout":
            raise DataError(f"{npz}: data.protocol='holdout' needs the cifar-10-batches-py folder, "
                            "not .npz splits")
        return _conform(load_npz(npz, f"{name}/{split}", info.num_classes), info, npz)
    return _conform(info.read_dir(directory, split, protocol), info, abspath(directory))


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
    """Names the dataset whose official layout `directory` (or one of its children) holds;
    'npz' for a folder of train.npz/test.npz."""
    d = abspath(directory)
    if os.path.exists(os.path.join(d, "train.npz")) or os.path.exists(os.path.join(d, "test.npz")):
        return "npz"
    name = registry.recognise(d)
    if name is None:
        raise DataError(f"{d}: no known dataset layout ("
                        + "; ".join(f"{x.name}: {x.layout}" for x in DATASETS.values()
                                    if x.recognise is not None)
                        + "; or train.npz/test.npz)")
    return name


def _looks_like_tfds_spec(spec: str) -> bool:
    if ":" not in spec or os.path.exists(spec) or "/" in spec.split(":", 1)[0]:
        return False
    return bool(spec.split(":", 1)[0]) and bool(spec.split(":", 1)[1])


def load_path(spec: str, split: str = "test", dataset: Optional[str] = None,
              protocol: str = "standard", tfds_dir: str = "",
              num_classes: Optional[int] = None, image_size: Optional[int] = None) -> Split:
    """A labelled set by location: an `.npz` (data/labels), a CIFAR pickle batch file, an SVHN
    `.mat` file, a dataset folder in its official layout (detected, or named by `dataset`), a
    dataset name (`digits`; others read their prepared TFDS copy), or a TFDS spec `name:split`
    (e.g. `cifar10:test`, `mnist:test`, `svhn_cropped:test[:1000]`).
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
    elif spec in DATASETS:   # a dataset by name: digits, or a prepared TFDS copy
        if spec == "digits" or not DATASETS[spec].tfds_name:
            out = load_split({"name": spec}, split)
        else:
            from cpsc_jax.data.tfds_source import load_tfds
            out = load_tfds(spec, split, tfds_dir or None)
    elif _looks_like_tfds_spec(spec):
        name, tsplit = spec.split(":", 1)
        from cpsc_jax.data.tfds_source import load_tfds
        out = load_tfds(name, tsplit, tfds_dir or None)
    else:
        raise DataError(f"{path} does not exist, and {spec!r} is neither a dataset name "
                        f"({', '.join(available_datasets())}) nor a TFDS spec NAME:SPLIT; expected "
                        "a dataset folder, an .npz with data/labels, a name, or e.g. cifar10:test")
    if num_classes is not None and len(out) and int(out.labels.max()) >= num_classes:
        raise DataError(f"{spec}: label {int(out.labels.max())} out of range for "
                        f"{num_classes} classes")
    if num_classes is not None:
        out = Split(out.images, out.labels, num_classes, out.name)
    if image_size:
        out = resize_split(out, image_size)
    return out


__all__ = ["DATASETS", "DataError", "Dataset", "PROTOCOLS", "Split",
           "available_datasets", "dataset_info", "denormalize", "detect_dataset", "eval_splits",
           "load_extra_eval", "load_npz", "load_path", "load_split", "normalize",
           "protocol_label", "resize_uint8"]
