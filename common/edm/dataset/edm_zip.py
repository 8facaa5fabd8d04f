"""EDM dataset zips: built from CIFAR-10, an image folder, another EDM zip or scikit-learn's digits; read back.

The zip is the one NVlabs/edm's ``dataset_tool.py`` writes and its ``ImageFolderDataset`` (and DiffMemorize's)
reads: image i is the PNG ``{i // 1000:05d}/img{i:08d}.png`` (8-bit grayscale or RGB), plus ``dataset.json`` =
``{"labels": [[member name, integer label], ...]}`` or ``{"labels": null}``. Readers take the image members in
sorted name order and look their labels up by name, so zips written by EDM read here and ours read there.


Float data (MoLRG, ``common.edm.dataset.molrg``: real values that 8-bit PNGs would quantise) goes in the same kind of
zip
with one member ``data.npy`` (float32 N×C×H×W, already in the model's range) in place of the PNGs, named
``data.npy[i]`` in ``dataset.json``, plus ``source.json`` (how it was made). ``load_dataset_zip`` returns its
images as float32 and ``ImageDataset`` feeds them unscaled; such a zip cannot be an image ``--source``.

Every zip member read here (and every npz member ``open_npz`` hands to numpy) is first checked against the sizes
the zip declares: at most ``MAX_JSON_MEMBER_BYTES`` / ``MAX_IMAGE_MEMBER_BYTES`` / ``MAX_ARRAY_MEMBER_BYTES``
uncompressed and, past ``RATIO_FLOOR_BYTES``, compressed at most ``MAX_COMPRESSION_RATIO``:1, so a deflate bomb is
refused on one line before it is inflated.

The sources a zip is built from are :mod:`common.edm.dataset.sources`; which images and labels go in
(DiffMemorize's rules) is :mod:`common.edm.dataset.recipe`.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from diffmem.common.errors import DiffmemError
from diffmem.common.results import pid_alive

LABELS_FILE = "dataset.json"


FLOAT_MEMBER = "data.npy"


FLOAT_INFO = "source.json"


CHANNELS = (1, 3)  # grayscale or RGB
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


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


class DatasetError(DiffmemError, ValueError):
    """An unusable dataset source or zip; str() is the one-line message for the user."""


class DatasetArrays(NamedTuple):
    """Decoded images (uint8 N×C×H×W; float32 for float data), integer labels (int64 N) or None, one name each."""

    images: np.ndarray
    labels: np.ndarray | None
    names: list[str]


def archive_name(index: int) -> str:
    """Member name of output image ``index``, as NVlabs/edm's dataset_tool writes it."""
    return f"{index // 1000:05d}/img{index:08d}.png"


def float_names(n: int) -> list[str]:
    """Names of the rows of a float zip's ``data.npy`` (its ``dataset.json`` keys): ``data.npy[i]``."""
    return [f"{FLOAT_MEMBER}[{i}]" for i in range(n)]


def reason_of(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line (some, like tarfile's, span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def pil_module():
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
    Image = pil_module()
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            return _image_array(img, where)
    except DatasetError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DatasetError(f"{where}: cannot read image ({reason_of(exc)})") from None


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


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{path}: expected an EDM dataset zip, cannot open it "
                           f"({reason_of(exc)})") from None


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
        raise DatasetError(f"{where}: cannot read the zip member ({reason_of(exc)})") from None


def zip_contents(zf: zipfile.ZipFile, path: Path) -> tuple[list[str], np.ndarray | None, str]:
    """(image members in sorted order, their labels or None, why there are none) of an EDM zip."""
    names = sorted(n for n in zf.namelist() if is_image_name(n) and not n.endswith("/"))
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
        raise error(f"{path}: cannot read the npz ({reason_of(exc)})") from None
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
    Image = pil_module()
    names = [archive_name(i) for i in range(len(images))]
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = _temporary_beside(path)
    try:
        # Stored, uncompressed PNGs (as EDM writes them): decoding 50k of them is what training waits for.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, image in progress_bar(zip(names, images), len(names), "writing", progress):
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
        raise DatasetError(f"{where}: cannot read it as a .npy array ({reason_of(exc)})") from None
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
    with open_zip(path) as zf:
        if FLOAT_MEMBER in zf.namelist():
            if any(is_image_name(n) for n in zf.namelist()):
                raise DatasetError(f"{path}: holds both images and {FLOAT_MEMBER}; expected one or the other")
            return _load_float_zip(zf, path)
        names, labels, _ = zip_contents(zf, path)
        images, shape0 = None, None
        for j, name in enumerate(progress_bar(names, len(names), "reading", progress)):
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


def progress_bar(iterable, total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=not progress, leave=False, delay=2.0)
