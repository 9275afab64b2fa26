"""Tiny-ImageNet-200 (64x64, 200 classes) from the official `tiny-imagenet-200` folder.

Classes are numbered in sorted wnid order (what torchvision's ImageFolder does with the train
folder). The test split is the official `val` split (the official `test` has no labels).
JPEG decoding needs Pillow (an optional dependency: `pip install pillow`). Decoding 110,000 JPEGs
takes a while; convert once to `train.npz`/`test.npz` and point `data.dir` at that folder:

    python -m cpsc_jax.data.tiny_imagenet /path/to/tiny-imagenet-200 /path/to/tiny_imagenet_npz
"""
import os
import sys

import numpy as np

from cpsc_jax.data.base import Split
from cpsc_jax.data.files import DataError, abspath

IMAGE_SIZE = 64
LAYOUT = ("the official tiny-imagenet-200 folder (train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
          "val/val_annotations.txt) or a folder that contains it")


def decode_image(path: str) -> np.ndarray:
    """One image file -> uint8 H x W x 3 (grey images converted to RGB)."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"decoding {path} needs Pillow, an optional dependency of cpsc-jax: "
                        "pip install pillow (or convert the folder to train.npz/test.npz "
                        "elsewhere)") from None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def _locate(directory: str) -> str:
    path = abspath(directory)
    if not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise DataError(f"{path} {what}; expected {LAYOUT}")
    for candidate in (path, os.path.join(path, "tiny-imagenet-200")):
        if all(os.path.isdir(os.path.join(candidate, d)) for d in ("train", "val")):
            return candidate
    raise DataError(f"{path}: no train/ and val/ folders; expected {LAYOUT}")


def _decode_all(paths, where: str) -> np.ndarray:
    out = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, p in enumerate(paths):
        img = decode_image(p)
        if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise DataError(f"{p}: image of shape {img.shape}; expected 64 x 64 (in {where})")
        out[i] = img
    return out


def load_tiny_imagenet_dir(directory: str, split: str) -> Split:
    root = _locate(directory)
    train_dir = os.path.join(root, "train")
    wnids = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not wnids:
        raise DataError(f"{train_dir}: no class folders; expected {LAYOUT}")
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    if split == "train":
        for w in wnids:
            img_dir = os.path.join(train_dir, w, "images")
            if not os.path.isdir(img_dir):
                raise DataError(f"{img_dir} does not exist; expected {LAYOUT}")
            names = sorted(n for n in os.listdir(img_dir)
                           if n.lower().endswith((".jpeg", ".jpg", ".png")))
            paths += [os.path.join(img_dir, n) for n in names]
            labels += [index[w]] * len(names)
    else:
        ann = os.path.join(root, "val", "val_annotations.txt")
        if not os.path.isfile(ann):
            raise DataError(f"{ann} does not exist; expected {LAYOUT}")
        with open(ann) as f:
            for line_no, line in enumerate(f, 1):
                parts = line.strip().split("\t")
                if not parts or not parts[0]:
                    continue
                if len(parts) < 2 or parts[1] not in index:
                    raise DataError(f"{ann}:{line_no}: expected 'FILE<TAB>WNID...' with a wnid "
                                    f"of train/, got {line.strip()[:60]!r}")
                paths.append(os.path.join(root, "val", "images", parts[0]))
                labels.append(index[parts[1]])
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{missing[0]} does not exist ({len(missing)} images of "
                            f"val_annotations.txt missing); expected {LAYOUT}")
    if not paths:
        raise DataError(f"{root}: no {split} images found; expected {LAYOUT}")
    images = _decode_all(paths, root)
    return Split(images, np.asarray(labels, np.int32), len(wnids), f"tiny_imagenet/{split}")


def convert_to_npz(src: str, dst: str) -> None:
    """Decodes the folder once into DST/train.npz and DST/test.npz (data/labels)."""
    os.makedirs(dst, exist_ok=True)
    for split in ("train", "test"):
        s = load_tiny_imagenet_dir(src, split)
        np.savez(os.path.join(dst, f"{split}.npz"), data=s.images, labels=s.labels)
        print(f"{split}: {len(s)} images -> {os.path.join(dst, split + '.npz')}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m cpsc_jax.data.tiny_imagenet TINY_IMAGENET_200_DIR OUT_DIR")
    convert_to_npz(sys.argv[1], sys.argv[2])
