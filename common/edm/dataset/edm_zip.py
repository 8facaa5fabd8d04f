"""EDM dataset zips: built from CIFAR-10, an image folder, another EDM zip or scikit-learn's digits; read back.

The zip is the one NVlabs/edm's ``dataset_tool.py`` writes and its ``ImageFolderDataset`` (and DiffMemorize's)
reads: image i is the PNG ``{i // 1000:05d}/img{i:08d}.png`` (8-bit grayscale or RGB), plus ``dataset.json`` =
``{"labels": [[member name, integer label], ...]}`` or ``{"labels": null}``. Readers take the image members in
sorted name order and look their labels up by name, so zips written by EDM read here and ours read there.

Sources (``open_source``):
- ``cifar-10-python.tar.gz`` (any ``.tar.gz``/``.tgz``/``.tar``): members ``cifar-10-batches-py/data_batch_1..5``
  (train, in that order = source order) or ``test_batch`` (test); each a pickle (loaded with ``encoding="bytes"``
  and only numpy's array globals allowed) of ``{b"data": uint8 N×3072 (R plane, G, B; each 32×32 row-major),
  b"labels": N ints in 0..9}``;
- a folder: image files (``IMAGE_EXTENSIONS``) found recursively, in the order of their paths relative to the
  folder as ``/``-joined strings; labels from ``dataset.json`` in the folder (EDM's format, names relative to the
  folder) when present;
- an EDM dataset zip (as above);
- ``digits``: scikit-learn's bundled ``load_digits`` (1797 8×8 images, labels 0..9), values v in 0..16 mapped to
  uint8 by ``floor(v·255/16 + ½)`` (0 → 0, 8 → 128, 16 → 255).
File images other than 8-bit grayscale (L, LA, 1) are converted to RGB by PIL (alpha dropped); 16-bit and float
images are refused. Only the images that end up in the output are decoded.

Float data (MoLRG, ``common.edm.dataset.molrg``: real values that 8-bit PNGs would quantise) goes in the same kind of
zip
with one member ``data.npy`` (float32 N×C×H×W, already in the model's range) in place of the PNGs, named
``data.npy[i]`` in ``dataset.json``, plus ``source.json`` (how it was made). ``load_dataset_zip`` returns its
images as float32 and ``ImageDataset`` feeds them unscaled; such a zip cannot be an image ``--source``.

Every zip member read here (and every npz member ``open_npz`` hands to numpy) is first checked against the sizes
the zip declares: at most ``MAX_JSON_MEMBER_BYTES`` / ``MAX_IMAGE_MEMBER_BYTES`` / ``MAX_ARRAY_MEMBER_BYTES``
uncompressed and, past ``RATIO_FLOOR_BYTES``, compressed at most ``MAX_COMPRESSION_RATIO``:1, so a deflate bomb is
refused on one line before it is inflated.

The selection rules (DiffMemorize's by default) are the pure functions below; ``build_dataset`` applies them in
this order: subset (source indices, output in source order) → intra-class mix (replacements take the slot and the
true label of the image they replace) → labels → images (channels, center crop, Lanczos resize). Seeded draws use
``numpy.random.default_rng(SeedSequence([seed, stream]))`` with one stream per kind of draw (``STREAM_*``), so the
subset, the mix and the random labels are independent and each reproducible from ``seed``.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np

from diffmem.common.errors import ConfigError, DiffmemError
from diffmem.common.results import pid_alive
from diffmem.common.settings import option

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR_CLASSES = 10
CIFAR_SIDE = 32
LABELS_FILE = "dataset.json"
FLOAT_MEMBER = "data.npy"
FLOAT_INFO = "source.json"
DIGITS = "digits"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
SOURCE_HINT = "a CIFAR-10 python tarball (.tar.gz), an EDM dataset zip, a folder of images or 'digits'"

SUBSETS = ("first", "random")
LABEL_RULES = ("true", "random", "unique", "none")
TRANSFORMS = ("center-crop",)
CHANNELS = (1, 3)

# Streams of the seeded draws (see the module docstring).
STREAM_SUBSET = 0
STREAM_MIX = 1
STREAM_LABELS = 2

# Bounds on what one zip member may inflate to. A deflate bomb (a 1 MB zip whose dataset.json inflates to 1 GiB) is
# refused from the sizes its central directory declares, before a byte is inflated; as those sizes are the zip
# writer's word, a member is then read no further than its declared size (``read_zip_member``).
# dataset.json: ~33 bytes per image, so ImageNet's 1.28M images take ~42 MB and CIFAR-10's 50k 1.6 MB.
MAX_JSON_MEMBER_BYTES = 64 << 20
# One image: a PNG as this module and EDM write them (uncompressed) of 4096×4096 RGB is 48 MiB.
MAX_IMAGE_MEMBER_BYTES = 64 << 20
# data.npy of a float zip or an array of an npz (generated images, features): memory the machine must hold anyway,
# so a bound against absurd sizes only (50k float32 3×256×256 images are 37 GiB; this project's sets are far smaller).
MAX_ARRAY_MEMBER_BYTES = 64 << 30
# The most a member over RATIO_FLOOR_BYTES may have been compressed (uncompressed / compressed size). Genuine members
# stay far below (measured: PNGs and float arrays ~1:1, dataset.json deflated ~10:1, a smooth synthetic 1024²
# uncompressed PNG deflated 223:1; our zips and EDM's store members, 1:1), while a bomb's member approaches deflate's
# ceiling of ~1030:1 (bzip2/lzma go far past it); a milder one that still inflates past the size bounds meets those.
# Members up to the floor are exempt: a flat image may compress 700:1, and inflating 1 MiB harms nothing.
MAX_COMPRESSION_RATIO = 300
RATIO_FLOOR_BYTES = 1 << 20


def draw_generator(seed: int, stream: int) -> np.random.Generator:
    """numpy Generator of SeedSequence([seed, stream]): common.seeding.numpy_generator's, without importing torch."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))


