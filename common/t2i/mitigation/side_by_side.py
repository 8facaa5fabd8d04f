"""The side-by-side picture of mitigation runs: one row per run (method and setting), one column per prompt.

Each tile is a prompt's first generation as the run saved it (``images/{row}.png``, the grid of its generations):
every method starts prompt i from the same noise, so a column compares the methods on one starting point. A row of
ground-truth images (the prompt's first training image) leads when the run has them. The picture is built from the
files on disk, so a resumed run's picture holds every prompt, the earlier runs' included; tiny models' 16–32 px
images are enlarged with nearest neighbour to tiles of at least 256 px (``common.plotting.labelled_grid``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffmem.common.plotting import labelled_grid, save_png_atomic
from diffmem.common.results import read_results
from diffmem.common.t2i.groundtruth import find_ground_truth, load_images
from diffmem.common.t2i.sampler import grid_cell

SIDE_BY_SIDE_FILE = "side_by_side.png"
MAX_PROMPTS = 8  # columns: the run's first 8 prompts (256-px tiles; more would make an unwieldy picture)
PROMPT_EXCERPT = 40  # characters of a prompt in its column's label
GROUND_TRUTH_LABEL = "ground truth"


def prompt_label(record) -> str:
    """A column's label: the prompt's dataset index (else its row) and the start of its text."""
    key = record.index if record.index is not None else record.row
    text = record.prompt if len(record.prompt) <= PROMPT_EXCERPT else record.prompt[:PROMPT_EXCERPT].rstrip() + "…"
    return f"#{key}: {text}"


def run_tiles(run_dir: str | Path, records: Sequence, num_images: int) -> list:
    """The first generation of each record in a run folder (None where the run has no image for it)."""
    from PIL import Image

    run_dir = Path(run_dir)
    image_of = {r["row"]: r.get("image") for r in read_results(run_dir / "results.jsonl")}
    tiles = []
    for rec in records:
        rel = image_of.get(rec.row)
        path = run_dir / rel if rel else None
        if path is None or not path.is_file():
            tiles.append(None)
            continue
        try:
            with Image.open(path) as grid:
                tiles.append(grid_cell(grid.convert("RGB"), 0, num_images))
        except OSError:  # an unreadable picture must not fail the run whose results are already written
            tiles.append(None)
    return tiles


def ground_truth_tiles(gt_root: Path | None, records: Sequence) -> list:
    """Each record's first ground-truth image (None where it has none)."""
    tiles = []
    for rec in records:
        gt = find_ground_truth(gt_root, rec.index if rec.index is not None else rec.row)
        try:
            tiles.append(load_images(gt.paths[:1])[0] if gt.paths else None)
        except OSError:
            tiles.append(None)
    return tiles


def write_side_by_side(path: str | Path, records: Sequence, runs: Sequence[tuple[str, str | Path]],
                       num_images: int, gt_root: Path | None = None, title: str | None = None) -> Path | None:
    """PNG of the runs (label, run folder) × the first MAX_PROMPTS records, after a ground-truth row when gt_root
    holds any of them; written atomically. None (nothing written) when no run has an image yet."""
    shown = list(records)[:MAX_PROMPTS]
    rows = [(label, run_tiles(run_dir, shown, num_images)) for label, run_dir in runs]
    gt = ground_truth_tiles(gt_root, shown) if gt_root is not None else []
    if any(t is not None for t in gt):
        rows.insert(0, (GROUND_TRUTH_LABEL, gt))
    if not any(t is not None for _, tiles in rows for t in tiles):
        return None
    more = f" (the first {len(shown)} of {len(records)} prompts)" if len(records) > len(shown) else ""
    grid = labelled_grid([tiles for _, tiles in rows], row_labels=[label for label, _ in rows],
                         col_labels=[prompt_label(r) for r in shown],
                         title=(title or "first generation of each prompt") + more)
    return save_png_atomic(grid.image, path)
