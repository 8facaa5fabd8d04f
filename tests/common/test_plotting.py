"""common/plotting.py: the labelled image grid (tile sizes, exact nearest-neighbour pixels, labels) and atomic PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffmem.common.plotting import (
    GRID_EMPTY,
    GRID_GAP,
    fit_tile,
    labelled_grid,
    save_png_atomic,
    upscale_factor,
)


def nearest(a: np.ndarray, k: int) -> np.ndarray:
    """a enlarged k times by repeating every pixel into a k×k block."""
    return np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def test_tiles_are_the_sources_pixels_enlarged_by_an_integer_factor():
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    grey32 = rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)
    odd = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    assert (upscale_factor(16, 16), upscale_factor(32, 32), upscale_factor(24, 24), upscale_factor(300, 400)) == (
        16, 8, 11, 1)
    grid = labelled_grid([[rgb16, None], [grey32, Image.fromarray(odd)]], row_labels=["ground truth", "ours"],
                         col_labels=["#0: a prompt", "#1: another prompt"], title="a title")
    pixels = np.asarray(grid.image)
    assert grid.image.mode == "RGB"
    (b00, b01), (b10, b11) = grid.boxes
    assert b01 is None
    for box, source, k in ((b00, rgb16, 16), (b10, np.repeat(grey32, 3, axis=2), 8), (b11, odd, 11)):
        left, top, right, bottom = box
        assert (right - left, bottom - top) == (source.shape[1] * k, source.shape[0] * k)
        assert np.array_equal(pixels[top:bottom, left:right], nearest(source, k))
    # cells are as large as the largest tile (24 × 11 = 264 px): the 256-px tiles are centred in theirs
    cell_left, cell_top = b00[0] - 4, b00[1] - 4
    assert b10[0] - 4 == cell_left and b11[0] == cell_left + 264 + GRID_GAP
    assert tuple(pixels[cell_top + 5, b11[0] + 5]) == GRID_EMPTY  # the empty cell is grey
    # the picture ends one gap after the last cell; labels sit left of and above the tiles
    width, height = grid.image.size
    assert width == b11[2] + GRID_GAP and height == b11[3] + GRID_GAP
    assert b00[0] > 0 and b00[1] > 0
    assert (pixels[:b00[1] - 1, :] < 128).any()  # text above the tiles (the title and column labels)
    assert (pixels[:, :cell_left - 1] < 128).any()  # text left of them (the row labels)


def test_a_large_image_is_reduced_to_the_tile_and_an_empty_grid_is_refused():
    big = np.zeros((512, 768, 3), dtype=np.uint8)
    assert fit_tile(big).size == (384, 256)
    assert fit_tile(np.zeros((256, 256), dtype=np.uint8)).size == (256, 256)
    with pytest.raises(ValueError, match="at least one image"):
        labelled_grid([[None, None]])
    with pytest.raises(ValueError, match="uint8"):
        fit_tile(np.zeros((4, 4), dtype=np.float32))


def test_long_labels_are_wrapped_and_cut_to_fit():
    from PIL import ImageDraw

    from diffmem.common.plotting import fit_text, grid_font

    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), grid_font()
    lines = fit_text(draw, "word " * 200, font, 256, 2)
    assert len(lines) == 2 and lines[-1].endswith("…")
    assert all(draw.textlength(s, font=font) <= 256 for s in lines)
    assert fit_text(draw, "short", font, 256, 2) == ["short"]
    assert fit_text(draw, "seed 3\nd1/d2 0.05", font, 256, 3) == ["seed 3", "d1/d2 0.05"]


def test_png_is_written_atomically(tmp_path):
    path = save_png_atomic(Image.new("RGB", (3, 2), (1, 2, 3)), tmp_path / "sub" / "x.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(path).size == (3, 2)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary left beside it