class DatasetError(DiffmemError, ValueError):
    """An unusable dataset source or zip; str() is the one-line message for the user."""


class DatasetArrays(NamedTuple):
    """Decoded images (uint8 N×C×H×W; float32 for float data), integer labels (int64 N) or None, one name each."""

    images: np.ndarray
    labels: np.ndarray | None
    names: list[str]


# ----------------------------------------------------------------------------------------------- pure rules


def archive_name(index: int) -> str:
    """Member name of output image ``index``, as NVlabs/edm's dataset_tool writes it."""
    return f"{index // 1000:05d}/img{index:08d}.png"


def digits_to_uint8(values: np.ndarray) -> np.ndarray:
    """scikit-learn digits values 0..16 → uint8 0..255 by floor(v·255/16 + ½) (halves up: 8 → 128)."""
    return np.clip(np.floor(np.asarray(values, dtype=np.float64) * 255.0 / 16.0 + 0.5), 0, 255).astype(np.uint8)


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


def to_model_range(images):
    """uint8 images (numpy or torch) → float32 in [−1, 1] as EDM's training loop: x / 127.5 − 1; float data
    (MoLRG) is already the model's input and is only cast to float32."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            return images.astype(np.float32)
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    import torch

    if images.dtype != torch.uint8:
        return images.to(torch.float32)
    return images.to(torch.float32) / 127.5 - 1


def float_names(n: int) -> list[str]:
    """Names of the rows of a float zip's ``data.npy`` (its ``dataset.json`` keys): ``data.npy[i]``."""
    return [f"{FLOAT_MEMBER}[{i}]" for i in range(n)]


# ------------------------------------------------------------------------------------------------- images


