"""Ground-truth training images of memorized prompts, for measuring replication with SSCD.

Two layouts are read:

* Wen et al.'s: a folder ``{dir}`` holding ``{dir}/{name}.jsonl`` (rows with ``caption`` and ``index``) and
  ``{dir}/gt_images/{index}/*.png`` — e.g. ``sdv1_500_mem_groundtruth/sdv1_500_mem_groundtruth.jsonl``.
  ``--dataset`` may name the folder itself or its jsonl.
* the lab's: ``gt_images/{index}/`` next to the prompt file (a row without an ``index`` uses its row number).

``--gt_dir`` overrides where the folders are looked for: a folder holding ``gt_images/``, or the folder of
``{index}/`` subfolders itself. A prompt whose folder is missing or holds no image is reported (status
``missing`` / ``empty``), never an error.

A registry set (``set:NAME``) has no folder of its own: its ground truth is looked for under ``--gt_dir`` only, and
:func:`coverage` counts how many of its prompts have images there — ground-truth links rot, so only part of a set's
source images can still be downloaded, and every metric against ground truth states over how many prompts it was
taken (:func:`coverage_phrase`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from diffmem.common.t2i.prompt_sets import SET_PREFIX, read_prompt_set

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class GroundTruth:
    """The ground-truth image files of one prompt and whether they were found (ok, missing, empty, no_root)."""

    key: str
    folder: Path | None
    paths: tuple[Path, ...]
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def resolve_dataset_path(dataset: str | Path) -> Path | str:
    """The prompt file for --dataset: a Wen-style folder ``{dir}`` maps to ``{dir}/{dir.name}.jsonl``."""
    path = Path(dataset).expanduser()
    if path.is_dir():
        candidate = path / f"{path.name}.jsonl"
        if candidate.is_file():
            return candidate
        jsonls = sorted(path.glob("*.jsonl"))
        if len(jsonls) == 1 and (path / "gt_images").is_dir():
            return jsonls[0]
    return dataset


def resolve_gt_root(dataset_file: str | Path, gt_dir: str | Path | None = None) -> Path | None:
    """The folder of per-index ground-truth subfolders, or None when there is none to look in."""
    if gt_dir is not None:
        root = Path(gt_dir).expanduser()
        return root / "gt_images" if (root / "gt_images").is_dir() else root
    if str(dataset_file).startswith(SET_PREFIX):
        return None  # a registry set lies in the package or the cache, never beside its ground truth
    candidate = Path(dataset_file).expanduser().parent / "gt_images"
    return candidate if candidate.is_dir() else None


def find_ground_truth(root: Path | None, key) -> GroundTruth:
    """The image files under ``{root}/{key}/`` (sorted by name), with a status instead of an exception."""
    key = str(key)
    if root is None:
        return GroundTruth(key, None, (), "no_root")
    folder = root / key
    if not folder.is_dir():
        return GroundTruth(key, folder, (), "missing")
    paths = tuple(sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
    return GroundTruth(key, folder, paths, "ok" if paths else "empty")


def load_images(paths) -> list:
    """PIL RGB images of the given files (fully read, files closed)."""
    from PIL import Image

    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return images


def ground_truth_key(index, row: int):
    """The folder name of a prompt's ground truth: its index, or its row where the set has no index (the lab's)."""
    return index if index is not None else row


@dataclass(frozen=True)
class GroundTruthCoverage:
    """How many prompts of a set have ground-truth images under a root: counts by status, the keys lacking them."""

    name: str
    root: Path | None
    total: int
    statuses: dict
    lacking: tuple

    @property
    def present(self) -> int:
        return self.statuses.get("ok", 0)


def coverage(name: str, gt_dir: str | Path | None, cache: str | Path | None = None) -> GroundTruthCoverage:
    """Ground-truth coverage of the registry set ``name`` under gt_dir (a folder holding gt_images/, or the folder
    of per-index subfolders itself)."""
    rows = read_prompt_set(name, cache)
    root = resolve_gt_root(f"{SET_PREFIX}{name}", gt_dir)
    found = [find_ground_truth(root, ground_truth_key(r.index, r.row)) for r in rows]
    statuses = dict(Counter(gt.status for gt in found))
    return GroundTruthCoverage(name, root, len(rows), statuses, tuple(gt.key for gt in found if not gt.ok))


def coverage_phrase(metric: str, with_ground_truth: int, total: int) -> str:
    """``SSCD over 416 of 500 with ground truth``: the n a ground-truth metric was taken over."""
    return f"{metric} over {with_ground_truth} of {total} with ground truth"
