"""Off-screen matplotlib figures for the PNGs diffmem writes.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so writing a plot never switches the
global backend or leaks figures: the same functions work in scripts, headless CI and notebooks (where
``IPython.display`` can show the returned figure). A wing's own figures live in its rooms (the EMM curve in
``common.edm.emm.plot``). Pictures of images (methods × prompts, samples beside their nearest training images) are
drawn with PIL by :func:`labelled_grid`, so that every tile is the source's pixels exactly, enlarged by an integer
factor. PNGs are written to a temporary name and renamed into place, so a killed run leaves no torn picture.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np


def new_axes(figsize: tuple[float, float]):
    """(figure, axes) of a standalone figure that needs no pyplot and no display."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot()


def save_figure_atomic(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure as PNG to a temporary name beside path, then rename it into place (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, path)
    return path


def save_png_atomic(image, path: str | Path) -> Path:
    """Write a PIL image as PNG to a temporary name beside path, then rename it into place (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------- labelled image grids

GRID_TILE = 256  # px: a labelled grid's tiles have their shorter side this long (small images: at least this)
GRID_GAP = 4  # px of white between tiles
GRID_FONT_SIZE = 14
GRID_EMPTY = (224, 224, 224)  # a cell without an image


class LabelledGrid(NamedTuple):
    """A grid picture and where each tile landed: boxes[r][c] = (left, top, right, bottom), None for empty."""

    image: object  # PIL.Image.Image, RGB
    boxes: list[list[tuple[int, int, int, int] | None]]


def as_rgb_image(image):
    """A PIL RGB image from a PIL image or a uint8 array (H×W, H×W×1, H×W×3 or H×W×4)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(a).convert("RGB")


def upscale_factor(height: int, width: int, tile: int = GRID_TILE) -> int:
    """The integer nearest-neighbour factor that brings an image's shorter side to at least tile px (1 if it is)."""
    return max(1, math.ceil(tile / min(height, width)))


def fit_tile(image, tile: int = GRID_TILE):
    """An image as a grid tile whose shorter side is about tile px: a small image enlarged by an integer factor with
    nearest neighbour (every source pixel an exact k×k block: tiny models' pixels stay visible), a large one reduced
    (Lanczos) so that its shorter side is tile."""
    from PIL import Image

    im = as_rgb_image(image)
    w, h = im.size
    if min(w, h) < tile:
        k = upscale_factor(h, w, tile)
        return im.resize((w * k, h * k), Image.NEAREST)
    if min(w, h) > tile:
        scale = tile / min(w, h)
        return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    return im


def grid_font(size: int = GRID_FONT_SIZE):
    """Pillow's built-in font at size (a scalable one where Pillow has FreeType, else its bitmap font)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def fit_text(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """text wrapped at spaces (explicit newlines kept) into at most max_lines lines of at most width px; the
    last line cut with '…' where the text does not fit."""
    def fits(s: str) -> bool:
        return draw.textlength(s, font=font) <= width

    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}" if current else word
            if fits(candidate) or not current:
                current = candidate
            else:
                lines.append(current)
                current = word
        lines.append(current)
    cut = len(lines) > max_lines
    lines = lines[:max_lines]
    last = lines[-1]
    if cut or not fits(last):
        while last and not fits(last + "…"):
            last = last[:-1]
        lines[-1] = last.rstrip() + "…"
    return lines


def labelled_grid(rows, row_labels=(), col_labels=(), title: str | None = None, tile: int = GRID_TILE,
                  label_lines: int = 3, max_row_label_px: int = 320) -> LabelledGrid:
    """rows × columns of images (PIL images or uint8 arrays; None leaves a grey cell), each made a tile by
    :func:`fit_tile`, with a label left of each row, above each column and an optional title, in one RGB picture.

    Cells are as large as the largest tile; a smaller tile is centred in its cell. Labels are wrapped and cut to
    fit (columns: the cell's width, label_lines lines; rows: at most max_row_label_px px wide).
    """
    from PIL import Image, ImageDraw

    rows = [list(r) for r in rows]
    if not rows or not any(im is not None for r in rows for im in r):
        raise ValueError("labelled_grid needs at least one image")
    n_cols = max(len(r) for r in rows)
    tiles = [[None if im is None else fit_tile(im, tile) for im in r] + [None] * (n_cols - len(r)) for r in rows]
    cell_w = max(t.size[0] for r in tiles for t in r if t is not None)
    cell_h = max(t.size[1] for r in tiles for t in r if t is not None)
    font = grid_font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = GRID_FONT_SIZE + 4
    pad = 8

    row_text = [fit_text(measure, str(s), font, max_row_label_px, label_lines) for s in row_labels]
    left = (max((measure.textlength(s, font=font) for lines in row_text for s in lines), default=0) + 2 * pad
            if row_text else 0)
    left = int(math.ceil(left))
    col_text = [fit_text(measure, str(s), font, cell_w, label_lines) for s in col_labels]
    top_labels = max((len(lines) for lines in col_text), default=0) * line_h + (pad if col_text else 0)
    width = left + n_cols * (cell_w + GRID_GAP) + GRID_GAP
    title_lines = fit_text(measure, title, font, width - 2 * pad, 2) if title else []
    top = len(title_lines) * line_h + (pad if title_lines else 0) + top_labels
    height = top + len(rows) * (cell_h + GRID_GAP) + GRID_GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad // 2
    for s in title_lines:
        draw.text((pad, y), s, fill="black", font=font)
        y += line_h
    for c, lines in enumerate(col_text):
        x0 = left + GRID_GAP + c * (cell_w + GRID_GAP)
        for i, s in enumerate(lines):
            draw.text((x0, top - top_labels + i * line_h), s, fill="black", font=font)
    boxes: list[list[tuple[int, int, int, int] | None]] = []
    for r, row in enumerate(tiles):
        y0 = top + GRID_GAP + r * (cell_h + GRID_GAP)
        if r < len(row_text):
            text_top = y0 + (cell_h - len(row_text[r]) * line_h) // 2
            for i, s in enumerate(row_text[r]):
                draw.text((pad, text_top + i * line_h), s, fill="black", font=font)
        row_boxes: list[tuple[int, int, int, int] | None] = []
        for c, t in enumerate(row):
            x0 = left + GRID_GAP + c * (cell_w + GRID_GAP)
            if t is None:
                draw.rectangle((x0, y0, x0 + cell_w - 1, y0 + cell_h - 1), fill=GRID_EMPTY)
                row_boxes.append(None)
                continue
            x, yy = x0 + (cell_w - t.size[0]) // 2, y0 + (cell_h - t.size[1]) // 2
            canvas.paste(t, (x, yy))
            row_boxes.append((x, yy, x + t.size[0], yy + t.size[1]))
        boxes.append(row_boxes)
    return LabelledGrid(canvas, boxes)