def _reason(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line (some, like tarfile's, span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _pil():
    from PIL import Image

    return Image


def _image_array(img, where: str) -> np.ndarray:
    """A PIL image as uint8 H×W×C with C = 1 (grayscale modes) or 3 (everything else, via PIL's RGB conversion)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        raise DatasetError(f"{where}: expected an 8-bit grayscale or colour image, got mode {img.mode}")
    if img.mode in ("1", "LA", "La"):
        img = img.convert("L")
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_image(data: bytes | str | Path, where: str) -> np.ndarray:
    """Decode image bytes or a file to uint8 H×W×C (C 1 or 3); an unreadable image raises DatasetError."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            return _image_array(img, where)
    except DatasetError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DatasetError(f"{where}: cannot read image ({_reason(exc)})") from None


def lanczos_resize(image: np.ndarray, size: int) -> np.ndarray:
    """H×W×C uint8 → size×size×C with PIL's Lanczos filter (``Image.LANCZOS``), as EDM and DiffMemorize do."""
    Image = _pil()
    gray = image.shape[2] == 1
    pil = Image.fromarray(image[:, :, 0] if gray else image, "L" if gray else "RGB")
    out = np.asarray(pil.resize((size, size), Image.LANCZOS), dtype=np.uint8)
    return out[:, :, None] if gray else out


def prepare_image(image: np.ndarray, where: str, channels: int | None = None, resolution: int | None = None,
                  transform: str | None = None) -> np.ndarray:
    """Channels (RGB → 1 by PIL's ITU-R 601 luma, 1 → 3 by repetition), then center crop, then Lanczos resize."""
    if channels == 1 and image.shape[2] == 3:
        image = np.asarray(_pil().fromarray(image, "RGB").convert("L"), dtype=np.uint8)[:, :, None]
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


# ------------------------------------------------------------------------------------------------ sources


@dataclass
class Source:
    """Images of one source, decoded on demand: ``image(i)`` is uint8 H×W×C, ``describe(i)`` names it."""

    kind: str  # "cifar", "folder", "zip" or "digits"
    where: str
    names: list[str]
    labels: np.ndarray | None
    _load: Callable[[int], np.ndarray]
    _describe: Callable[[int], str]
    no_labels_reason: str = ""
    _stack: ExitStack = field(default_factory=ExitStack)

    def __len__(self) -> int:
        return len(self.names)

    def image(self, i: int) -> np.ndarray:
        return self._load(i)

    def describe(self, i: int) -> str:
        return self._describe(i)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: the globals a pickled dict of numpy arrays needs, nothing that runs code."""

    def find_class(self, module: str, name: str):
        import numpy as np_mod

        if (module, name) == ("_codecs", "encode"):  # Python 3 writes bytes this way under protocol 2
            import codecs

            return codecs.encode
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            try:
                from numpy._core import multiarray
            except ImportError:  # numpy < 2
                from numpy.core import multiarray
            return getattr(multiarray, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np_mod, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of a CIFAR-10 batch")


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch pickle → (uint8 N×3×32×32, int64 labels), with one-line errors naming the member."""
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a corrupt pickle raises anything from EOFError to TypeError
        raise DatasetError(f"{where}: expected a CIFAR-10 batch pickle, cannot unpickle it "
                           f"({_reason(exc)})") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{where}: expected a pickled dict with b'data' and b'labels', got {type(batch).__name__}")
    missing = [k for k in (b"data", b"labels") if k not in batch]
    if missing:
        have = ", ".join(repr(k) for k in list(batch)[:6])
        raise DatasetError(f"{where}: expected keys b'data' and b'labels', missing {' and '.join(map(repr, missing))}"
                           f" (keys: {have or 'none'})")
    data = batch[b"data"]
    size = 3 * CIFAR_SIDE * CIFAR_SIDE
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == size):
        got = (f"{data.dtype} array of shape {'×'.join(map(str, data.shape))}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise DatasetError(f"{where}: expected b'data' a uint8 array of shape N×{size}, got {got}")
    try:
        labels = np.asarray(batch[b"labels"])
    except Exception:
        labels = np.zeros(0, dtype=object)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise DatasetError(f"{where}: expected b'labels' a list of {len(data)} integers (one per row of b'data'), "
                           f"got {type(batch[b'labels']).__name__} of {labels.size} {labels.dtype} values")
    if len(labels) and (labels.min() < 0 or labels.max() >= CIFAR_CLASSES):
        raise DatasetError(f"{where}: expected b'labels' in 0..{CIFAR_CLASSES - 1}, got values "
                           f"{labels.min()}..{labels.max()}")
    # Row layout: 1024 red values, then green, then blue, each plane 32×32 row-major → N×3×32×32 directly.
    return data.reshape(len(data), 3, CIFAR_SIDE, CIFAR_SIDE), labels.astype(np.int64)


def _cifar_source(path: Path, split: str) -> Source:
    expect = f"a CIFAR-10 python tarball (tar.gz with {CIFAR_DIR}/data_batch_1..5 and test_batch)"
    images, labels, names = [], [], []
    try:
        name = path.name.lower()
        mode = "r:gz" if name.endswith((".tar.gz", ".tgz")) else "r:" if name.endswith(".tar") else "r:*"
        with tarfile.open(path, mode) as tar:
            for member in CIFAR_SPLITS[split]:
                where = f"{path}:{CIFAR_DIR}/{member}"
                try:
                    info = tar.getmember(f"{CIFAR_DIR}/{member}")
                except KeyError:
                    raise DatasetError(f"{path}: expected {expect}, member {CIFAR_DIR}/{member} is missing") from None
                f = tar.extractfile(info)
                if f is None:
                    raise DatasetError(f"{where}: expected a file member, got a {'folder' if info.isdir() else 'link'}")
                x, y = _cifar_batch(f.read(), where)
                images.append(x)
                labels.append(y)
                names += [f"{CIFAR_DIR}/{member}[{r}]" for r in range(len(x))]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(f"{path}: expected {expect}, cannot read it as one ({_reason(exc)})") from None
    data = np.concatenate(images)
    return Source("cifar", str(path), names, np.concatenate(labels),
                  lambda i: data[i].transpose(1, 2, 0), lambda i: f"{path}:{names[i]}")


def _digits_source() -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = digits_to_uint8(digits.images)
    names = [f"digits[{i}]" for i in range(len(data))]
    return Source("digits", DIGITS, names, np.asarray(digits.target, dtype=np.int64),
                  lambda i: data[i][:, :, None], lambda i: names[i])


def parse_labels_json(text: bytes | str, where: str, names: Sequence[str]) -> np.ndarray | None:
    """EDM's ``dataset.json`` → int64 labels in the order of ``names`` (None for ``"labels": null``)."""
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        detail = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise DatasetError(f"{where}: expected JSON {{\"labels\": [[file, label], ...]}}, got invalid JSON "
                           f"({detail})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DatasetError(f"{where}: expected an object with a \"labels\" list (or null)")
    entries = meta["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise DatasetError(f"{where}: expected \"labels\" a list of [file, label] pairs or null, "
                           f"got {type(entries).__name__}")
    table = {}
    for j, entry in enumerate(entries):
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
              and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0)
        if not ok:
            raise DatasetError(f"{where}: labels[{j}]: expected [file name, integer label >= 0], "
                               f"got {json.dumps(entry)[:60]}")
        table[entry[0].replace("\\", "/")] = entry[1]
    present = set(names)
    unknown = [name for name in table if name not in present]
    if unknown:
        # A label for a file that is not there: a renamed or deleted image, or a dataset.json of another folder.
        name = unknown[0]
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise DatasetError(f"{where}: labels name {name!r}{more}, which is not among its images; "
                           f"expected a label for each image there and no other")
    missing = [n for n in names if n not in table]
    if missing:
        raise DatasetError(f"{where}: no label for {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                       if len(missing) > 1 else ""))
    return np.array([table[n] for n in names], dtype=np.int64)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_source(folder: Path) -> Source:
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if _is_image_name(p.name) and p.is_file()}
    names = sorted(files)
    if not names:
        raise DatasetError(f"{folder}: expected a folder of images ({', '.join(IMAGE_EXTENSIONS)}), found none")
    meta = folder / LABELS_FILE
    labels, reason = None, f" (no {LABELS_FILE} in the folder)"
    if meta.is_file():
        labels = parse_labels_json(meta.read_bytes(), str(meta), names)
        reason = f" ({meta} has \"labels\": null)"
    paths = [files[n] for n in names]
    return Source("folder", str(folder), names, labels, lambda i: decode_image(paths[i], str(paths[i])),
                  lambda i: str(paths[i]), no_labels_reason=reason)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{path}: expected an EDM dataset zip, cannot open it "
                           f"({_reason(exc)})") from None


