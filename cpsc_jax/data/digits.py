"""scikit-learn's bundled 8x8 digits (1,797 images, no download): the embedded default's data."""
import numpy as np

from cpsc_jax.data.base import Split

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits_split(split: str) -> Split:
    from sklearn.datasets import load_digits  # sklearn is only needed for this dataset
    bunch = load_digits()
    # Pixel values are integers 0..16: map them exactly onto uint8 like every other dataset.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    n_test = int(round(TEST_FRACTION * len(labels)))
    idx = order[:n_test] if split == "test" else order[n_test:]
    return Split(images[idx], labels[idx], 10, f"digits/{split}")
