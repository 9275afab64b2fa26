"""Accuracy of a classifier on real labelled images, normalised with the classifier's own mean/std.

Images stay uint8 on the host and are normalised on the device; the last partial batch is padded,
so every batch has one shape and the predictor compiles once.
"""
import functools
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cpsc_jax.infra import checkpoint as ckpt_lib
from cpsc_jax import data as data_lib


@functools.partial(jax.jit, static_argnums=0)
def _predict_batch(model, variables, images, mean, std):
    x = (images.astype(jnp.float32) / 255.0 - mean) / std
    return jnp.argmax(model.apply(variables, x, train=False), -1)


def predict_labels(model, variables, images: np.ndarray, mean, std,
                   batch_size: int = 500) -> np.ndarray:
    """Predicted classes (int32) for uint8 NHWC images."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    n = len(images)
    bs = max(1, min(batch_size, n))
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    out = []
    for i in range(0, n, bs):
        x = images[i:i + bs]
        if len(x) < bs:
            x = np.concatenate([x, np.zeros((bs - len(x),) + x.shape[1:], x.dtype)])
        out.append(_predict_batch(model, variables, x, mean, std))
    preds = np.concatenate([np.asarray(p) for p in out]) if out else np.zeros((0,), np.int32)
    return preds[:n].astype(np.int32)


def accuracy(model, variables, split: data_lib.Split, mean, std, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent (nan for an empty split). In a multi-process run every process
    evaluates its own contiguous share of the images and the counts are summed across them."""
    if len(split) == 0:
        return float("nan")
    n, p, i = len(split), jax.process_count(), jax.process_index()
    lo, hi = n * i // p, n * (i + 1) // p
    correct = 0
    if hi > lo:
        preds = predict_labels(model, variables, split.images[lo:hi], mean, std, batch_size)
        correct = int(np.sum(preds == split.labels[lo:hi]))
    if p > 1:
        from jax.experimental import multihost_utils
        correct = int(np.sum(multihost_utils.process_allgather(np.asarray(correct, np.int64))))
    return 100.0 * correct / n


def accuracy_report(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> Dict[str, Any]:
    """Overall and per-class accuracy (%), with the count of each class."""
    per_class, counts = [], []
    for k in range(num_classes):
        m = labels == k
        counts.append(int(m.sum()))
        per_class.append(round(100.0 * float(np.mean(preds[m] == k)), 4) if m.any() else None)
    return {"accuracy": 100.0 * float(np.mean(preds == labels)) if len(labels) else float("nan"),
            "num_examples": int(len(labels)), "per_class_accuracy": per_class,
            "per_class_count": counts}


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "test",
                        dataset: Optional[str] = None, protocol: str = "standard",
                        tfds_dir: str = "", batch_size: int = 500,
                        resize: bool = False) -> Dict[str, Any]:
    """Accuracy of a model checkpoint on a labelled set given by location (see
    `data.load_path`). Images of another size than the checkpoint's input are refused unless
    `resize` (bilinear, e.g. 28x28 MNIST .npz for a 32x32 LeNet): an 8x8 digits model scored
    on 32x32 MNIST measures the resizing, not the model."""
    spec, variables = ckpt_lib.load_model(checkpoint)
    s = data_lib.load_path(data, split=split, dataset=dataset, protocol=protocol,
                           tfds_dir=tfds_dir, num_classes=spec.num_classes)
    resized_from = None
    if s.images.shape[1:3] != (spec.image_size, spec.image_size) and not resize:
        h, w = s.images.shape[1:3]
        raise data_lib.DataError(
            f"{data}: images are {h}x{w}, the checkpoint's {spec.arch} takes "
            f"{spec.image_size}x{spec.image_size}: evaluate it on data of its own size, or pass "
            "--resize to resize them (bilinear)")
    if s.images.shape[1:3] != (spec.image_size, spec.image_size):
        resized_from = list(s.images.shape[1:3])
        s = data_lib.Split(data_lib.resize_uint8(s.images, spec.image_size), s.labels,
                           s.num_classes, s.name)
    if s.images.shape[-1] != spec.channels:
        raise data_lib.DataError(f"{data}: images have {s.images.shape[-1]} channels; the "
                                 f"checkpoint's {spec.arch} expects {spec.channels}")
    preds = predict_labels(spec.build(), variables, s.images, spec.mean, spec.std, batch_size)
    report = accuracy_report(preds, s.labels, spec.num_classes)
    return {"checkpoint": os.path.abspath(checkpoint), "data": data, "set": s.name,
            "arch": spec.arch, "image_size": spec.image_size, "resized_from": resized_from,
            **report}