def member_limit(name: str) -> int:
    """The most bytes member ``name`` may inflate to, by its kind (the ``MAX_*_MEMBER_BYTES`` above)."""
    if name.lower().endswith(".json"):
        return MAX_JSON_MEMBER_BYTES
    if name.lower().endswith(".npy"):
        return MAX_ARRAY_MEMBER_BYTES
    return MAX_IMAGE_MEMBER_BYTES


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def check_zip_member(info: zipfile.ZipInfo, where: str, error: type[Exception] = None) -> None:
    """Refuse (``error``, one line) a member whose declared uncompressed size or compression ratio is past the
    bounds above, before it is read."""
    error = error or DatasetError
    limit = member_limit(info.filename)
    if info.file_size > limit:
        raise error(f"{where}: the zip declares it inflates to {_size(info.file_size)}, more than the {_size(limit)} "
                    f"such a member may hold (a zip bomb?); refusing to read it")
    if info.file_size > RATIO_FLOOR_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise error(f"{where}: compressed {info.file_size / max(info.compress_size, 1):.0f}:1 "
                    f"({info.compress_size} -> {info.file_size} bytes), past the {MAX_COMPRESSION_RATIO}:1 genuine "
                    f"dataset members stay under (a zip bomb?); expected stored or lightly compressed members")


