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


# 3x5 pixel glyphs of the digits, one string of 15 bits per digit, row-major.
_GLYPHS = {str(d): g for d, g in enumerate((
    "111101101101111", "010110010010111", "111001111100111", "111001111001111",
    "101101111001001", "111100111001111", "111100111101111", "111001001001001",
    "111101111101111", "111101111001111"))}
MARK = np.array([0.9, 0.1, 0.1], np.float32)   # frame of a tile the teacher assigns elsewhere


def _text(label: str, scale: int) -> np.ndarray:
    """White-on-black digits, 5*scale high, as a float HxW mask."""
    cols = []
    for ch in label:
        glyph = np.array([int(b) for b in _GLYPHS.get(ch, "0" * 15)], np.float32).reshape(5, 3)
        cols += [glyph, np.zeros((5, 1), np.float32)]
    mask = np.concatenate(cols[:-1], axis=1) if cols else np.zeros((5, 1), np.float32)
    return np.repeat(np.repeat(mask, scale, 0), scale, 1)


def labelled_grid(images: np.ndarray, row_labels, wrong: np.ndarray, scale: int = 1,
                  pad: int = 2) -> np.ndarray:
    """[rows, cols, H, W, C] images in [0, 1] -> one RGB uint8 grid: each row headed by its
    label, each tile framed in red where `wrong[row, col]` (e.g. the teacher sees another
    class in it)."""
    rows, cols, h, w, c = images.shape
    x = np.clip(np.asarray(images, np.float32), 0, 1)
    if c == 1:
        x = np.repeat(x, 3, axis=-1)
    x = np.repeat(np.repeat(x, scale, 2), scale, 3)
    h, w = h * scale, w * scale
    text_scale = max(1, h // 12)
    label_w = max(_text(str(l), text_scale).shape[1] for l in row_labels) + 2 * pad
    cell_h, cell_w = h + 2 * pad, w + 2 * pad
    grid = np.zeros((rows * cell_h, label_w + cols * cell_w, 3), np.float32)
    for r in range(rows):
        top = r * cell_h
        t = _text(str(row_labels[r]), text_scale)
        ty = top + (cell_h - t.shape[0]) // 2
        grid[ty:ty + t.shape[0], pad:pad + t.shape[1]] = t[..., None]
        for k in range(cols):
            left = label_w + k * cell_w
            if wrong[r, k]:
                grid[top:top + cell_h, left:left + cell_w] = MARK
            grid[top + pad:top + pad + h, left + pad:left + pad + w] = x[r, k]
    return np.round(grid * 255).astype(np.uint8)


def shown_classes(num_classes: int, limit: int = 20) -> np.ndarray:
    """Every class when there are at most `limit`, else `limit` evenly spaced ones (fixed)."""
    if num_classes <= limit:
        return np.arange(num_classes)
    return np.unique(np.round(np.linspace(0, num_classes - 1, limit)).astype(int))
