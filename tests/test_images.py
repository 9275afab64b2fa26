"""Sample grids (cpsc_jax.infra.images): tiles where they belong, red frames, labels drawn, PNG."""
import numpy as np
from PIL import Image

from cpsc_jax.infra import images


def test_labelled_grid_places_tiles_frames_and_labels(tmp_path):
    rows, cols, h = 3, 4, 8
    tiles = np.zeros((rows, cols, h, h, 1), np.float32)
    tiles[1, 2] = 1.0                                   # one white tile
    wrong = np.zeros((rows, cols), bool)
    wrong[2, 0] = True
    grid = images.labelled_grid(tiles, ["0", "1", "12"], wrong)
    scale = images.MIN_TILE // h
    th, pad = h * scale, 2
    cell = th + 2 * pad
    label_w = grid.shape[1] - cols * cell
    assert grid.shape == (rows * cell, label_w + cols * cell, 3) and label_w > 0
    tile = lambda r, k: grid[r * cell + pad:r * cell + pad + th,
                             label_w + k * cell + pad:label_w + k * cell + pad + th]
    assert (tile(1, 2) == 255).all() and (tile(0, 0) == 0).all()
    frame = grid[2 * cell, label_w]                   # the corner of the framed tile's cell
    assert tuple(frame) == images.MARK
    assert tuple(grid[0, label_w]) == (0, 0, 0)       # an unframed cell's corner
    # Each row's label is drawn (some white text pixels in the label column of every row).
    for r in range(rows):
        assert (grid[r * cell:(r + 1) * cell, :label_w] > 128).any()
    path = str(tmp_path / "g.png")
    images.write_png(path, grid)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), grid)