def read_bounded(stream, declared: int, where: str, error: type[Exception] = None) -> bytes:
    """Exactly ``declared`` bytes of ``stream`` (a member's declared size, already checked): fewer, or any byte
    after them, is refused, so a lying size cannot make the read inflate past it."""
    error = error or DatasetError
    data = stream.read(declared)
    if len(data) != declared:
        raise error(f"{where}: holds {len(data)} bytes, not the {declared} its zip entry declares; expected an "
                    f"intact zip")
    if stream.read(1):
        raise error(f"{where}: inflates past the {declared} bytes its zip entry declares; refusing to read it")
    return data


def read_zip_member(zf: zipfile.ZipFile, name: str, where: str) -> bytes:
    """Member ``name``, checked against the bounds (``check_zip_member``) and read no further than its size."""
    try:
        info = zf.getinfo(name)
        check_zip_member(info, where)
        with zf.open(info) as stream:
            return read_bounded(stream, info.file_size, where)
    except (zipfile.BadZipFile, OSError, zlib.error, EOFError, NotImplementedError) as exc:
        raise DatasetError(f"{where}: cannot read the zip member ({_reason(exc)})") from None



def _zip_contents(zf: zipfile.ZipFile, path: Path) -> tuple[list[str], np.ndarray | None, str]:
    """(image members in sorted order, their labels or None, why there are none) of an EDM zip."""
    names = sorted(n for n in zf.namelist() if _is_image_name(n) and not n.endswith("/"))
    if not names and FLOAT_MEMBER in zf.namelist():
        raise DatasetError(f"{path}: holds float data ({FLOAT_MEMBER}, e.g. MoLRG), not images; it trains and "
                           f"is read as it is, but cannot be an image source")
    if not names:
        raise DatasetError(f"{path}: expected an EDM dataset zip of images, it holds none")
    # Every image's declared size at once: a bomb among them fails here, before a model loads or hours of reading.
    for name in names:
        check_zip_member(zf.getinfo(name), f"{path}:{name}")
    if LABELS_FILE not in zf.namelist():
        return names, None, f" (no {LABELS_FILE} in the zip)"
    where = f"{path}:{LABELS_FILE}"
    return names, parse_labels_json(read_zip_member(zf, LABELS_FILE, where), where, names), \
        f" ({where} has \"labels\": null)"


