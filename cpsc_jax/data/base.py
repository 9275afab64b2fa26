"""The one in-memory form every dataset reader returns, and input normalisation."""
import dataclasses

import numpy as np

@dataclasses.dataclass
class Split:
    """A labelled split held in memory: uint8 NHWC images and int32 labels."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 NHWC, got "
                             f"{self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self):
        return len(self.labels)


def normalize(images, mean, std):
    """uint8 (or [0,1] float) images -> float32 normalised with per-channel mean and std."""
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def denormalize(images, mean, std):
    """Normalised images -> [0, 1] float, for looking at them."""
    x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(x, 0.0, 1.0)
