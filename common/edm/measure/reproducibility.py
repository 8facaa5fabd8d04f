"""Zhang et al. (ICML 2024)'s SSCD scores of unconditional diffusion models: reproducibility and generalization.

Both compare SSCD copy-detection descriptors (Pizzi et al., CVPR 2022) by cosine similarity, with threshold
t = 0.6 and a strict comparison:

* **reproducibility score** (``rpscore``): two models sampled from the same seeds (the same initial noise); the
  fraction of same-seed pairs whose cosine is > t. Pairs are matched by seed, never by row, over the seeds both
  sets hold.
* **generalization score**: 1 − the *memorized fraction*, the fraction of generated samples whose best match in
  the training set has cosine > t. Zhang et al.'s script computes the memorized fraction and prints
  1 − it under the name "M score"; here both are reported by name.

Features files (``write_features`` / ``read_features``) are npz: ``features`` float32 N×D, L2-normalised;
``seeds`` int64 N (−1 where an image has no seed); ``names`` (unicode); ``sscd_model`` (the --sscd_model value),
``sscd_sha256`` (the model file's SHA-256, what identifies the model) and ``preprocess`` (the preset), as 0-d
strings. Two files are comparable only with the same model, preset and dimension.

Zhang et al.'s own features files (``edm/sscd.py feature``) hold ``features`` alone: they are read too, as
*features-only* sets. Nothing in them says which images, seeds, model or preprocessing made them, so a score with
one pairs rows by order (as their ``rpscore`` does; it needs the same number of rows), takes their features as
stored (their scripts use the raw dot product of the model's normalised outputs), cannot check the model, and says
so in its ``notes``.

Comparisons are float32 against float32(t), as Zhang et al.'s torch ``sim > 0.6`` on float32 similarities: a
cosine that rounds to float32(0.6) is not above 0.6.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffmem.common.edm.images import IMAGES_HINT, open_images, seed_from_name  # noqa: F401
from diffmem.common.errors import DiffmemError

# The images reader is common.edm.images' (shared with mem_ratio); seed_from_name and IMAGES_HINT are part of
# what this module offers its callers (detect/similarity.py's help, the tests).
from diffmem.common.results import file_sha256

SSCD_THRESHOLD = 0.6  # Zhang et al.'s SSCD threshold for both scores
PREPROCESS = ("zhang", "sscd", "wen")  # presets of common.similarity.SSCD_PRESETS usable here; zhang is theirs
SOURCE_CHUNK = 2048  # generated rows per block of the max-cosine search
TARGET_CHUNK = 8192  # training rows per block: a block is SOURCE_CHUNK × TARGET_CHUNK float32 (64 MiB)
MSCORE_NOTE = ("generalization_score = 1 - memorized_fraction; Zhang et al.'s script prints it under the name "
               "'M score'")


class ScoresError(DiffmemError, ValueError):
    """Unusable features files, or two features files that cannot be compared; one-line message."""


# ------------------------------------------------------------------------------------------- the pure math


def above(values: np.ndarray, t: float) -> np.ndarray:
    """values > t, in float32 like Zhang et al.'s torch comparison of float32 similarities with a Python float."""
    return np.asarray(values, dtype=np.float32) > np.float32(t)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; a zero row stays zero), as SSCD's descriptors (Pizzi et al. 2022)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1).astype(np.float32)


