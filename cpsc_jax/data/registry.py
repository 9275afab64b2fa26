"""Every dataset the project knows, in one table: name -> shape, normalisation, readers, TFDS
name, and how its folder is recognised.

`DATASETS[name]` is a `Dataset`; `get(name)` raises a one-line error listing the valid names.
Readers are imported lazily (the embedded digits need scikit-learn, Tiny-ImageNet Pillow).
"""
import dataclasses
import os
from typing import Callable, Dict, Optional, Tuple

from cpsc_jax.data.base import Split


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    image_size: int          # the side the networks see (MNIST is resized to 32)
    channels: int
    mean: Tuple[float, ...]  # input normalisation of the DFKD literature
    std: Tuple[float, ...]
    layout: str              # what data.dir must hold, for error messages
    tfds_name: Optional[str] = None
    read_dir: Optional[Callable[[str, str, str], Split]] = None   # (dir, split, protocol)
    recognise: Optional[Callable[[Callable[..., bool]], bool]] = None   # has(*path) -> bool


def _mnist(directory, split, protocol):
    from cpsc_jax.data.mnist import load_mnist_dir
    return load_mnist_dir(directory, split)


def _cifar10(directory, split, protocol):
    from cpsc_jax.data.cifar import load_cifar10_dir
    return load_cifar10_dir(directory, split, protocol)


def _cifar100(directory, split, protocol):
    from cpsc_jax.data.cifar import load_cifar100_dir
    return load_cifar100_dir(directory, split)


def _svhn(directory, split, protocol):
    from cpsc_jax.data.svhn import load_svhn_dir
    return load_svhn_dir(directory, split)


def _tiny_imagenet(directory, split, protocol):
    from cpsc_jax.data.tiny_imagenet import load_tiny_imagenet_dir
    return load_tiny_imagenet_dir(directory, split)


_MNIST_FILES = ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz",
                "t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz")

DATASETS: Dict[str, Dataset] = {d.name: d for d in (
    # Measured on the digits train split; no file, no TFDS: scikit-learn bundles it.
    Dataset("digits", 10, 8, 1, (0.3056,), (0.3761,), "scikit-learn's bundled digits (no files)"),
    Dataset("mnist", 10, 32, 1, (0.1307,), (0.3081,),
            "a folder with the MNIST IDX files (train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])",
            "mnist", _mnist, lambda has: any(has(f) for f in _MNIST_FILES)),
    Dataset("cifar10", 10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
            "the cifar-10-batches-py folder (or its parent)", "cifar10", _cifar10,
            lambda has: has("data_batch_1") or has("test_batch") or has("cifar-10-batches-py")),
    Dataset("cifar100", 100, 32, 3, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
            "the cifar-100-python folder (or its parent)", "cifar100", _cifar100,
            lambda has: has("cifar-100-python") or (has("meta") and has("train"))),
    Dataset("svhn", 10, 32, 3, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
            "a folder with train_32x32.mat and test_32x32.mat", "svhn_cropped", _svhn,
            lambda has: has("train_32x32.mat") or has("test_32x32.mat")),
    Dataset("tiny_imagenet", 200, 64, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
            "the tiny-imagenet-200 folder (or its parent)", None, _tiny_imagenet,
            lambda has: has("tiny-imagenet-200") or (has("train") and has("val"))),
)}


def available() -> Tuple[str, ...]:
    return tuple(sorted(DATASETS))


def get(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(available())}")
    return DATASETS[name]


def by_tfds_name(tfds_name: str) -> Optional[Dataset]:
    """The dataset read through TFDS builder `tfds_name` (ours or TFDS's own name)."""
    for d in DATASETS.values():
        if tfds_name in (d.name, d.tfds_name) and d.tfds_name:
            return d
    return None


def recognise(directory: str) -> Optional[str]:
    """The name of the dataset whose official layout `directory` holds, or None."""
    has = lambda *p: os.path.exists(os.path.join(directory, *p))  # noqa: E731
    for d in DATASETS.values():
        if d.recognise is not None and d.recognise(has):
            return d.name
    return None
