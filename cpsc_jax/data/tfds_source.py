"""Datasets read through TensorFlow Datasets' array_record data sources (no TensorFlow needed to
read; never downloads).

One-time preparation (this step needs TensorFlow; reading afterwards does not):

    pip install tensorflow-cpu
    tfds build mnist cifar10 cifar100 svhn_cropped --file_format=array_record [--data_dir=DIR]

Reading decodes the stored PNGs with Pillow or OpenCV (`pip install pillow`). The data
directory is `data.tfds_dir` when set, else TFDS's default ($TFDS_DATA_DIR or
~/tensorflow_datasets).
"""
from typing import Optional

import numpy as np

from cpsc_jax.data import registry
from cpsc_jax.data.base import Split
from cpsc_jax.data.files import DataError, resize_uint8

PREPARE = ("prepare it once with: pip install tensorflow-cpu && tfds build {name} "
           "--file_format=array_record{data_dir_flag}")


def _prepare_hint(tfds_name: str, data_dir: Optional[str]) -> str:
    flag = f" --data_dir={data_dir}" if data_dir else ""
    return PREPARE.format(name=tfds_name, data_dir_flag=flag)


def _read_all(source, chunk: int = 1024):
    n = len(source)
    examples = []
    batched = hasattr(source, "__getitems__")
    for i in range(0, n, chunk):
        keys = list(range(i, min(n, i + chunk)))
        if batched:
            try:
                examples += list(source.__getitems__(keys))
                continue
            except TypeError:  # tfds.testing.mock_data's __getitems__ is broken; read one by one
                batched = False
        examples += [source[k] for k in keys]
    return examples


def load_tfds(name: str, split: str, data_dir: Optional[str] = None,
              image_size: Optional[int] = None) -> Split:
    """`name`: one of ours (mnist, cifar10, cifar100, svhn) or a TFDS name (svhn_cropped);
    `split`: a TFDS split, slicing allowed ('test', 'train[:1000]')."""
    dataset = registry.by_tfds_name(name)
    if dataset is None:
        supported = sorted(d.tfds_name for d in registry.DATASETS.values() if d.tfds_name)
        raise DataError(f"TFDS dataset {name!r} is not supported; supported: "
                        f"{', '.join(supported)}")
    tfds_name = dataset.tfds_name
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"reading {tfds_name} through TFDS needs tensorflow-datasets (pip install "
                        "tensorflow-datasets), or set data.dir to a local copy") from None
    where = data_dir or "the default TFDS data directory"
    try:
        source = tfds.data_source(tfds_name, split=split, data_dir=data_dir or None, download=False,
                                  try_gcs=False)
    except Exception as e:  # not prepared, prepared as tfrecord, bad split, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"TFDS {tfds_name}:{split} could not be opened in {where} ({msg}); "
                        f"{_prepare_hint(tfds_name, data_dir)}") from None
    try:
        examples = _read_all(source)
    except ImportError as e:
        raise DataError(f"TFDS {tfds_name}:{split}: decoding images needs Pillow or OpenCV "
                        f"(pip install pillow): {str(e).splitlines()[0]}") from None
    if not examples:
        raise DataError(f"TFDS {tfds_name}:{split} in {where} is empty")
    images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
    labels = np.asarray([int(ex["label"]) for ex in examples], np.int32)
    if images.ndim == 3:
        images = images[..., None]
    size = image_size or dataset.image_size   # MNIST is 28x28 in TFDS; DFKD resizes it to 32
    if size != images.shape[1]:
        images = resize_uint8(images, size)
    k = dataset.num_classes
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise DataError(f"TFDS {tfds_name}:{split}: labels outside 0..{k - 1}")
    return Split(np.ascontiguousarray(images), labels, k, f"{dataset.name}/{split}")
