"""Captioned-image training data: folder readers, Wen et al.'s memorized/non-memorized mixture, the dataset.

Two folder layouts are read (the layout is detected per folder):
- flat (Wen et al.'s): ``xxx.jpg`` (or .jpeg/.png/.webp/.bmp) next to ``xxx.txt`` holding its caption, in
  file-name order;
- diffusers/🤗 ``imagefolder``: ``metadata.jsonl`` with one ``{"file_name": ..., "<caption_column>": ...}`` per
  line, file names relative to the folder, in line order.
A 🤗 dataset (Hub name or local dataset folder, ``datasets.load_dataset``) is read through its image and caption
columns.

Unreadable images: every image a run will use is decoded once before any model is loaded. By default the first
unreadable one stops the run with ``FILE: cannot read image (reason)``; with ``on_corrupt="skip"`` it is left out
and listed in the report (and the memorized or non-memorized counts say how many were used). Images of a 🤗
dataset are decoded lazily by ``datasets`` and are not checked up front.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffmem.common.errors import DiffmemError
from diffmem.common.seeding import STREAM_CAPTION, STREAM_IMAGE, derive_seed, numpy_generator
from diffmem.common.t2i.prompt_aug import augment_prompt
from diffmem.common.textfiles import iter_json_objects, read_utf8_text, surrogate_problem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"


class ImageDataError(DiffmemError, ValueError):
    """Training data that cannot be used; str() is the one-line message for the user."""


@dataclass(frozen=True)
class ImageRecord:
    """One training image and its caption(s). ``row`` indexes a 🤗 dataset when ``path`` is None."""

    key: str  # file path, or "dataset[row]", for messages and reports
    caption: str | tuple[str, ...]
    path: str | None = None
    row: int | None = None
    memorized: bool = False


# ----------------------------------------------------------------------------------------------- readers


def _read_metadata_jsonl(folder: Path, caption_column: str, memorized: bool) -> list[ImageRecord]:
    meta = folder / METADATA_FILE
    records = []
    for where, _, obj in iter_json_objects(meta, ImageDataError):
        name = obj.get("file_name")
        if not isinstance(name, str) or not name:
            raise ImageDataError(f"{where}: expected a \"file_name\" string")
        caption = obj.get(caption_column)
        if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
            caption = tuple(c.strip() for c in caption)
        elif isinstance(caption, str):
            caption = caption.strip()
        else:
            raise ImageDataError(
                f"{where}: expected a caption string (or list of strings) under {caption_column!r}"
            )
        path = folder / name
        if not path.is_file():
            raise ImageDataError(f"{where}: image file {name!r} not found in {folder}")
        records.append(ImageRecord(key=str(path), caption=caption, path=str(path), memorized=memorized))
    if not records:
        raise ImageDataError(f"{meta}: no rows")
    return records


def _read_flat_folder(folder: Path, memorized: bool) -> list[ImageRecord]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise ImageDataError(
            f"{folder}: no images found (expected xxx.jpg + xxx.txt pairs or a {METADATA_FILE})"
        )
    records = []
    for img in images:
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            raise ImageDataError(f"{img}: expected its caption in {txt.name} next to it")
        caption = read_utf8_text(txt, ImageDataError).strip()
        records.append(ImageRecord(key=str(img), caption=caption, path=str(img), memorized=memorized))
    return records


def read_image_folder(folder: str | Path, caption_column: str = "text", memorized: bool = False) -> list[ImageRecord]:
    """Records of a flat ``xxx.jpg``+``xxx.txt`` folder or an imagefolder with ``metadata.jsonl``, in order."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ImageDataError(f"{folder}: no such data folder")
    if (folder / METADATA_FILE).is_file():
        return _read_metadata_jsonl(folder, caption_column, memorized)
    return _read_flat_folder(folder, memorized)


def hf_dataset_records(dataset, image_column: str, caption_column: str, name: str) -> list[ImageRecord]:
    """Records pointing at rows of a loaded 🤗 ``datasets.Dataset`` (images stay in the dataset)."""
    columns = dataset.column_names
    for flag, col in (("--image_column", image_column), ("--caption_column", caption_column)):
        if col not in columns:
            raise ImageDataError(f"{name}: {flag} {col!r} is not a column (columns: {', '.join(columns)})")
    records = []
    for row, caption in enumerate(dataset[caption_column]):
        if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
            caption = tuple(c.strip() for c in caption)
        elif isinstance(caption, str):
            caption = caption.strip()
        else:
            raise ImageDataError(f"{name}[{row}]: expected a caption string or list of strings in {caption_column!r}")
        # metadata.jsonl rows are checked as read (common.textfiles), .txt captions decoded as UTF-8; a 🤗 dataset's
        # strings are not, and the tokenizer would fail on a lone surrogate mid-training.
        problem = next(filter(None, (surrogate_problem(c, "caption") for c in
                                     ((caption,) if isinstance(caption, str) else caption))), None)
        if problem:
            raise ImageDataError(f"{name}[{row}]: {problem}")
        records.append(ImageRecord(key=f"{name}[{row}]", caption=caption, row=row))
    return records


