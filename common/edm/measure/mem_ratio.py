"""Gu et al.'s memorization ratio of an EDM training run, snapshot by snapshot, and its maximum over the run.

A generated sample is *memorized* when its nearest training image is much closer than the second nearest:
d1/d2 < 1/3 (strict), with DiffMemorize's distance, the L2 norm of the uint8 values (as floats in [0, 255]) over all
pixels divided by √(C·H·W). 0/0 (a sample equal to two identical training images) is not memorized, as in
DiffMemorize (its NaN ratio fails the comparison); such samples are counted and reported. The ratio of a model is
the fraction of memorized samples; Gu et al. take the highest ratio over the training snapshots.

Samples are those of ``common.edm.sampler.generate_images`` (the per-seed rule of ``detect/generate.py``), uint8 as
its PNGs hold them. Nearest neighbours come from ``common.edm.measure.knn.exact_knn``: exact (float64, ties to the
lowest
training index), where DiffMemorize's fp32 ``torch.cdist`` picks wrong neighbours for near-duplicates.

Outputs, in an output folder (the run folder by default): ``knn-dist/<name>.npz`` (``knn_distance`` N×2 normalised,
``knn_index`` N×2, ``seeds``), ``mem_ratio.jsonl`` (one row per snapshot), ``mem_traj.log`` (one readable line per
snapshot), ``mem_ratio_summary.json`` (the maximum and its snapshot), ``mem_ratio.png`` (ratio vs images seen
beside the d1/d2 histogram of the snapshot of the maximum; for a single snapshot or image set, that histogram
alone), ``mem-plots/<name>-d1d2.png`` (each one's d1/d2 histogram, the 1/3 line drawn), ``mem-plots/<name>-nearest.png``
(its SHOWN most memorized samples, smallest d1/d2 first, each beside its nearest training image, labelled with the
ratio; tiny images enlarged with nearest neighbour to 256-px tiles) and ``mem_ratio_settings.json`` (what the
numbers depend on; a resumed run must match it). A snapshot is finished when it has its row and its npz (its
pictures are written before them); the summary, log and plot are rewritten from the rows after each snapshot (a
missing histogram is redrawn from its npz), and every file is written to a temporary name and renamed, so a
killed run resumes by redoing only the unfinished snapshot.

Processes: each process measures the seeds ``seeds[rank::world]`` (every seed exactly once, any process count),
writes its shard to ``knn-dist/.<name>.part-<rank>-of-<world>.npz``; after a barrier process 0 merges the shards in
the requested seed order and writes the results.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from diffmem.common.edm.images import ImagesError, open_images
from diffmem.common.errors import DiffmemError
from diffmem.common.plotting import labelled_grid, new_axes, save_figure_atomic, save_png_atomic
from diffmem.common.results import check_run_settings, read_results, write_json_atomic

MEM_RATIO_THRESHOLD = 1 / 3  # memorized ⇔ d1/d2 < MEM_RATIO_THRESHOLD (Gu et al., DiffMemorize's mem_ratio.py)
K = 2
KNN_DIR = "knn-dist"
ROWS_FILE = "mem_ratio.jsonl"
SUMMARY_FILE = "mem_ratio_summary.json"
PLOT_FILE = "mem_ratio.png"
LOG_FILE = "mem_traj.log"
MEM_RATIO_SETTINGS_FILE = "mem_ratio_settings.json"
IMAGES_DIR = "mem-images"
PLOTS_DIR = "mem-plots"
SHOWN = 8  # the most memorized samples drawn beside their nearest training images
HIST_BINS = 50  # d1/d2 lies in [0, 1]: bins 0.02 wide


class MemRatioError(DiffmemError, ValueError):
    """Unusable input for the memorization ratio (run folder, snapshots, images, reference set); one line."""


# ------------------------------------------------------------------------------------------------ the metric


def normalized_l2(sqdist, dim: int) -> np.ndarray:
    """DiffMemorize's distance from squared L2 distances of uint8 values: √(Σ(x − y)²) / √(C·H·W), float64."""
    return np.sqrt(np.asarray(sqdist, dtype=np.float64)) / math.sqrt(dim)