def pair_by_seed(seeds_a: np.ndarray, seeds_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(common seeds ascending, their rows in a, their rows in b); seeds < 0 mean "no seed" and never pair."""
    seeds_a, seeds_b = np.asarray(seeds_a, np.int64), np.asarray(seeds_b, np.int64)
    ok_a, ok_b = np.flatnonzero(seeds_a >= 0), np.flatnonzero(seeds_b >= 0)
    common, ia, ib = np.intersect1d(seeds_a[ok_a], seeds_b[ok_b], assume_unique=True, return_indices=True)
    return common, ok_a[ia], ok_b[ib]


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of row i of a with row i of b, for L2-normalised rows (float32 N)."""
    return np.einsum("nd,nd->n", np.asarray(a, np.float32), np.asarray(b, np.float32))


def rpscore(same_seed_cosines: np.ndarray, t: float = SSCD_THRESHOLD) -> float:
    """Reproducibility score: fraction of same-seed pairs with SSCD cosine > t (Zhang et al. 2024, Sec. 2)."""
    return float(above(same_seed_cosines, t).mean())


def max_cosine(source: np.ndarray, target: np.ndarray, source_chunk: int = SOURCE_CHUNK,
               target_chunk: int = TARGET_CHUNK, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per source row, the max cosine over the target rows and its row (lowest index among ties), float32.

    Rows must be L2-normalised. Memory is bounded by one source_chunk × target_chunk block: neither the full
    source × target matrix nor any source × target × D array is formed (2^15 training images of 1024-d features
    against 50k samples fit on any machine).
    """
    source, target = np.asarray(source, np.float32), np.asarray(target, np.float32)
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"expected N×D and M×D features, got {source.shape} and {target.shape}")
    if source_chunk < 1 or target_chunk < 1:
        raise ValueError("chunk sizes must be >= 1")
    n, m = len(source), len(target)
    best = np.full(n, -np.inf, dtype=np.float32)
    best_idx = np.zeros(n, dtype=np.int64)
    blocks = [(s, t) for s in range(0, n, source_chunk) for t in range(0, m, target_chunk)]
    from tqdm.auto import tqdm

    for s, t in tqdm(blocks, desc="max cosine", unit="block", disable=not progress or len(blocks) <= 1):
        block = source[s:s + source_chunk] @ target[t:t + target_chunk].T
        j = np.argmax(block, axis=1)  # numpy's argmax takes the first maximum: the lowest target index
        val = block[np.arange(len(block)), j]
        # strictly greater: on a tie an earlier target chunk keeps its (lower) index
        better = val > best[s:s + source_chunk]
        best[s:s + source_chunk][better] = val[better]
        best_idx[s:s + source_chunk][better] = j[better] + t
    return best, best_idx


def memorized_fraction(max_cosines: np.ndarray, t: float = SSCD_THRESHOLD) -> float:
    """Fraction of samples whose best training match has SSCD cosine > t (Zhang et al. 2024's mscore.py)."""
    return float(above(max_cosines, t).mean())


def generalization_score(max_cosines: np.ndarray, t: float = SSCD_THRESHOLD) -> float:
    """1 − the memorized fraction: what Zhang et al. (2024) plot as generalization and print as "M score"."""
    return 1.0 - memorized_fraction(max_cosines, t)


# ------------------------------------------------------------------------------------------- images in


def to_rgb_pil(image: np.ndarray):
    """A uint8 H×W×C image as an RGB PIL image; one channel is repeated to three (SSCD takes RGB)."""
    from PIL import Image

    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(image), "RGB")


# ------------------------------------------------------------------------------------------- features


@dataclass
class FeatureSet:
    """SSCD descriptors of a set of images and what they depend on (see the module docstring)."""

    features: np.ndarray  # float32 N×D, L2-normalised
    seeds: np.ndarray  # int64 N, −1 where none
    names: list[str]
    sscd_model: str
    sscd_sha256: str
    preprocess: str
    where: str = ""
    features_only: bool = False  # a file holding nothing but ``features`` (Zhang et al.'s edm/sscd.py format)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def n_seeded(self) -> int:
        return int((self.seeds >= 0).sum())


def batches(n: int, size: int) -> Iterator[range]:
    """Consecutive index ranges of at most size."""
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def extract_features(images: str | Path, sscd_model: str = "default", preprocess: str = "zhang", batch: int = 64,
                     device: str = "cpu", progress: bool = True) -> FeatureSet:
    """SSCD features of the images through common.similarity's wrapper (the text-to-image arm's), batch by batch."""
    from tqdm.auto import tqdm

    from diffmem.common.similarity import SSCDModel

    src = open_images(images)  # before loading the model: a wrong path fails at once
    out = []
    try:
        model = SSCDModel(sscd_model, device=device, preset=preprocess, batch_size=batch)
        with tqdm(total=len(src.names), desc="sscd features", unit="img", disable=not progress) as bar:
            for idx in batches(len(src.names), batch):
                out.append(model.embed([to_rgb_pil(src.load(i)) for i in idx]).numpy())
                bar.update(len(idx))
    finally:
        src.close()
    return FeatureSet(l2_normalise(np.concatenate(out)), src.seeds, src.names, sscd_model,
                      file_sha256(model.path), preprocess, str(images))


def write_features(path: str | Path, fs: FeatureSet) -> None:
    """The features npz (module docstring), written to a temporary name and renamed into place."""
    path = Path(path)
    arrays = dict(features=np.asarray(fs.features, np.float32), seeds=np.asarray(fs.seeds, np.int64),
                  names=np.array(fs.names, dtype=np.str_), sscd_model=np.array(fs.sscd_model),
                  sscd_sha256=np.array(fs.sscd_sha256), preprocess=np.array(fs.preprocess))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a temporary name
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _open_npz(path: Path):
    from diffmem.common.edm.dataset.edm_zip import open_npz

    return open_npz(path, ScoresError)


FEATURE_KEYS = ("features", "seeds", "names", "sscd_model", "sscd_sha256", "preprocess")


def read_features(path: str | Path) -> FeatureSet:
    """A features npz written by ``write_features``; anything else raises ScoresError with one line."""
    path = Path(path)
    if not path.is_file():
        raise ScoresError(f"{path}: no such features file (write one with `detect/similarity.py features`)")
    with _open_npz(path) as z:
        if z.files == ["features"]:
            return _features_only(path, z["features"])
        missing = [k for k in FEATURE_KEYS if k not in z.files]
        if missing:
            hint = " (it holds images: run `detect/similarity.py features` on it first)" if "images" in z.files else ""
            raise ScoresError(f"{path}: not a features file, no {', '.join(missing)}{hint}")
        feats, seeds, names = z["features"], np.asarray(z["seeds"]), z["names"]
        meta = {k: str(z[k]) for k in ("sscd_model", "sscd_sha256", "preprocess")}
    _check_matrix(path, feats)
    if seeds.shape != (len(feats),) or names.shape != (len(feats),) or not np.issubdtype(seeds.dtype, np.integer):
        raise ScoresError(f"{path}: expected {len(feats)} integer seeds and names, one per feature row")
    return FeatureSet(l2_normalise(feats), seeds.astype(np.int64), [str(n) for n in names], where=str(path), **meta)


def _check_matrix(path: Path, feats: np.ndarray) -> None:
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating) or len(feats) == 0:
        raise ScoresError(f"{path}: 'features' is {feats.dtype} {'×'.join(map(str, feats.shape))}; expected "
                          f"float N×D with N >= 1")
    if not np.isfinite(feats).all():
        raise ScoresError(f"{path}: 'features' holds NaN or infinite values")


def _features_only(path: Path, feats: np.ndarray) -> FeatureSet:
    """A file with ``features`` alone (Zhang et al.'s edm/sscd.py): rows without seeds, names or model record."""
    _check_matrix(path, feats)
    n = len(feats)
    return FeatureSet(np.asarray(feats, np.float32), np.full(n, -1, np.int64), [f"row{i}" for i in range(n)],
                      sscd_model="unrecorded", sscd_sha256="", preprocess="unrecorded", where=str(path),
                      features_only=True)


def features_only_note(sets: list[FeatureSet], pairing: bool) -> list[str]:
    """The one-line note a score with features-only files carries (empty without them)."""
    only = [fs.where for fs in sets if fs.features_only]
    if not only:
        return []
    how = "pairs are taken by row order, as Zhang et al.'s rpscore does (no seeds are recorded); " if pairing else ""
    return [f"{' and '.join(only)} hold{'s' if len(only) == 1 else ''} features only (Zhang et al.'s edm/sscd.py "
            f"format): {how}features used as stored; the SSCD model and preprocessing cannot be checked"]


def check_comparable(a: FeatureSet, b: FeatureSet) -> None:
    """Raise ScoresError unless a and b come from the same SSCD model and preprocessing, with the same dimension
    (for a features-only file, which records neither, the dimension alone)."""
    if a.features_only or b.features_only:
        if a.dim != b.dim:
            raise ScoresError(f"{a.where} has {a.dim}-d features, {b.where} {b.dim}-d")
        return
    if a.sscd_sha256 != b.sscd_sha256:
        raise ScoresError(f"{a.where} and {b.where} were embedded with different SSCD models ({a.sscd_model} "
                          f"sha256 {a.sscd_sha256[:12]} vs {b.sscd_model} sha256 {b.sscd_sha256[:12]}); "
                          f"recompute one with the other's --sscd_model")
    if a.preprocess != b.preprocess:
        raise ScoresError(f"{a.where} and {b.where} used different preprocessing ({a.preprocess} vs {b.preprocess});"
                          f" recompute one with the other's --preprocess")
    if a.dim != b.dim:
        raise ScoresError(f"{a.where} has {a.dim}-d features, {b.where} {b.dim}-d")


def _unique_seeds(fs: FeatureSet) -> None:
    """Raise ScoresError when fs has no seeds, or a seed twice (pairs by seed would be ambiguous)."""
    seeded = fs.seeds[fs.seeds >= 0]
    if len(seeded) == 0:
        raise ScoresError(f"{fs.where}: its images have no seeds (rpscore pairs samples by seed: embed "
                          f"{{seed:06d}}.png files or a generate.py images.npz)")
    values, counts = np.unique(seeded, return_counts=True)
    if (counts > 1).any():
        raise ScoresError(f"{fs.where}: seed {int(values[counts > 1][0])} appears {int(counts.max())} times; "
                          f"rpscore needs one image per seed")


# ------------------------------------------------------------------------------------------- reports


def _common_fields(a: FeatureSet, b: FeatureSet, t: float) -> dict:
    return dict(t=float(t), source=a.where, target=b.where, n_source=len(a.names), n_target=len(b.names),
                sscd_model=a.sscd_model, sscd_sha256=a.sscd_sha256, preprocess=a.preprocess, dim=a.dim)


def rpscore_report(a: FeatureSet, b: FeatureSet, t: float = SSCD_THRESHOLD) -> tuple[dict, dict]:
    """(summary, per-pair columns) of the reproducibility score between two models' samples, paired by seed
    (by row order when either file is features-only, as Zhang et al.'s rpscore)."""
    check_comparable(a, b)
    if a.features_only or b.features_only:
        if len(a.names) != len(b.names):
            raise ScoresError(f"{a.where} has {len(a.names)} rows and {b.where} {len(b.names)}: a features-only "
                              f"file (Zhang et al.'s format, no seeds) pairs by row order, which needs the same "
                              f"number of rows")
        cos = rowwise_cosine(a.features, b.features)
        summary = dict(score="rpscore", rpscore=rpscore(cos, t), n_pairs=len(cos), mean_cosine=float(cos.mean()),
                       **_common_fields(a, b, t), pairing="row order", notes=features_only_note([a, b], True))
        return summary, dict(row=list(range(len(cos))), cosine=cos.tolist())
    _unique_seeds(a)
    _unique_seeds(b)
    seeds, ia, ib = pair_by_seed(a.seeds, b.seeds)
    if len(seeds) == 0:
        raise ScoresError(f"{a.where} and {b.where} share no seed ({a.n_seeded} and {b.n_seeded} seeded images); "
                          f"sample both models from the same seeds")
    cos = rowwise_cosine(a.features[ia], b.features[ib])
    summary = dict(score="rpscore", rpscore=rpscore(cos, t), n_pairs=len(seeds), mean_cosine=float(cos.mean()),
                   **_common_fields(a, b, t), source_unpaired=a.n_seeded - len(seeds),
                   target_unpaired=b.n_seeded - len(seeds), pairing="seed")
    return summary, dict(seed=seeds.tolist(), cosine=cos.tolist())


def mscore_report(gen: FeatureSet, train: FeatureSet, t: float = SSCD_THRESHOLD, source_chunk: int = SOURCE_CHUNK,
                  target_chunk: int = TARGET_CHUNK, progress: bool = True) -> tuple[dict, dict]:
    """(summary, per-sample columns) of the memorized fraction and generalization score of gen against train."""
    check_comparable(gen, train)
    best, idx = max_cosine(gen.features, train.features, source_chunk, target_chunk, progress)
    mem = memorized_fraction(best, t)
    summary = dict(score="mscore", memorized_fraction=mem, generalization_score=1.0 - mem,
                   n_memorized=int(above(best, t).sum()), mean_max_cosine=float(best.mean()),
                   **_common_fields(gen, train, t), note=MSCORE_NOTE)
    if gen.features_only or train.features_only:
        summary["notes"] = features_only_note([gen, train], False)
    per_sample = dict(seed=gen.seeds.tolist(), name=gen.names, max_cosine=best.tolist(), argmax=idx.tolist(),
                      match=[train.names[j] for j in idx.tolist()])
    return summary, per_sample