# ------------------------------------------------------------------------------------ checking images


def image_problem(path: str) -> str | None:
    """Why the image at ``path`` cannot be decoded, or None when it decodes."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            # Draft mode decodes JPEGs at reduced scale: the whole stream is still read, so truncation shows.
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else 'unreadable'}"
    return None


def take_readable(records: list[ImageRecord], limit: int | None, on_corrupt: str, skipped: list[dict],
                  progress: bool = False, desc: str = "checking images") -> list[ImageRecord]:
    """The first ``limit`` records (all when None) whose images decode, in order.

    on_corrupt="error" raises ImageDataError at the first unreadable image; "skip" leaves it out, appends
    {"image", "reason"} to ``skipped`` and takes the next record instead.
    """
    if on_corrupt not in ("error", "skip"):
        raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
    from tqdm.auto import tqdm

    wanted = len(records) if limit is None else min(limit, len(records))
    good: list[ImageRecord] = []
    # delay: small sets (and early failures) print no bar, so an error stays the only line on stderr.
    bar = tqdm(total=wanted, desc=desc, disable=not progress, leave=False, delay=2.0)
    for rec in records:
        if len(good) >= wanted:
            break
        reason = image_problem(rec.path) if rec.path is not None else None
        if reason is None:
            good.append(rec)
            bar.update(1)
        elif on_corrupt == "error":
            bar.close()
            raise ImageDataError(f"{rec.path}: cannot read image ({reason}); pass --skip_corrupt_images to leave "
                                 f"it out")
        else:
            skipped.append({"image": rec.path, "reason": reason})
    bar.close()
    return good


# -------------------------------------------------------------------------------------------- mixture


@dataclass
class MixtureReport:
    """How a training set was assembled (written next to the run as data_report.json)."""

    mem_found: int
    mem_used: int
    repeats: int
    mem_samples: int
    non_mem_ratio: float
    non_mem_requested: int
    non_mem_found: int
    non_mem_used: int
    total: int
    skipped_images: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def mixture_sizes(num_mem: int, repeats: int, non_mem_ratio: float) -> tuple[int, int]:
    """(memorized samples, non-memorized wanted) = (N·R, ⌊N·R·(1 + K)⌋ − N·R) (Wen et al. 2024, Sec. 5 fine-tuning
    mix)."""
    mem_samples = num_mem * repeats
    return mem_samples, int(mem_samples * (1 + non_mem_ratio)) - mem_samples


def build_mixture(mem: list[ImageRecord], non_mem: list[ImageRecord] | None = None, *, end: int | None = None,
                  repeats: int = 1, non_mem_ratio: float = 0.0, on_corrupt: str = "error",
                  progress: bool = False) -> tuple[list[ImageRecord], MixtureReport]:
    """Wen et al.'s training set: the first ``end`` memorized images, the whole list repeated ``repeats`` times,
    then the first non-memorized images up to ``non_mem_ratio`` × that many samples.

    Unreadable images are handled by ``on_corrupt`` (see :func:`take_readable`): skipped memorized images reduce
    the memorized count, skipped non-memorized ones are replaced by the next ones of the pool.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if non_mem_ratio < 0:
        raise ValueError(f"non_mem_ratio must be >= 0, got {non_mem_ratio}")
    if end is not None and end < 1:
        raise ValueError(f"end must be >= 1, got {end}")
    skipped: list[dict] = []
    notes: list[str] = []
    first = mem[:end] if end is not None else list(mem)
    mem_good = take_readable(first, None, on_corrupt, skipped, progress, "checking memorized images")
    if not mem_good:
        raise ImageDataError("no readable training images left after skipping unreadable ones")
    mem_samples, wanted = mixture_sizes(len(mem_good), repeats, non_mem_ratio)
    non_mem = list(non_mem or [])
    non_mem_good: list[ImageRecord] = []
    if wanted and non_mem:
        non_mem_good = take_readable(non_mem, wanted, on_corrupt, skipped, progress, "checking non-memorized images")
    if wanted and len(non_mem_good) < wanted:
        msg = (f"the non-memorized pool has {len(non_mem_good)} readable images but --non_mem_ratio {non_mem_ratio} "
               f"asks for {wanted}; training on {mem_samples + len(non_mem_good)} samples instead of "
               f"{mem_samples + wanted}")
        notes.append(msg)
        warnings.warn(msg, stacklevel=2)
    if skipped:
        msg = (f"skipped {len(skipped)} unreadable image(s): "
               + "; ".join(f"{s['image']} ({s['reason']})" for s in skipped))
        notes.append(msg)
        warnings.warn(msg, stacklevel=2)
    records = mem_good * repeats + non_mem_good
    report = MixtureReport(
        mem_found=len(mem), mem_used=len(mem_good), repeats=repeats, mem_samples=mem_samples,
        non_mem_ratio=non_mem_ratio, non_mem_requested=wanted, non_mem_found=len(non_mem),
        non_mem_used=len(non_mem_good), total=len(records), skipped_images=skipped, warnings=notes,
    )
    return records, report