def d1_d2(d1, d2) -> np.ndarray:
    """Per sample the ratio d1/d2 (float64; NaN for 0/0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(d1, dtype=np.float64) / np.asarray(d2, dtype=np.float64)


def memorized(d1, d2) -> np.ndarray:
    """Per sample: d1/d2 < 1/3 (strict); 0/0 is not memorized (NaN compares false, as in DiffMemorize)."""
    with np.errstate(invalid="ignore"):
        return d1_d2(d1, d2) < MEM_RATIO_THRESHOLD


def most_memorized(d1, d2, n: int = SHOWN) -> np.ndarray:
    """Positions of the n samples with the smallest d1/d2 (the most memorized first; ties to the earlier position,
    0/0 after every other sample, as it is not memorized)."""
    return np.argsort(d1_d2(d1, d2), kind="stable")[:n]


def memorization_ratio(d1, d2) -> float:
    """Fraction of samples with d1/d2 < 1/3 (Gu et al.'s memorization ratio); NaN for no samples."""
    flags = memorized(d1, d2)
    return float(flags.mean()) if flags.size else math.nan


def zero_zero_count(d1, d2) -> int:
    """Samples with d1 = d2 = 0 (equal to two identical training images): 0/0, counted as not memorized."""
    return int(((np.asarray(d1) == 0) & (np.asarray(d2) == 0)).sum())


class Neighbours(NamedTuple):
    distance: np.ndarray  # float64 N×2, normalised (normalized_l2)
    index: np.ndarray  # int64 N×2 training indices
    fallbacks: int  # queries the exact kNN recomputed against the whole set


def nearest_training_images(samples_nhwc: np.ndarray, train_nchw: np.ndarray, device="cpu",
                            progress: bool = False) -> Neighbours:
    """The two nearest training images of each uint8 sample (N×H×W×C) among uint8 training images (M×C×H×W)."""
    from diffmem.common.edm.measure.knn import exact_knn

    dim = int(np.prod(train_nchw.shape[1:]))
    if len(samples_nhwc) == 0:
        return Neighbours(np.zeros((0, K)), np.zeros((0, K), dtype=np.int64), 0)
    # Both sets flattened in C×H×W order: the distance does not depend on the order, only on it being the same.
    queries = np.ascontiguousarray(np.asarray(samples_nhwc).transpose(0, 3, 1, 2))
    found = exact_knn(queries, train_nchw, K, device=device, progress=progress, desc="nearest training images")
    return Neighbours(normalized_l2(found.sqdist, dim), found.index, found.fallbacks)


def ratio_row(name: str, images_seen: int | None, kimg: float | None, neighbours: Neighbours,
              seconds: float | None = None) -> dict:
    """The mem_ratio.jsonl row of one snapshot (or image set)."""
    d1, d2 = neighbours.distance[:, 0], neighbours.distance[:, 1]
    flags = memorized(d1, d2)
    return {"snapshot": name, "images_seen": images_seen, "kimg": kimg, "ratio": memorization_ratio(d1, d2),
            "memorized": int(flags.sum()), "n": int(len(d1)), "mean_d1": float(d1.mean()) if len(d1) else None,
            "mean_d2": float(d2.mean()) if len(d2) else None, "zero_zero": zero_zero_count(d1, d2),
            "knn_fallbacks": int(neighbours.fallbacks), "seconds": None if seconds is None else round(seconds, 3)}


def _training_order(row: dict) -> tuple:
    return (row["images_seen"] is None, row["images_seen"] or 0, row["snapshot"])


def summarize(rows: Sequence[dict]) -> dict:
    """The maximum ratio over the snapshots (ties: the earliest snapshot reaching it) and a per-snapshot table."""
    ordered = sorted(rows, key=_training_order)
    best = max(ordered, key=lambda r: r["ratio"])  # max keeps the first of equal ratios
    latest = ordered[-1]
    return {"max_ratio": best["ratio"], "max_snapshot": best["snapshot"], "max_images_seen": best["images_seen"],
            "max_kimg": best["kimg"], "n": best["n"], "max_memorized": best["memorized"],
            "max_zero_zero": best["zero_zero"], "snapshots": len(ordered), "threshold": MEM_RATIO_THRESHOLD,
            "latest_snapshot": latest["snapshot"], "latest_ratio": latest["ratio"],
            "per_snapshot": [{k: r[k] for k in ("snapshot", "images_seen", "kimg", "ratio", "n", "zero_zero")}
                             for r in ordered]}


@dataclass(frozen=True)
class RatioSummary:
    """What other stages read of ``mem_ratio_summary.json``: the maximum ratio over the snapshots and where."""
    max_ratio: float
    max_snapshot: str | None = None
    max_images_seen: int | None = None
    n: int | None = None


def read_summary(path: str | Path) -> RatioSummary:
    """A run's ``mem_ratio_summary.json`` (see :func:`summarize`); MemRatioError when unreadable or no max_ratio."""
    try:
        doc = json.loads(Path(path).read_text())
        return RatioSummary(float(doc["max_ratio"]), doc.get("max_snapshot"), doc.get("max_images_seen"),
                            doc.get("n"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise MemRatioError(f"{path}: unreadable or has no max_ratio") from None


def log_line(row: dict) -> str:
    """One readable mem_traj.log line."""
    seen = "-" if row["images_seen"] is None else f"{row['images_seen']} images ({row['kimg']:g} kimg)"
    d1 = "-" if row["mean_d1"] is None else f"{row['mean_d1']:.4f}"
    return (f"{row['snapshot']}  {seen}  mem_ratio {row['ratio']:.4f} ({row['memorized']}/{row['n']})  "
            f"mean_d1 {d1}  zero_zero {row['zero_zero']}  knn_fallbacks {row['knn_fallbacks']}")


def draw_ratio_histogram(ax, d1, d2, title: str) -> None:
    """The histogram of d1/d2 on ax, with the 1/3 line below which a sample is memorized (0/0 samples counted in
    the legend: they have no ratio)."""
    r = d1_d2(d1, d2)
    finite = r[np.isfinite(r)]
    flags = memorized(d1, d2)
    ax.hist(finite, bins=np.linspace(0, 1, HIST_BINS + 1), color="tab:blue", alpha=0.8)
    ax.axvspan(0, MEM_RATIO_THRESHOLD, color="tab:red", alpha=0.08)
    zero_zero = zero_zero_count(d1, d2)
    ax.axvline(MEM_RATIO_THRESHOLD, color="tab:red", linestyle="--",
               label=f"d1/d2 = 1/3: memorized below ({int(flags.sum())} of {len(r)})"
                     + (f"; {zero_zero} at 0/0" if zero_zero else ""))
    ax.set(xlabel="d1/d2 (nearest / second-nearest training image)", ylabel="samples", xlim=(0, 1), title=title)
    ax.legend(fontsize="small")


def plot_ratio_histogram(d1, d2, path: str | Path, title: str):
    """PNG of one snapshot's (or image set's) d1/d2 histogram with the 1/3 line; written atomically; the figure."""
    fig, ax = new_axes((6, 4))
    draw_ratio_histogram(ax, d1, d2, title)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return fig


def nearest_pairs_grid(samples_nhwc: np.ndarray, seeds: Sequence[int], neighbours: Neighbours,
                       train_nchw: np.ndarray, title: str):
    """The labelled grid of samples (one per row, the most memorized first) beside their nearest training images,
    each row labelled with its seed, d1/d2 and the training image's index (``common.plotting.labelled_grid``)."""
    ratio = d1_d2(neighbours.distance[:, 0], neighbours.distance[:, 1])
    nearest = neighbours.index[:, 0]
    rows = [[samples_nhwc[i], np.ascontiguousarray(train_nchw[nearest[i]].transpose(1, 2, 0))]
            for i in range(len(samples_nhwc))]
    labels = [f"seed {seeds[i]}\nd1/d2 {ratio[i]:.3f}" + (" (memorized)" if ratio[i] < MEM_RATIO_THRESHOLD else "")
              + f"\ntraining image #{nearest[i]}" for i in range(len(samples_nhwc))]
    return labelled_grid(rows, row_labels=labels, col_labels=["generated", "nearest training image"], title=title)


def plot_mem_ratio(rows: Sequence[dict], path: str | Path, d1=None, d2=None) -> None:
    """PNG of the memorization ratio (%) against training images seen, the maximum marked, beside the d1/d2
    histogram of the snapshot of the maximum (when its d1, d2 are given); one row (one image set, one snapshot):
    its histogram alone. Written atomically."""
    from matplotlib.figure import Figure

    ordered = sorted(rows, key=_training_order)
    best = max(range(len(ordered)), key=lambda i: ordered[i]["ratio"])
    hist = d1 is not None and d2 is not None
    panels = int(len(ordered) > 1 or not hist) + int(hist)
    fig = Figure(figsize=(6 * panels, 4))
    if hist:
        ax = fig.add_subplot(1, panels, panels)
        draw_ratio_histogram(ax, d1, d2, f"{ordered[best]['snapshot']}: d1/d2 of {len(d1)} samples")
    if panels == 1 and hist:
        fig.tight_layout()
        save_figure_atomic(fig, path)
        return
    ax = fig.add_subplot(1, panels, 1)
    by_images = all(r["images_seen"] is not None for r in ordered)
    xs = [r["images_seen"] for r in ordered] if by_images else list(range(len(ordered)))
    ys = [100 * r["ratio"] for r in ordered]
    ax.plot(xs, ys, marker="o", markersize=4, label="memorization ratio")
    ax.plot([xs[best]], [ys[best]], marker="*", markersize=14, color="tab:red", linestyle="none",
            label=f"max {ys[best]:.1f} % ({ordered[best]['snapshot']})")
    if not by_images:
        ax.set_xticks(xs, [r["snapshot"] for r in ordered], rotation=30, ha="right", fontsize="small")
    ax.set(xlabel="training images seen" if by_images else "image set", ylabel="memorized samples (%)",
           ylim=(-2, 102), title="Memorization ratio (d1/d2 < 1/3)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure_atomic(fig, path)


# ------------------------------------------------------------------------------------------------- snapshots


def select_snapshots(run_dir: str | Path, spec: str = "all") -> list[tuple[int, Path]]:
    """(images seen, path) of the snapshots to measure, newest first: ``all``, ``latest`` or ``K1,K2,…`` (images
    seen numbers or snapshot folder names)."""
    from diffmem.common.edm.networks.snapshot import list_snapshots, snapshot_label

    found = list_snapshots(run_dir)
    if not found:
        if not Path(run_dir).is_dir():
            raise MemRatioError(f"{run_dir}: no such run folder")
        raise MemRatioError(f"{run_dir}: no snapshot-* folder with a snapshot.json and no network-snapshot-*.pkl "
                            "(expected a training run: ours, EDM's or DiffMemorize's)")
    spec = spec.strip()
    if spec == "all":
        chosen = found
    elif spec == "latest":
        chosen = found[-1:]
    else:
        by_name = {**{p.name: (n, p) for n, p in found}, **{snapshot_label(p): (n, p) for n, p in found}}
        by_number = {n: (n, p) for n, p in found}
        chosen = []
        for part in (s.strip() for s in spec.split(",")):
            hit = by_name.get(part) or (by_number.get(int(part)) if re.fullmatch(r"\d+", part) else None)
            if hit is None:
                raise MemRatioError(f"bad --snapshots {spec!r}: {part!r} is not a snapshot of {run_dir} (have "
                                    f"{', '.join(str(n) for n, _ in found[:5])}{', …' if len(found) > 5 else ''})")
            if hit in chosen:
                raise MemRatioError(f"bad --snapshots {spec!r}: snapshot {hit[1].name} is listed more than once")
            chosen.append(hit)
    return sorted(chosen, reverse=True)


# ----------------------------------------------------------------------------------------- generated images


class ImageSource(NamedTuple):
    """A set of generated uint8 images to measure: its name, seeds (one per image) and a loader by position."""

    name: str
    seeds: list[int]
    shape: tuple[int, int, int]  # C×H×W
    load: Callable[[Sequence[int]], np.ndarray]  # positions → uint8 N×H×W×C


def load_measured_images(path: str | Path, progress: bool = False) -> ImageSource:
    """Generated images to measure, read by common.edm.images (a folder of PNGs, an EDM zip or an images.npz), all
    decoded up front, in every process: an unreadable file stops all of them alike, not one at a barrier. Their
    seeds are the set's (generate.py's names, the npz's seeds) when every image has its own, else positions."""
    from tqdm.auto import tqdm


    path = Path(path)
    try:
        found = open_images(path)
        try:
            images = None
            for i in tqdm(range(len(found.names)), desc="reading", unit="img", disable=not progress, leave=False,
                          delay=2.0):
                image = found.load(i)
                if images is None:
                    images = np.empty((len(found.names), *image.shape), dtype=np.uint8)
                elif image.shape != images.shape[1:]:
                    raise MemRatioError(f"{path / found.names[i] if path.is_dir() else path}: image is "
                                        f"{'×'.join(map(str, image.shape))} (H×W×C), expected "
                                        f"{'×'.join(map(str, images.shape[1:]))} like {found.names[0]}")
                images[i] = image
        finally:
            found.close()
    except ImagesError as exc:
        raise MemRatioError(str(exc)) from None
    seeds = found.seeds.tolist() if found.has_seeds else list(range(len(images)))
    _, h, w, c = images.shape
    name = path.resolve().name if path.is_dir() else path.stem
    return ImageSource(name, seeds, (c, h, w), lambda pos: images[np.asarray(pos, dtype=int)])


# ---------------------------------------------------------------------------------------------- output files


@dataclass(frozen=True)
class MemRatioFiles:
    root: Path
    log: Path  # mem_traj.log; RUN/mem_traj.log unless chosen

    @classmethod
    def at(cls, root: str | Path, log: str | Path | None = None) -> MemRatioFiles:
        root = Path(root)
        return cls(root, Path(log) if log is not None else root / LOG_FILE)

    @property
    def knn_dir(self) -> Path:
        return self.root / KNN_DIR

    @property
    def rows(self) -> Path:
        return self.root / ROWS_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def plot(self) -> Path:
        return self.root / PLOT_FILE

    @property
    def settings(self) -> Path:
        return self.root / MEM_RATIO_SETTINGS_FILE

    def knn_npz(self, name: str) -> Path:
        return self.knn_dir / f"{name}.npz"

    def part_npz(self, name: str, rank: int, world: int) -> Path:
        return self.knn_dir / f".{name}.part-{rank}-of-{world}.npz"

    def images(self, name: str) -> Path:
        return self.root / IMAGES_DIR / name

    @property
    def plots_dir(self) -> Path:
        return self.root / PLOTS_DIR

    def histogram(self, name: str) -> Path:
        """The d1/d2 histogram of one snapshot (or image set)."""
        return self.plots_dir / f"{name}-d1d2.png"

    def nearest(self, name: str) -> Path:
        """Its most memorized samples beside their nearest training images."""
        return self.plots_dir / f"{name}-nearest.png"


def write_npz_atomic(path: Path, **arrays) -> None:
    """np.savez to a temporary name beside path, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a temporary name
        np.savez(f, **arrays)
    os.replace(tmp, path)


def write_knn_npz(path: Path, neighbours: Neighbours, seeds: Sequence[int]) -> None:
    """knn_distance (float64 N×2, normalised), knn_index (int64 N×2) and seeds (int64), atomically."""
    write_npz_atomic(path, knn_distance=neighbours.distance, knn_index=neighbours.index,
                     seeds=np.asarray(seeds, dtype=np.int64))


def finished(paths: MemRatioFiles, rows: Iterable[dict]) -> set[str]:
    """Names with both a row and their knn npz: the snapshots a resumed run skips."""
    return {r["snapshot"] for r in rows if paths.knn_npz(r["snapshot"]).is_file()}


def store_row(paths: MemRatioFiles, row: dict) -> list[dict]:
    """Rewrite mem_ratio.jsonl atomically with row in place of any earlier row of its name; all rows."""
    rows = [r for r in read_results(paths.rows, repair=True) if r["snapshot"] != row["snapshot"]] + [row]
    write_json_atomic(paths.rows, rows, jsonl=True)
    return rows


def write_reports(paths: MemRatioFiles, rows: Sequence[dict]) -> dict | None:
    """Summary, log and plot from the rows (rewritten whole each time); the summary, or None without rows."""
    if not rows:
        return None
    summary = summarize(rows)
    write_json_atomic(paths.summary, summary)
    text = "".join(log_line(r) + "\n" for r in sorted(rows, key=_training_order))
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.log.with_name(f".{paths.log.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, paths.log)
    for r in rows:  # a snapshot measured before the histograms were written gets its own from its npz
        if not paths.histogram(r["snapshot"]).is_file() and (d := knn_distances(paths, r["snapshot"])) is not None:
            plot_ratio_histogram(*d, paths.histogram(r["snapshot"]), histogram_title(r["snapshot"], *d))
    plot_mem_ratio(rows, paths.plot, *(knn_distances(paths, summary["max_snapshot"]) or (None, None)))
    return summary


def knn_distances(paths: MemRatioFiles, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(d1, d2) of a measured snapshot from its knn npz; None when it has none."""
    try:
        with np.load(paths.knn_npz(name)) as z:
            d = z["knn_distance"]
    except (OSError, KeyError, ValueError):
        return None
    return d[:, 0], d[:, 1]


def histogram_title(name: str, d1, d2) -> str:
    return f"{name}: d1/d2 of {len(d1)} samples, {100 * memorization_ratio(d1, d2):.1f} % memorized"


def write_pictures(paths: MemRatioFiles, name: str, neighbours: Neighbours, seeds: Sequence[int],
                   shown: dict[int, np.ndarray], train_nchw: np.ndarray) -> None:
    """One measured unit's d1/d2 histogram and its SHOWN most memorized samples (among shown: seed → uint8 H×W×C,
    the samples the processes kept) beside their nearest training images."""
    d1, d2 = neighbours.distance[:, 0], neighbours.distance[:, 1]
    plot_ratio_histogram(d1, d2, paths.histogram(name), histogram_title(name, d1, d2))
    kept = np.asarray([i for i, s in enumerate(seeds) if int(s) in shown], dtype=np.int64)
    if not len(kept):
        return
    top = kept[most_memorized(d1[kept], d2[kept], SHOWN)]
    picked = Neighbours(neighbours.distance[top], neighbours.index[top], 0)
    grid = nearest_pairs_grid(np.stack([shown[int(seeds[i])] for i in top]), [int(seeds[i]) for i in top], picked,
                              train_nchw, f"{name}: the {len(top)} most memorized of {len(seeds)} samples "
                                          f"(smallest d1/d2) and their nearest training images")
    save_png_atomic(grid.image, paths.nearest(name))


def clear_outputs(paths: MemRatioFiles) -> None:
    """Remove this tool's results (for a fresh start); generated images are kept."""
    for p in (paths.rows, paths.summary, paths.plot, paths.log, paths.settings):
        p.unlink(missing_ok=True)
    for folder in (paths.knn_dir, paths.plots_dir):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.suffix in (".npz", ".png") or p.name.endswith(".tmp"):
                    p.unlink()


# --------------------------------------------------------------------------------------------------- sharding


class Shard(NamedTuple):
    """This process's place among the processes: index, count and a barrier (no-op for one process)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


def shard_positions(n: int, rank: int, world: int) -> list[int]:
    """Positions rank, rank + world, … of n items: every item in exactly one shard, for any process count."""
    return list(range(rank, n, world))


def merge_shards(parts: Sequence[dict], seeds: Sequence[int]) -> tuple[Neighbours, list[int]]:
    """The shards' results in the requested seed order; MemRatioError unless every seed is there exactly once."""
    got = np.concatenate([np.asarray(p["seeds"], dtype=np.int64) for p in parts])
    want = np.asarray(seeds, dtype=np.int64)
    if len(got) != len(want) or len(np.unique(got)) != len(got) or not np.isin(want, got).all():
        raise MemRatioError(f"the process shards hold {len(got)} results ({len(np.unique(got))} distinct seeds) "
                            f"for {len(want)} requested seeds; run the command again")
    distance = np.concatenate([np.asarray(p["knn_distance"]).reshape(-1, K) for p in parts])
    index = np.concatenate([np.asarray(p["knn_index"]).reshape(-1, K) for p in parts])
    row_of = {int(s): i for i, s in enumerate(got)}
    order = np.asarray([row_of[int(s)] for s in want], dtype=np.int64)
    fallbacks = sum(int(p["knn_fallbacks"]) for p in parts)
    return Neighbours(distance[order], index[order].astype(np.int64), fallbacks), [int(s) for s in want]


# ----------------------------------------------------------------------------------------------------- driver


@dataclass
class Unit:
    """One thing to measure (a snapshot, or a set of images): its row name, position in training and sampler.

    ``batches(positions)`` yields (seeds, uint8 N×H×W×C) for the given positions of ``seeds``, in that order.
    """

    name: str
    images_seen: int | None
    kimg: float | None
    seeds: list[int]
    batches: Callable[[list[int]], Iterator[tuple[list[int], np.ndarray]]]


def seed_ranges(seeds: Sequence[int]) -> str:
    """Seeds in ``--seeds`` notation, consecutive runs as ``a-b`` (the settings file records them this way)."""
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(f"{seeds[i]}" if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def prepare_outputs(paths: MemRatioFiles, settings: dict, shard: Shard, overwrite: bool = False) -> list[dict]:
    """Set up the output folder (fresh with overwrite), refuse results made with other settings; the rows."""
    if shard.rank == 0:
        paths.knn_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            clear_outputs(paths)
        read_results(paths.rows, repair=True)  # cut a torn last line before anyone reads the file
    shard.barrier()
    rows = read_results(paths.rows)
    # Every process checks, so that all of them stop with the same error instead of waiting at a barrier.
    check_run_settings(paths.settings, settings, bool(rows), "another --out")
    shard.barrier()
    if shard.rank == 0:
        if not (rows and paths.settings.exists()):
            write_json_atomic(paths.settings, settings)
        for stale in paths.knn_dir.glob(".*.part-*.npz"):  # shards of a killed run: redone
            stale.unlink()
    shard.barrier()
    return rows


def measure_unit(unit: Unit, train_nchw: np.ndarray, paths: MemRatioFiles, shard: Shard = Shard(), device="cpu",
                 save_images: bool = False, progress: bool = True) -> dict | None:
    """Sample (or load) this process's share of the unit's images, find their neighbours, merge on process 0;
    the row on process 0, None elsewhere."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    positions = shard_positions(len(unit.seeds), shard.rank, shard.world)
    seeds, images = [], []
    bar = tqdm(total=len(positions), desc=f"{unit.name}[{shard.rank}]", unit="img", position=shard.rank,
               disable=not (progress and positions), leave=False)
    for batch_seeds, batch_images in unit.batches(positions):
        if save_images:
            from diffmem.common.edm.sampler import image_path, save_png

            for seed, image in zip(batch_seeds, batch_images):
                save_png(image_path(paths.images(unit.name), seed), image)
        seeds.extend(batch_seeds)
        images.append(batch_images)
        bar.update(len(batch_seeds))
    bar.close()
    c, h, w = train_nchw.shape[1:]
    samples = np.concatenate(images) if images else np.zeros((0, h, w, c), dtype=np.uint8)
    found = nearest_training_images(samples, train_nchw, device, progress)
    # Each process keeps its own most memorized samples: the unit's SHOWN most memorized are among them.
    keep = most_memorized(found.distance[:, 0], found.distance[:, 1], SHOWN)
    write_npz_atomic(paths.part_npz(unit.name, shard.rank, shard.world), seeds=np.asarray(seeds, dtype=np.int64),
                     knn_distance=found.distance, knn_index=found.index, knn_fallbacks=np.int64(found.fallbacks),
                     shown_seeds=np.asarray(seeds, dtype=np.int64)[keep], shown_images=samples[keep])
    shard.barrier()
    row = None
    if shard.rank == 0:
        parts = []
        for r in range(shard.world):
            with np.load(paths.part_npz(unit.name, r, shard.world)) as z:
                parts.append({k: z[k] for k in z.files})
        merged, ordered = merge_shards(parts, unit.seeds)
        shown = {int(s): image for p in parts for s, image in zip(p["shown_seeds"], p["shown_images"])}
        write_pictures(paths, unit.name, merged, ordered, shown, train_nchw)
        write_knn_npz(paths.knn_npz(unit.name), merged, ordered)  # before the row: a row means a complete npz
        row = ratio_row(unit.name, unit.images_seen, unit.kimg, merged, time.perf_counter() - t0)
        rows = store_row(paths, row)
        write_reports(paths, rows)
        for r in range(shard.world):
            paths.part_npz(unit.name, r, shard.world).unlink(missing_ok=True)
    shard.barrier()
    return row


def check_shape(what: str, shape: Sequence[int], train_nchw: np.ndarray, knn_ref: str | Path) -> None:
    """Samples and training images must have the same C×H×W."""
    if tuple(shape) != tuple(train_nchw.shape[1:]):
        fmt = "×".join
        raise MemRatioError(f"{what} are {fmt(map(str, shape))} (C×H×W) but the --data images of {knn_ref} are "
                            f"{fmt(map(str, train_nchw.shape[1:]))}")


def snapshot_unit(images_seen: int, path: Path, seeds: list[int], train_nchw: np.ndarray, knn_ref: str | Path,
                  batch: int, settings, device) -> Unit:
    """A snapshot's EMA network (the snapshot is the EMA network), its samples by generate_images."""
    from diffmem.common.edm.networks.snapshot import load_network, read_snapshot_info, snapshot_label
    from diffmem.common.edm.sampler import generate_images

    net = load_network(path, device)
    check_shape(f"the images of {path.name}", net.image_shape, train_nchw, knn_ref)
    kimg = read_snapshot_info(path).get("kimg", images_seen / 1000)

    def batches(positions: list[int]):
        for b in generate_images(net, [seeds[p] for p in positions], batch, settings, None, device):
            yield b.seeds, b.images

    return Unit(snapshot_label(path), images_seen, kimg, seeds, batches)


def check_snapshots(chosen: Sequence[tuple[int, Path]], train_nchw: np.ndarray, knn_ref: str | Path,
                    skip: set[str] = frozenset()) -> None:
    """Load each chosen snapshot not in skip on the CPU, check its image shape and drop it: a snapshot the measure
    would refuse is refused before the run writes anything (the measure loads each snapshot again in turn, so that
    only one network is ever held)."""
    from diffmem.common.edm.networks.snapshot import load_network, snapshot_label

    for _, path in chosen:
        if snapshot_label(path) not in skip:
            check_shape(f"the images of {path.name}", load_network(path, "cpu").image_shape, train_nchw, knn_ref)


def image_unit(source: ImageSource, batch: int = 512) -> Unit:
    """A set of generated images (folder or npz), read batch by batch."""

    def batches(positions: list[int]):
        for start in range(0, len(positions), batch):
            chunk = positions[start : start + batch]
            yield [source.seeds[p] for p in chunk], source.load(chunk)

    return Unit(source.name, None, None, source.seeds, batches)


def measure_run(run_dir: str | Path, train_nchw: np.ndarray, knn_ref: str | Path, seeds: list[int],
                paths: MemRatioFiles, snapshots: str = "all", batch: int = 512, settings=None, device="cpu",
                shard: Shard = Shard(), save_images: bool = False, overwrite: bool = False,
                progress: bool = True) -> dict | None:
    """Memorization ratio of every chosen snapshot of a run, newest first, skipping finished ones; the summary
    (on process 0; None elsewhere)."""
    import torch

    from diffmem.common.edm.sampler import SamplerSettings

    settings = settings or SamplerSettings()
    chosen = select_snapshots(run_dir, snapshots)
    if len(train_nchw) < K:
        raise MemRatioError(f"{knn_ref}: {len(train_nchw)} training image(s); the ratio d1/d2 needs at least {K}")
    record = {"mode": "expdir", "source": str(Path(run_dir).resolve()), "knn_ref": str(Path(knn_ref).resolve()),
              "knn_ref_images": int(len(train_nchw)), "seeds": seed_ranges(seeds), "sampler": settings.to_dict(),
              "device": torch.device(device).type}
    # Without repair, a torn last line is only ignored here: prepare_outputs cuts it once the checks have passed.
    check_snapshots(chosen, train_nchw, knn_ref, set() if overwrite else finished(paths, read_results(paths.rows)))
    done = finished(paths, prepare_outputs(paths, record, shard, overwrite))
    from diffmem.common.edm.networks.snapshot import snapshot_label

    for images_seen, path in chosen:
        if snapshot_label(path) in done:
            continue
        unit = snapshot_unit(images_seen, path, seeds, train_nchw, knn_ref, batch, settings, device)
        measure_unit(unit, train_nchw, paths, shard, device, save_images, progress)
    return write_reports(paths, read_results(paths.rows)) if shard.rank == 0 else None


def measure_images(source: ImageSource, train_nchw: np.ndarray, knn_ref: str | Path, paths: MemRatioFiles,
                   device="cpu", shard: Shard = Shard(), overwrite: bool = False, batch: int = 512,
                   progress: bool = True) -> dict | None:
    """Memorization ratio of one set of generated images (one row named after it); the summary on process 0."""
    check_shape(f"the images of {source.name}", source.shape, train_nchw, knn_ref)
    if len(train_nchw) < K:
        raise MemRatioError(f"{knn_ref}: {len(train_nchw)} training image(s); the ratio d1/d2 needs at least {K}")
    record = {"mode": "images", "knn_ref": str(Path(knn_ref).resolve()), "knn_ref_images": int(len(train_nchw))}
    done = finished(paths, prepare_outputs(paths, record, shard, overwrite))
    if source.name not in done:
        measure_unit(image_unit(source, batch), train_nchw, paths, shard, device, False, progress)
    return write_reports(paths, read_results(paths.rows)) if shard.rank == 0 else None
