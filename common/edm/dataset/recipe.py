"""What goes into an EDM dataset zip: DiffMemorize's subset, mix and label rules (pure functions) and the build.

The selection rules (DiffMemorize's by default) are the pure functions below; ``build_dataset`` applies them in
this order: subset (source indices, output in source order) → intra-class mix (replacements take the slot and the
true label of the image they replace) → labels → images (channels, center crop, Lanczos resize). Seeded draws use
``numpy.random.default_rng(SeedSequence([seed, stream]))`` with one stream per kind of draw (``STREAM_*``), so the
subset, the mix and the random labels are independent and each reproducible from ``seed``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from diffmem.common.edm.dataset.edm_zip import CHANNELS, DatasetArrays, DatasetError, pil_module, progress_bar
from diffmem.common.edm.dataset.sources import CIFAR_SPLITS, Source, open_source
from diffmem.common.errors import ConfigError
from diffmem.common.settings import option

SUBSETS = ("first", "random")


LABEL_RULES = ("true", "random", "unique", "none")


TRANSFORMS = ("center-crop",)




# Streams of the seeded draws (see the module docstring).
STREAM_SUBSET = 0


STREAM_MIX = 1


STREAM_LABELS = 2


def draw_generator(seed: int, stream: int) -> np.random.Generator:
    """numpy Generator of SeedSequence([seed, stream]): common.seeding.numpy_generator's, without importing torch."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))


def balanced_counts(classes: Sequence[int], n: int) -> dict[int, int]:
    """n spread over the given classes: n // C each, one more for the first n mod C (ascending class id)."""
    ids = sorted(int(k) for k in classes)
    base, extra = divmod(n, len(ids))
    return {k: base + (j < extra) for j, k in enumerate(ids)}


def classes_counts(num_classes: int, n: int) -> dict[int, int]:
    """DiffMemorize's class-count subsets: classes 0..C−1, n // C each, the remainder to the last class."""
    base, extra = divmod(n, num_classes)
    return {k: base + (extra if k == num_classes - 1 else 0) for k in range(num_classes)}


def first_per_class(labels: np.ndarray, counts: dict[int, int]) -> np.ndarray:
    """Indices of the first counts[k] images of each class k, in source order."""
    picked = [np.flatnonzero(labels == k)[:c] for k, c in counts.items()]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def random_per_class(labels: np.ndarray, counts: dict[int, int], rng: np.random.Generator) -> np.ndarray:
    """counts[k] images of each class k drawn without replacement (classes ascending), returned in source order."""
    picked = [rng.choice(np.flatnonzero(labels == k), size=c, replace=False) for k, c in sorted(counts.items())]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def mix_count(alpha: float, n: int) -> int:
    """round(α·n) with halves up, α taken as the decimal it was written as (0.35·10 → 4, not 3.4999… → 3)."""
    return math.floor(Fraction(repr(float(alpha))) * n + Fraction(1, 2))


def mix_plan(n: int, pool: int, alpha: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(slots replaced, sorted; replacement indices into the mix source, slot j gets picks[j]), seeded."""
    k = mix_count(alpha, n)
    rng = draw_generator(seed, STREAM_MIX)
    slots = np.sort(rng.choice(n, size=k, replace=False))
    picks = rng.choice(pool, size=k, replace=False)
    return slots, picks


def random_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """Seeded labels uniform in 0..K−1, one per output image (in output order)."""
    return draw_generator(seed, STREAM_LABELS).integers(0, num_classes, size=n, dtype=np.int64)


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square of side min(width, height), as EDM's center-crop."""
    side = min(width, height)
    return ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)


def lanczos_resize(image: np.ndarray, size: int) -> np.ndarray:
    """H×W×C uint8 → size×size×C with PIL's Lanczos filter (``Image.LANCZOS``), as EDM and DiffMemorize do."""
    Image = pil_module()
    gray = image.shape[2] == 1
    pil = Image.fromarray(image[:, :, 0] if gray else image, "L" if gray else "RGB")
    out = np.asarray(pil.resize((size, size), Image.LANCZOS), dtype=np.uint8)
    return out[:, :, None] if gray else out


def prepare_image(image: np.ndarray, where: str, channels: int | None = None, resolution: int | None = None,
                  transform: str | None = None) -> np.ndarray:
    """Channels (RGB → 1 by PIL's ITU-R 601 luma, 1 → 3 by repetition), then center crop, then Lanczos resize."""
    if channels == 1 and image.shape[2] == 3:
        image = np.asarray(pil_module().fromarray(image, "RGB").convert("L"), dtype=np.uint8)[:, :, None]
    elif channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if transform == "center-crop":
        left, top, right, bottom = center_crop_box(image.shape[1], image.shape[0])
        image = image[top:bottom, left:right]
    if resolution is not None and image.shape[:2] != (resolution, resolution):
        h, w = image.shape[:2]
        if h != w:
            raise DatasetError(f"{where}: image is {w}×{h} (width×height), not square; give --transform center-crop "
                               f"to crop it before resizing to {resolution}×{resolution}")
        image = lanczos_resize(image, resolution)
    return image


