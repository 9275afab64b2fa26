"""scikit-learn's bundled 8x8 digits (1,797 images, no download): the embedded default's data."""
import importlib.util
import os

import numpy as np

from cpsc_jax.data.base import Split

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def _digits_arrays():
    """(images [N, 8, 8] float, labels [N]) as sklearn.datasets.load_digits gives them, read
    from the file that scikit-learn ships: importing sklearn takes a second or two per run."""
    spec = importlib.util.find_spec("sklearn")   # finds the package without importing it
    path = (os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
            if spec and spec.submodule_search_locations else "")
    if not os.path.isfile(path):
        from sklearn.datasets import load_digits
        bunch = load_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1]


def load_digits_split(split: str) -> Split:
    pixels, target = _digits_arrays()
    # Pixel values are integers 0..16: map them exactly onto uint8 like every other dataset.
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = target.astype(np.int32)
    order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    n_test = int(round(TEST_FRACTION * len(labels)))
    idx = order[:n_test] if split == "test" else order[n_test:]
    return Split(images[idx], labels[idx], 10, f"digits/{split}")