def _zip_source(path: Path) -> Source:
    zf = _open_zip(path)
    stack = ExitStack()
    stack.enter_context(zf)
    try:
        names, labels, reason = _zip_contents(zf, path)
    except DatasetError:
        stack.close()
        raise

    def load(i: int) -> np.ndarray:
        where = f"{path}:{names[i]}"
        return decode_image(read_zip_member(zf, names[i], where), where)

    return Source("zip", str(path), names, labels, load, lambda i: f"{path}:{names[i]}",
                  no_labels_reason=reason, _stack=stack)


def open_source(spec: str | Path, split: str = "train") -> Source:
    """The source named by ``spec``: 'digits', a folder, an EDM zip or a CIFAR-10 tarball (by name, else content)."""
    if str(spec) == DIGITS:
        return _digits_source()
    path = Path(spec)
    if path.is_dir():
        return _folder_source(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file or folder (expected {SOURCE_HINT})")
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return _cifar_source(path, split)
    if name.endswith(".zip") or zipfile.is_zipfile(path):
        return _zip_source(path)
    if tarfile.is_tarfile(path):
        return _cifar_source(path, split)
    raise DatasetError(f"{path}: expected {SOURCE_HINT}, got a file that is none of these")


# ------------------------------------------------------------------------------------------------ building


@dataclass(frozen=True)
class DatasetRecipe:
    """What to take from which source (see the module docstring for the rules); ``validate`` checks it; each field
    is also a dataset_tool option."""

    source: str = option(metavar="SRC",
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
    resolution: int | None = option(None, type=int, metavar="R", help="resize to R×R with PIL's Lanczos filter")
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


def _tqdm(iterable, total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=not progress, leave=False, delay=2.0)


def _prepare_all(slots: list[tuple[Source, int]], channels: int | None, resolution: int | None,
                 transform: str | None, progress: bool) -> np.ndarray:
    """Decode and prepare every output image → uint8 N×C×H×W; an image of another size raises DatasetError."""
    prepared, first = [], None
    for src, i in _tqdm(slots, len(slots), "images", progress):
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


# ------------------------------------------------------------------------------------------- zip in and out


def open_npz(path: str | Path, error: type[Exception] = None):
    """np.load of an npz (no pickles); a file that is no npz or a damaged one raises error with one line.

    numpy reads any non-zip file as a .npy and, for a text file, complains about pickled data: say what it is.
    """
    error = error or DatasetError
    path = Path(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    if not is_zip:
        raise error(f"{path}: not an npz file (expected a zip of .npy arrays, as numpy's savez writes)")
    # numpy inflates a member when it is indexed; zipfile stops that read at the declared size (and checks the CRC),
    # so checking the declared sizes here bounds it.
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                check_zip_member(info, f"{path}:{info.filename}", error)
    except (zipfile.BadZipFile, OSError) as exc:
        raise error(f"{path}: cannot read the npz ({_reason(exc)})") from None
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises OSError, ValueError, BadZipFile, EOFError for damaged files
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise error(f"{path}: cannot read the npz ({type(exc).__name__}: {first})") from None


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temporary_beside(path: Path) -> Path:
    """``.NAME.PID@HOST.tmp`` beside path: the writer is named, so a later run can tell a dead one's leftovers."""
    return path.with_name(f".{path.name}.{os.getpid()}@{_host()}.tmp")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary zips in folder that a killed write left (written on this host by a process that is
    gone); a write still running, or one of another host, is left alone. The paths removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    host = _host()
    for p in folder.iterdir():
        m = re.fullmatch(r"\..+\.(\d+)@([A-Za-z0-9_-]+)\.tmp", p.name)
        if m and m.group(2) == host and p.is_file() and not pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _checked_labels(path: Path, labels, n: int) -> np.ndarray | None:
    """``labels`` as an integer array of one label >= 0 per image, or DatasetError; None stays None."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu" or (labels < 0).any():
        raise DatasetError(f"{path}: expected one integer label >= 0 per image ({n}), got "
                           f"{labels.dtype} of shape {labels.shape}")
    return labels


def write_dataset_zip(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None,
                      progress: bool = True) -> list[str]:
    """Write an EDM dataset zip atomically (a temporary file beside ``path``, renamed when complete); member names."""
    path = Path(path)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in CHANNELS or len(images) == 0:
        raise DatasetError(f"{path}: expected images uint8 N×C×H×W with N >= 1 and C 1 or 3, got "
                           f"{images.dtype} {'×'.join(map(str, images.shape))}")
    labels = _checked_labels(path, labels, len(images))
    Image = _pil()
    names = [archive_name(i) for i in range(len(images))]
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = _temporary_beside(path)
    try:
        # Stored, uncompressed PNGs (as EDM writes them): decoding 50k of them is what training waits for.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, image in _tqdm(zip(names, images), len(names), "writing", progress):
                buf = io.BytesIO()
                pil = Image.fromarray(image[0], "L") if image.shape[0] == 1 else Image.fromarray(
                    image.transpose(1, 2, 0), "RGB")
                pil.save(buf, format="png", compress_level=0, optimize=False)
                zf.writestr(name, buf.getvalue())
            table = None if labels is None else [[n, int(y)] for n, y in zip(names, labels)]
            zf.writestr(LABELS_FILE, json.dumps({"labels": table}))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return names


def write_float_dataset_zip(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None,
                            info: dict | None = None) -> list[str]:
    """Write float data (float32 N×C×H×W) as a zip with ``data.npy``, ``dataset.json`` and ``source.json``,
    atomically; the row names."""
    path = Path(path)
    images = np.asarray(images)
    if (images.dtype != np.float32 or images.ndim != 4 or images.shape[1] not in CHANNELS or len(images) == 0
            or not np.isfinite(images).all()):
        raise DatasetError(f"{path}: expected finite float32 images N×C×H×W with N >= 1 and C 1 or 3, got "
                           f"{images.dtype} {'×'.join(map(str, images.shape))}")
    labels = _checked_labels(path, labels, len(images))
    names = float_names(len(images))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = _temporary_beside(path)
    try:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images), allow_pickle=False)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(FLOAT_MEMBER, buf.getvalue())
            table = None if labels is None else [[n, int(y)] for n, y in zip(names, labels)]
            zf.writestr(LABELS_FILE, json.dumps({"labels": table}))
            zf.writestr(FLOAT_INFO, json.dumps(info or {}, indent=2))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return names


def _load_float_zip(zf: zipfile.ZipFile, path: Path) -> DatasetArrays:
    """A float zip's data.npy (float32 N×C×H×W, finite), its labels and row names."""
    where = f"{path}:{FLOAT_MEMBER}"
    try:
        images = np.load(io.BytesIO(read_zip_member(zf, FLOAT_MEMBER, where)), allow_pickle=False)
    except DatasetError:
        raise
    except Exception as exc:  # a truncated or non-npy member raises ValueError, EOFError...
        raise DatasetError(f"{where}: cannot read it as a .npy array ({_reason(exc)})") from None
    if (images.dtype != np.float32 or images.ndim != 4 or images.shape[1] not in CHANNELS or len(images) == 0
            or not np.isfinite(images).all()):
        raise DatasetError(f"{where}: expected finite float32 N×C×H×W with N >= 1 and C 1 or 3, got "
                           f"{images.dtype} {'×'.join(map(str, images.shape))}")
    names = float_names(len(images))
    labels = None
    if LABELS_FILE in zf.namelist():
        meta = f"{path}:{LABELS_FILE}"
        labels = parse_labels_json(read_zip_member(zf, LABELS_FILE, meta), meta, names)
    return DatasetArrays(images, labels, names)


def load_dataset_zip(path: str | Path, progress: bool = True) -> DatasetArrays:
    """Decode every image of an EDM dataset zip once: uint8 N×C×H×W (float32 for a float zip), labels (or None)
    and the member names."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (expected an EDM dataset zip)")
    with _open_zip(path) as zf:
        if FLOAT_MEMBER in zf.namelist():
            if any(_is_image_name(n) for n in zf.namelist()):
                raise DatasetError(f"{path}: holds both images and {FLOAT_MEMBER}; expected one or the other")
            return _load_float_zip(zf, path)
        names, labels, _ = _zip_contents(zf, path)
        images, shape0 = None, None
        for j, name in enumerate(_tqdm(names, len(names), "reading", progress)):
            where = f"{path}:{name}"
            image = decode_image(read_zip_member(zf, name, where), where).transpose(2, 0, 1)
            if images is None:
                shape0 = image.shape
                images = np.empty((len(names), *shape0), dtype=np.uint8)
            elif image.shape != shape0:
                raise DatasetError(f"{where}: image is {'×'.join(map(str, image.shape))} (C×H×W), expected "
                                   f"{'×'.join(map(str, shape0))} like {names[0]}")
            images[j] = image
    return DatasetArrays(images, labels, names)


# ------------------------------------------------------------------------------------------------ training


class ImageDataset:
    """Map-style torch dataset over a decoded EDM zip: item i is (float32 C×H×W in [−1, 1], int64 label); float
    data (``is_float``, MoLRG) is fed as it is, unscaled.

    The label is −1 when the dataset has none. Keyed by ``common.training.loop``'s (epoch, position, index), an item
    is a
    dict (``pixel_values`` as uint8, ``label``, ``index``, ``sample_seed`` = derive_seed(seed, epoch, position)) for
    ``collate_image_batch``, which scales the stacked batch. Images live decoded in memory as uint8.
    """

    def __init__(self, data: str | Path | DatasetArrays, seed: int = 0, progress: bool = False):
        import torch

        from diffmem.common.seeding import derive_seed

        self._derive_seed = derive_seed
        if not isinstance(data, DatasetArrays):
            data = load_dataset_zip(data, progress=progress)
        self.images = torch.from_numpy(np.ascontiguousarray(data.images))
        self.is_float = self.images.dtype != torch.uint8
        self.has_labels = data.labels is not None
        n = len(data.images)
        labels = data.labels if self.has_labels else np.full(n, -1)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        # As EDM: the label dimension is the largest label + 1.
        self.num_classes = int(labels.max()) + 1 if self.has_labels and n else 0
        self.names = list(data.names)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, position, index = key
            # uint8 here, scaled once per batch in collate_image_batch (a per-item division is per-op overhead);
            # float data passes through that scaling unchanged.
            return {"pixel_values": self.images[index], "label": self.labels[index],
                    "index": int(index), "sample_seed": self._derive_seed(self.seed, epoch, position)}
        return to_model_range(self.images[key]), self.labels[key]


def collate_image_batch(items: list[dict]) -> dict:
    """Stack ImageDataset's keyed items into a batch dict of tensors (the trainer moves tensors to the device)."""
    import torch

    return {"pixel_values": to_model_range(torch.stack([it["pixel_values"] for it in items])),
            "label": torch.stack([it["label"] for it in items]),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "sample_seed": torch.tensor([it["sample_seed"] for it in items], dtype=torch.int64)}
