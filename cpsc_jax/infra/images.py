"""Sample grids of generated images, labelled and written with Pillow."""
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MARK = (230, 25, 25)   # frame of a tile the teacher assigns to another class
MIN_TILE = 32          # tiles are enlarged (nearest neighbour) to at least this many pixels


def write_png(path: str, image: np.ndarray) -> None:
    """Writes an HxW (grey) or HxWx3 (RGB) uint8 array as a PNG (atomically)."""
    image = np.ascontiguousarray(image, np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    tmp = path + ".tmp"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1: a scalable TrueType font
    except TypeError:
        return ImageFont.load_default()


def labelled_grid(images: np.ndarray, row_labels, wrong: np.ndarray, scale: int = 1,
                  pad: int = 2) -> np.ndarray:
    """[rows, cols, H, W, C] images in [0, 1] -> one RGB uint8 grid: each row headed by its
    label in a real font, each tile framed in red where `wrong[row, col]` (e.g. the teacher
    sees another class in it)."""
    rows, cols, h, w, c = images.shape
    x = np.round(np.clip(np.asarray(images, np.float32), 0, 1) * 255).astype(np.uint8)
    if c == 1:
        x = np.repeat(x, 3, axis=-1)
    scale = max(scale, -(-MIN_TILE // max(h, w)))
    th, tw = h * scale, w * scale
    font = _font(max(10, th // 2))
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(draw_probe.textlength(str(l), font=font)) for l in row_labels) + 3 * pad
    cell_h, cell_w = th + 2 * pad, tw + 2 * pad
    canvas = Image.new("RGB", (label_w + cols * cell_w, rows * cell_h), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        top = r * cell_h
        draw.text((pad, top + cell_h // 2), str(row_labels[r]), fill=(255, 255, 255), font=font,
                  anchor="lm")
        for k in range(cols):
            left = label_w + k * cell_w
            if wrong[r, k]:
                draw.rectangle([left, top, left + cell_w - 1, top + cell_h - 1], fill=MARK)
            tile = Image.fromarray(x[r, k]).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (left + pad, top + pad))
    return np.asarray(canvas)


def shown_classes(num_classes: int, limit: int = 20) -> np.ndarray:
    """Every class when there are at most `limit`, else `limit` evenly spaced ones (fixed)."""
    if num_classes <= limit:
        return np.arange(num_classes)
    return np.unique(np.round(np.linspace(0, num_classes - 1, limit)).astype(int))