# ------------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class ImageTransformConfig:
    """Image preprocessing of the diffusers text-to-image example: resize the short side, crop, flip, [-1, 1]."""

    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False


@dataclass(frozen=True)
class CaptionConfig:
    """Caption-side randomness: Somepalli/Wen et al.'s augmentation and caption dropout (→ empty prompt)."""

    prompt_aug_style: str | None = None
    repeat_num: int = 1
    caption_dropout: float = 0.0


def transform_image(image, cfg: ImageTransformConfig, generator: np.random.Generator) -> torch.Tensor:
    """[3, R, R] in [-1, 1]: bilinear resize of the short side to R, center or random crop, random h-flip.

    The diffusers example's torchvision pipeline (Resize(R), Center/RandomCrop(R), RandomHorizontalFlip,
    ToTensor, Normalize(0.5, 0.5)) done with PIL and numpy, with the crop and flip drawn from ``generator``.
    """
    from PIL import Image

    image = image.convert("RGB")
    r = cfg.resolution
    w, h = image.size
    # torchvision's Resize(int): the short side becomes r, the long side int(r * long / short).
    size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    # Both offsets and the flip are always drawn, so every draw keeps its place in the stream.
    top_rand, left_rand = int(generator.integers(0, h - r + 1)), int(generator.integers(0, w - r + 1))
    flip = bool(generator.random() < 0.5)
    top, left = (int(round((h - r) / 2.0)), int(round((w - r) / 2.0))) if cfg.center_crop else (top_rand, left_rand)
    image = image.crop((left, top, left + r, top + r))
    if cfg.random_flip and flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (pixels - 0.5) / 0.5


def choose_caption(caption: str | tuple[str, ...], cfg: CaptionConfig, generator: np.random.Generator,
                   tokenizer=None) -> str:
    """One caption of a record: a random one of a list, augmented, then dropped to "" with probability p."""
    if not isinstance(caption, str):
        caption = caption[int(generator.integers(0, len(caption)))]
    if cfg.prompt_aug_style is not None:
        caption = augment_prompt(caption, cfg.prompt_aug_style, cfg.repeat_num, generator, tokenizer=tokenizer)
    if cfg.caption_dropout > 0 and generator.random() < cfg.caption_dropout:
        caption = ""
    return caption


class TextImageDataset(torch.utils.data.Dataset):
    """Items are keyed by (epoch, position, index): position in the epoch's order seeds every random draw."""

    def __init__(self, records: list[ImageRecord], transform: ImageTransformConfig, captions: CaptionConfig,
                 seed: int, tokenizer=None, hf_dataset=None, image_column: str = "image"):
        self.records = records
        self.transform = transform
        self.captions = captions
        self.seed = seed
        self.tokenizer = tokenizer
        self.hf_dataset = hf_dataset
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, rec: ImageRecord):
        from PIL import Image

        if rec.path is not None:
            try:
                with Image.open(rec.path) as im:
                    return im.convert("RGB")
            except Exception as exc:
                raise ImageDataError(f"{rec.path}: cannot read image ({type(exc).__name__}: {exc})") from exc
        return self.hf_dataset[rec.row][self.image_column]

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, position, index = key
        rec = self.records[index]
        sample_seed = derive_seed(self.seed, epoch, position)
        pixels = transform_image(self._image(rec), self.transform, numpy_generator(sample_seed, STREAM_IMAGE))
        caption = choose_caption(rec.caption, self.captions, numpy_generator(sample_seed, STREAM_CAPTION),
                                 tokenizer=self.tokenizer)
        return {"pixel_values": pixels, "caption": caption, "sample_seed": sample_seed, "index": index,
                "memorized": rec.memorized}


class TextImageCollator:
    """Stacks images and tokenizes captions (padded to the tokenizer's length, truncated) for a batch."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        tok = self.tokenizer
        ids = tok([it["caption"] for it in items], max_length=tok.model_max_length, padding="max_length",
                  truncation=True, return_tensors="pt").input_ids
        return {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]).contiguous().float(),
            "input_ids": ids,
            "captions": [it["caption"] for it in items],
            "sample_seed": torch.tensor([it["sample_seed"] for it in items], dtype=torch.int64),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "memorized": torch.tensor([it["memorized"] for it in items], dtype=torch.bool),
        }