def square_resolution(text: str) -> int:
    """An option type: ``32`` or EDM's ``32x32`` -> 32 (the zips hold square images)."""
    width, _, height = text.lower().partition("x")
    if not width.strip().isdigit() or (height and height.strip() != width.strip()):
        raise argparse.ArgumentTypeError(f"expected R or RxR (square), got {text!r}")
    return int(width)


@dataclass(frozen=True)
class DatasetRecipe:
    """What to take from which source (see the module docstring for the rules); ``validate`` checks it; each field
    is also a dataset_tool option."""

    source: str = option(metavar="SRC", flag="--data", aliases=("--source",),
                         help="cifar-10-python.tar.gz, a folder of images, an EDM dataset zip, 'digits', or 'molrg' "
                              "(float MoLRG data; see the --molrg_* options)")
    max_images: int | None = option(None, type=int, metavar="N",
                                    help="keep N images, class-balanced: N//C per class, one more for the first N "
                                         "mod C classes")
    subset: str = option("first", choices=SUBSETS,
                         help="first: the first images of each class in source order; random: a seeded draw per "
                              "class")
    seed: int = option(0, metavar="S", help="seed of every random draw")
    classes: int | None = option(None, type=int, metavar="C",
                                 help="keep classes 0..C-1 only; with --max_images N: N//C each, the remainder to "
                                      "the last")
    labels: str | None = option(None, choices=LABEL_RULES,
                                help="true (None: true when the source has labels, else none), random (needs "
                                     "--num_classes), unique (label = output index) or none")
    num_classes: int | None = option(None, type=int, metavar="K", help="random labels are drawn in 0..K-1")
    resolution: int | None = option(None, type=square_resolution, metavar="R",
                                    help="resize to R×R with PIL's Lanczos filter (EDM's RxR form too: 32x32)")
    transform: str | None = option(None, choices=TRANSFORMS,
                                   help="center-crop: crop to the centred square before resizing (non-square "
                                        "images)")
    mix_source: str | None = option(None, type=str, metavar="SRC2",
                                    help="second source whose images replace part of the subset")
    mix_alpha: float | None = option(None, type=float, metavar="A",
                                     help="fraction of the subset replaced by --mix_source images: round(A·N), "
                                          "seeded")
    split: str = option("train", choices=tuple(CIFAR_SPLITS),
                        help="CIFAR-10 split: train (data_batch_1..5) or test (test_batch)")
    channels: int | None = option(None, type=int, choices=CHANNELS,
                                  help="1 (RGB by luma) or 3 (grayscale repeated); None: the source's")

    def validate(self) -> None:
        """Settings that contradict each other or are out of range raise ConfigError (one line)."""
        for flag, value, allowed in (("--subset", self.subset, SUBSETS), ("--labels", self.labels, LABEL_RULES),
                                     ("--transform", self.transform, TRANSFORMS),
                                     ("--split", self.split, tuple(CIFAR_SPLITS)),
                                     ("--channels", self.channels, CHANNELS)):
            if value is not None and value not in allowed:
                raise ConfigError(f"{flag} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        for flag in ("max_images", "classes", "num_classes", "resolution"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ConfigError(f"--{flag} must be at least 1, got {value}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.subset == "random" and self.max_images is None:
            raise ConfigError("--subset random draws --max_images images; give --max_images N")
        if self.labels == "random" and self.num_classes is None:
            raise ConfigError("--labels random needs --num_classes K (labels are drawn in 0..K-1)")
        if self.num_classes is not None and self.labels != "random":
            raise ConfigError("--num_classes applies to --labels random only")
        if self.transform == "center-crop" and self.resolution is None:
            raise ConfigError("--transform center-crop needs --resolution R (the side of the output square)")
        if (self.mix_source is None) != (self.mix_alpha is None):
            raise ConfigError("--mix_source and --mix_alpha go together; give both or neither")
        if self.mix_alpha is not None and not 0.0 <= self.mix_alpha <= 1.0:
            raise ConfigError(f"--mix_alpha must be in [0, 1], got {self.mix_alpha}")

    def label_rule(self, src: Source) -> str:
        """The labels rule after the default; a rule that needs labels the source lacks raises DatasetError."""
        rule = self.labels or ("true" if src.labels is not None else "none")
        if src.labels is None and (rule == "true" or self.classes is not None):
            flag = "--labels true" if rule == "true" else "--classes"
            raise DatasetError(f"{src.where}: has no labels{src.no_labels_reason}; {flag} needs them")
        return rule


def select_indices(src: Source, max_images: int | None, subset: str = "first", classes: int | None = None,
                   seed: int = 0) -> np.ndarray:
    """Source indices of the subset, in source order; a class (or source) with too few images raises DatasetError."""
    # A source without labels is one class, so --max_images takes its first (or N random) images.
    labels = src.labels if src.labels is not None else np.zeros(len(src), np.int64)
    available = dict(zip(*np.unique(labels, return_counts=True)))
    if classes is not None:
        counts = (classes_counts(classes, max_images) if max_images is not None
                  else {k: int(available.get(k, 0)) for k in range(classes)})
        empty = [k for k in range(classes) if not available.get(k)]
        if empty:
            raise DatasetError(f"{src.where}: --classes {classes} keeps classes 0..{classes - 1}, but class {empty[0]} "
                               f"has no images")
    elif max_images is not None:
        counts = balanced_counts(list(available), max_images)
    else:
        return np.arange(len(src))
    for k, c in counts.items():
        have = int(available.get(k, 0))
        if c > have:
            if src.labels is None:
                raise DatasetError(f"{src.where}: has {have} images, --max_images asks for {c}")
            raise DatasetError(f"{src.where}: class {k} has {have} images, {c} asked (--max_images {max_images} "
                               f"over {len(counts)} classes)")
    if subset == "random":
        return random_per_class(labels, counts, draw_generator(seed, STREAM_SUBSET))
    return first_per_class(labels, counts)


def assign_labels(rule: str, true_labels: np.ndarray | None, n: int, num_classes: int | None = None,
                  seed: int = 0) -> np.ndarray | None:
    """Output labels by rule: true (given), random (seeded in 0..K−1), unique (output index), none (None)."""
    if rule == "true":
        return np.asarray(true_labels, dtype=np.int64)
    if rule == "random":
        return random_labels(n, num_classes, seed)
    if rule == "unique":
        return np.arange(n, dtype=np.int64)
    return None




def _prepare_all(slots: list[tuple[Source, int]], channels: int | None, resolution: int | None,
                 transform: str | None, progress: bool) -> np.ndarray:
    """Decode and prepare every output image → uint8 N×C×H×W; an image of another size raises DatasetError."""
    prepared, first = [], None
    for src, i in progress_bar(slots, len(slots), "images", progress):
        where = src.describe(i)
        image = prepare_image(src.image(i), where, channels, resolution, transform)
        if first is None:
            first = (image.shape[:2], where)
        elif image.shape[:2] != first[0]:
            (h0, w0), where0 = first
            h, w = image.shape[:2]
            raise DatasetError(f"{where}: image is {w}×{h} (width×height), expected {w0}×{h0} like {where0} "
                               f"(give --resolution R, with --transform center-crop for non-square images)")
        prepared.append(image)
    # Without --channels, any colour image makes the output RGB; grayscale ones are repeated (commutes with resize).
    c = channels or (3 if any(p.shape[2] == 3 for p in prepared) else 1)
    h, w = first[0]
    out = np.empty((len(prepared), c, h, w), dtype=np.uint8)
    for j, image in enumerate(prepared):
        out[j] = image.transpose(2, 0, 1)  # broadcasting repeats a single channel
    return out


def build_dataset(recipe: DatasetRecipe, progress: bool = True) -> DatasetArrays:
    """The dataset the recipe describes; names say where each image came from (file, or archive and member)."""
    recipe.validate()
    with ExitStack() as stack:
        src = stack.enter_context(open_source(recipe.source, recipe.split))
        if recipe.split != "train" and src.kind != "cifar":
            raise ConfigError(f"--split {recipe.split} applies to a CIFAR-10 tarball only; {src.where} is a "
                              f"{src.kind} source")
        rule = recipe.label_rule(src)
        keep = select_indices(src, recipe.max_images, recipe.subset, recipe.classes, recipe.seed)
        slots = [(src, int(i)) for i in keep]
        if recipe.mix_source is not None:
            mix = stack.enter_context(open_source(recipe.mix_source, recipe.split))
            k = mix_count(recipe.mix_alpha, len(slots))
            if k > len(mix):
                raise DatasetError(f"{mix.where}: has {len(mix)} images, --mix_alpha {recipe.mix_alpha} of "
                                   f"{len(slots)} asks for {k}")
            # A replacement takes the slot, and so the true label, of the image it replaces (intra-class mix).
            for slot, pick in zip(*mix_plan(len(slots), len(mix), recipe.mix_alpha, recipe.seed)):
                slots[slot] = (mix, int(pick))
        true_labels = src.labels[keep] if rule == "true" else None
        labels = assign_labels(rule, true_labels, len(slots), recipe.num_classes, recipe.seed)
        if not slots:
            raise DatasetError(f"{src.where}: the selection holds no images")
        images = _prepare_all(slots, recipe.channels, recipe.resolution, recipe.transform, progress)
        names = [s.describe(i) for s, i in slots]
    return DatasetArrays(images, labels, names)
