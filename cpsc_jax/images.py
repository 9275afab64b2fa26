"""A PNG writer for sample grids (zlib only: no imaging library needed)."""
import struct
import zlib

import numpy as np


def write_png(path: str, image: np.ndarray) -> None:
    """Writes an HxW (grey) or HxWx3 (RGB) uint8 array as a PNG."""
    image = np.ascontiguousarray(image, np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    h, w = image.shape[:2]
    color_type = 0 if image.ndim == 2 else 2
    raw = b"".join(b"\x00" + row.tobytes() for row in image)  # filter type 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


def image_grid(images: np.ndarray, rows: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """[rows*cols, H, W, C] floats in [0, 1] -> one uint8 image, row-major, `pad` pixels apart."""
    n, h, w, c = images.shape
    cols = n // rows
    images = np.repeat(np.repeat(images, scale, 1), scale, 2)
    h, w = h * scale, w * scale
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i in range(rows * cols):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)
