"""One reader for the images the unconditional arm measures: generated ones and datasets.

``open_images`` reads a folder of images (recursively; detect/generate.py's ``{seed:06d}.png``, any other names
too), an EDM dataset zip (its members) or a detect/generate.py ``images.npz`` (``images`` uint8 N×H×W×C, optional
``seeds``). Every caller (detect/mem_ratio.py's --images, detect/similarity.py's features) gets the same fields, the
same seed rule (``seed_from_name``: a ``{digits}.png`` name is that seed, any other name has none, −1) and the same
checks, so a set that one command accepts the other reads alike.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from diffmem.common.edm.dataset.edm_zip import DatasetError, open_npz
from diffmem.common.edm.dataset.sources import open_source
from diffmem.common.errors import DiffmemError

IMAGES_HINT = "a folder of PNGs, an EDM dataset zip or a detect/generate.py images.npz"
NO_SEED = -1


class ImagesError(DiffmemError, ValueError):
    """Images that cannot be read as a set; str() is the one-line message."""


class ImageSet(NamedTuple):
    """Images by position: where they are, names, seeds (int64, −1 where an image has none), a loader of image i
    as uint8 H×W×C (C 1 or 3) and a closer (an open zip)."""

    where: str
    names: list[str]
    seeds: np.ndarray
    load: Callable[[int], np.ndarray]
    close: Callable[[], None] = lambda: None

    @property
    def has_seeds(self) -> bool:
        """Every image has its own seed (so results can be keyed by seed)."""
        return bool(len(self.seeds)) and (self.seeds >= 0).all() and len(np.unique(self.seeds)) == len(self.seeds)


def seed_from_name(name: str) -> int:
    """The seed of a ``{seed:06d}.png`` name (detect/generate.py's; any folder prefix), else −1."""
    m = re.fullmatch(r"(\d+)\.png", Path(name).name, flags=re.IGNORECASE)
    return int(m.group(1)) if m else NO_SEED


def _is_npz(path: Path) -> bool:
    """An npz by its suffix, or a zip holding .npy members only (EDM dataset zips hold PNGs)."""
    if path.suffix.lower() == ".npz":
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def _npz_images(path: Path, where: str) -> ImageSet:
    """A detect/generate.py images.npz: ``images`` uint8 N×H×W×C and, optionally, one distinct integer seed each."""
    with open_npz(path, ImagesError) as z:
        if "images" not in z.files:
            hint = " (it is a features file; pass it to rpscore/mscore)" if "features" in z.files else ""
            raise ImagesError(f"{path}: no 'images' array (expected uint8 N×H×W×C, as detect/generate.py --npz "
                              f"writes){hint}")
        try:
            images = z["images"]
            seeds = np.asarray(z["seeds"]) if "seeds" in z.files else np.full(len(images), NO_SEED, np.int64)
        except Exception as exc:  # a damaged member: zlib, format and value errors
            raise ImagesError(f"{path}: cannot read the npz ({type(exc).__name__}: {exc})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) or len(images) == 0:
        raise ImagesError(f"{path}: expected 'images' uint8 N×H×W×C with N >= 1 and C 1 or 3, got "
                          f"{images.dtype} {'×'.join(map(str, images.shape))}")
    given = seeds[seeds != NO_SEED] if seeds.ndim == 1 else seeds
    if (seeds.shape != (len(images),) or seeds.dtype.kind not in "iu" or (given < 0).any()
            or len(np.unique(given)) != len(given)):
        raise ImagesError(f"{path}: expected 'seeds' to hold one distinct integer >= 0 per image ({len(images)})")
    seeds = seeds.astype(np.int64)
    names = [f"{s:06d}" if s >= 0 else f"row{i}" for i, s in enumerate(seeds.tolist())]
    return ImageSet(where, names, seeds, lambda i: images[i])


def open_images(path: str | Path) -> ImageSet:
    """The images of a folder (recursively, in path order), an EDM dataset zip (member order) or a generate.py
    npz (row order); a path that is none of these, or unreadable, raises ImagesError (one line)."""
    where = str(path)
    path = Path(path)
    if not path.exists():
        raise ImagesError(f"{path}: no such file or folder (expected {IMAGES_HINT})")
    if path.is_file() and _is_npz(path):
        return _npz_images(path, where)
    if path.is_file() and not zipfile.is_zipfile(path):
        raise ImagesError(f"{path}: expected {IMAGES_HINT}, got a file that is none of these")
    try:
        src = open_source(path.resolve())  # resolved: the bare name 'digits' would mean scikit-learn's digits there
    except DatasetError as exc:
        raise ImagesError(str(exc)) from None

    def load(i: int) -> np.ndarray:
        try:
            return src.image(i)
        except DatasetError as exc:
            raise ImagesError(str(exc)) from None

    seeds = np.array([seed_from_name(n) for n in src.names], dtype=np.int64)
    return ImageSet(where, list(src.names), seeds, load, lambda: src.__exit__(None, None, None))
