"""Accuracy of a classifier on a real split, normalised with the classifier's own mean/std."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cpsc_jax.data import Split, normalize


@functools.partial(jax.jit, static_argnums=0)
def _predict(model, variables, x):
    return jnp.argmax(model.apply(variables, x, train=False), -1)


def predict_labels(model, variables, split: Split, mean, std, batch_size: int = 500) -> np.ndarray:
    """Predicted labels; the last partial batch is padded so every batch has one shape (one compile)."""
    preds = []
    for i in range(0, len(split), batch_size):
        x = normalize(split.images[i:i + batch_size], mean, std)
        n = len(x)
        if n < batch_size and len(split) > batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        preds.append(np.asarray(_predict(model, variables, x))[:n])
    return np.concatenate(preds)


def accuracy(model, variables, split: Split, mean, std, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent."""
    return float(100.0 * np.mean(predict_labels(model, variables, split, mean, std, batch_size)
                                 == split.labels))


def per_class_accuracy(model, variables, split: Split, mean, std, batch_size: int = 500):
    preds = predict_labels(model, variables, split, mean, std, batch_size)
    return {int(k): float(100.0 * np.mean(preds[split.labels == k] == k))
            for k in np.unique(split.labels)}
