"""The sources an EDM dataset zip is built from (``open_source``):
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
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffmem.common.edm.dataset.edm_zip import (
    IMAGE_EXTENSIONS,
    LABELS_FILE,
    DatasetError,
    decode_image,
    is_image_name,
    open_zip,
    parse_labels_json,
    read_zip_member,
    reason_of,
    zip_contents,
)

CIFAR_DIR = "cifar-10-batches-py"


CIFAR_SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


CIFAR_CLASSES = 10


CIFAR_SIDE = 32


DIGITS = "digits"


SOURCE_HINT = "a CIFAR-10 python tarball (.tar.gz), an EDM dataset zip, a folder of images or 'digits'"


def digits_to_uint8(values: np.ndarray) -> np.ndarray:
    """scikit-learn digits values 0..16 → uint8 0..255 by floor(v·255/16 + ½) (halves up: 8 → 128)."""
    return np.clip(np.floor(np.asarray(values, dtype=np.float64) * 255.0 / 16.0 + 0.5), 0, 255).astype(np.uint8)


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
                           f"({reason_of(exc)})") from None
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
        raise DatasetError(f"{path}: expected {expect}, cannot read it as one ({reason_of(exc)})") from None
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


def _folder_source(folder: Path) -> Source:
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if is_image_name(p.name) and p.is_file()}
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


def _zip_source(path: Path) -> Source:
    zf = open_zip(path)
    stack = ExitStack()
    stack.enter_context(zf)
    try:
        names, labels, reason = zip_contents(zf, path)
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
