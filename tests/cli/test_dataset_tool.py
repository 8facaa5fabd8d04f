"""data/dataset_tool.py and common.edm.dataset.edm_zip: EDM dataset zips from CIFAR-10, folders, zips and digits.

The CIFAR tarball is synthetic but has the real member and key names: image (batch b, row i) has a red plane of
10·b, a green plane of i and a blue plane of 4·row + col // 8, so every output image says which source image it is
(g = 20·(b − 1) + i) and that the R, G, B planes and their row-major layout decode right.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script, run_cli
from PIL import Image

from diffmem.common.edm.dataset.edm_zip import (
    DatasetArrays,
    ImageDataset,
    archive_name,
    collate_image_batch,
    load_dataset_zip,
    write_dataset_zip,
)
from diffmem.common.edm.dataset.recipe import (
    STREAM_LABELS,
    STREAM_SUBSET,
    DatasetRecipe,
    balanced_counts,
    build_dataset,
    center_crop_box,
    classes_counts,
    draw_generator,
    mix_count,
    mix_plan,
)
from diffmem.common.edm.dataset.sources import digits_to_uint8

SCRIPT = "data/dataset_tool.py"
PER_BATCH = 20
BLUE = (4 * np.arange(32)[:, None] + np.arange(32)[None, :] // 8).astype(np.uint8)  # 32×32, row-dependent


CLI = load_script(SCRIPT, "dataset_tool_cli")


def cifar_label(g: int) -> int:
    """Class of synthetic train image g: blocks of ten (0..9 → 0, 10..19 → 1, ...), so classes are not interleaved."""
    return (g // 10) % 10


def cifar_batch(red: int, labels: list[int], n: int = PER_BATCH) -> dict:
    data = np.zeros((n, 3072), dtype=np.uint8)
    data[:, :1024] = red
    data[:, 1024:2048] = np.arange(n, dtype=np.uint8)[:, None]
    data[:, 2048:] = BLUE.reshape(-1)
    return {b"batch_label": b"synthetic", b"data": data, b"labels": labels}


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def cifar_members(**override) -> dict[str, bytes]:
    members = {}
    for b in range(1, 6):
        labels = [cifar_label(PER_BATCH * (b - 1) + i) for i in range(PER_BATCH)]
        members[f"cifar-10-batches-py/data_batch_{b}"] = pickle.dumps(cifar_batch(10 * b, labels), protocol=2)
    members["cifar-10-batches-py/test_batch"] = pickle.dumps(
        cifar_batch(200, [i % 10 for i in range(PER_BATCH)]), protocol=2)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"x"] * 10}, protocol=2)
    members.update(override)
    return members


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_tar(tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz", cifar_members())


def source_index(image: np.ndarray) -> int:
    """g of a decoded synthetic CIFAR image (3×32×32), after checking its blue plane's layout."""
    assert (image[2] == BLUE).all()
    assert (image[0] == image[0, 0, 0]).all() and (image[1] == image[1, 0, 0]).all()
    return PER_BATCH * (int(image[0, 0, 0]) // 10 - 1) + int(image[1, 0, 0])


def tool(*args) -> int:
    """main(argv) in-process, argparse's exit included."""
    try:
        return CLI.main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code


def build(tmp_path: Path, *args, name: str = "out.zip") -> DatasetArrays:
    dest = tmp_path / name
    assert tool("--dest", dest, *args) == 0
    return load_dataset_zip(dest, progress=False)


def write_png(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def pattern(h: int, w: int, c: int, base: int) -> np.ndarray:
    values = (base + 7 * np.arange(h * w * c)) % 256
    return values.reshape(h, w, c).astype(np.uint8) if c == 3 else values.reshape(h, w).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- pure rules


def test_rules():
    assert archive_name(0) == "00000/img00000000.png" and archive_name(1234) == "00001/img00001234.png"
    assert balanced_counts(range(10), 25) == {k: 3 if k < 5 else 2 for k in range(10)}
    assert balanced_counts([2, 0, 1], 4) == {0: 2, 1: 1, 2: 1}
    assert classes_counts(3, 10) == {0: 3, 1: 3, 2: 4}
    assert mix_count(0.35, 10) == 4 and mix_count(0.25, 10) == 3 and mix_count(0.8, 1000) == 800
    assert mix_count(0.0, 7) == 0 and mix_count(1.0, 7) == 7
    assert digits_to_uint8(np.array([0, 1, 8, 15, 16])).tolist() == [0, 16, 128, 239, 255]
    assert center_crop_box(40, 30) == (5, 0, 35, 30) and center_crop_box(30, 41) == (0, 5, 30, 35)
    from diffmem.common.seeding import numpy_generator

    assert (draw_generator(7, 2).integers(0, 1000, 20) == numpy_generator(7, 2).integers(0, 1000, 20)).all()
    slots, picks = mix_plan(10, 6, 0.35, seed=3)
    assert len(slots) == 4 and (np.diff(slots) > 0).all() and len(set(picks.tolist())) == 4 and picks.max() < 6


# -------------------------------------------------------------------------------------------------- CIFAR


def test_cifar_train_decodes_planes_in_source_order(tmp_path, cifar):
    dest = tmp_path / "all.zip"
    r = run_cli(SCRIPT, "--source", cifar, "--dest", dest)
    assert r.returncode == 0, r.stderr
    assert "100 images 3×32×32" in r.stdout
    images, labels, names = load_dataset_zip(dest, progress=False)
    assert images.shape == (100, 3, 32, 32) and images.dtype == np.uint8
    assert [source_index(x) for x in images] == list(range(100))
    assert labels.tolist() == [cifar_label(g) for g in range(100)]
    assert names == [archive_name(i) for i in range(100)]
    with zipfile.ZipFile(dest) as zf:
        meta = json.loads(zf.read("dataset.json"))
        assert sorted(zf.namelist()) == sorted(names + ["dataset.json"])
    assert meta["labels"][:2] == [["00000/img00000000.png", 0], ["00000/img00000001.png", 0]]
    assert [p.name for p in tmp_path.iterdir()] == ["all.zip"]


def test_cifar_test_split(tmp_path, cifar):
    images, labels, _ = build(tmp_path, "--source", cifar, "--split", "test")
    assert len(images) == PER_BATCH and (images[:, 0] == 200).all()
    assert images[:, 1, 0, 0].tolist() == list(range(PER_BATCH)) and (images[:, 2] == BLUE).all()
    assert labels.tolist() == [i % 10 for i in range(PER_BATCH)]


def test_balanced_first_n_over_c_with_remainder(tmp_path, cifar):
    images, labels, _ = build(tmp_path, "--source", cifar, "--max_images", 25)
    kept = [source_index(x) for x in images]
    # Class k is g = 10k..10k+9; the first 25 mod 10 = 5 classes get 3, the others 2, in source order.
    assert kept == [10 * k + j for k in range(10) for j in range(3 if k < 5 else 2)]
    assert labels.tolist() == [cifar_label(g) for g in kept]


def test_random_subset_is_seeded_and_balanced(tmp_path, cifar):
    a = build(tmp_path, "--source", cifar, "--max_images", 20, "--subset", "random", "--seed", 3, name="a.zip")
    b = build(tmp_path, "--source", cifar, "--max_images", 20, "--subset", "random", "--seed", 3, name="b.zip")
    c = build(tmp_path, "--source", cifar, "--max_images", 20, "--subset", "random", "--seed", 4, name="c.zip")
    assert (a.images == b.images).all() and (a.labels == b.labels).all()
    kept = [source_index(x) for x in a.images]
    assert kept == sorted(kept) and np.bincount(a.labels).tolist() == [2] * 10
    rng = draw_generator(3, STREAM_SUBSET)
    expected = sorted(int(g) for k in range(10) for g in rng.choice(np.arange(10 * k, 10 * k + 10), 2, replace=False))
    assert kept == expected
    assert kept != [source_index(x) for x in c.images]


def test_classes_keep_first_c_with_remainder_to_last(tmp_path, cifar):
    images, labels, _ = build(tmp_path, "--source", cifar, "--classes", 3, "--max_images", 10, name="a.zip")
    assert np.bincount(labels).tolist() == [3, 3, 4]
    assert [source_index(x) for x in images] == [0, 1, 2, 10, 11, 12, 20, 21, 22, 23]
    images, labels, _ = build(tmp_path, "--source", cifar, "--classes", 3, name="b.zip")
    assert [source_index(x) for x in images] == list(range(30))


def test_label_rules(tmp_path, cifar):
    rand = build(tmp_path, "--source", cifar, "--max_images", 30, "--labels", "random", "--num_classes", 4,
                 "--seed", 5, name="r.zip")
    again = build(tmp_path, "--source", cifar, "--max_images", 30, "--labels", "random", "--num_classes", 4,
                  "--seed", 5, name="r2.zip")
    assert rand.labels.tolist() == draw_generator(5, STREAM_LABELS).integers(0, 4, 30).tolist()
    assert (rand.labels == again.labels).all() and set(rand.labels.tolist()) <= {0, 1, 2, 3}
    unique = build(tmp_path, "--source", cifar, "--max_images", 30, "--labels", "unique", name="u.zip")
    assert unique.labels.tolist() == list(range(30)) and (unique.images == rand.images).all()
    none = build(tmp_path, "--source", cifar, "--max_images", 30, "--labels", "none", name="n.zip")
    assert none.labels is None
    with zipfile.ZipFile(tmp_path / "n.zip") as zf:
        assert json.loads(zf.read("dataset.json")) == {"labels": None}
    true = build(tmp_path, "--source", cifar, "--max_images", 30, "--labels", "true", name="t.zip")
    assert true.labels.tolist() == [cifar_label(source_index(x)) for x in true.images]


def test_cifar_pickle_naming_numpy_core_loads(tmp_path):
    # CIFAR's own batches were pickled by numpy 1.x, whose arrays name numpy.core.multiarray._reconstruct.
    raw = pickle.dumps(cifar_batch(10, [cifar_label(i) for i in range(PER_BATCH)]), protocol=2)
    old = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != raw
    path = write_tar(tmp_path / "cifar-10-python.tar.gz", cifar_members(**{BAD_BATCH: old}))
    images, _, _ = build(tmp_path, "--source", path)
    assert [source_index(x) for x in images[:40]] == list(range(PER_BATCH)) + list(range(PER_BATCH))


def test_resolution_is_pil_lanczos(tmp_path, cifar):
    images, _, _ = build(tmp_path, "--source", cifar, "--max_images", 10, "--resolution", 12)
    full, _, _ = build(tmp_path, "--source", cifar, "--max_images", 10, name="full.zip")
    assert images.shape == (10, 3, 12, 12)
    for small, big in zip(images, full):
        direct = np.asarray(Image.fromarray(big.transpose(1, 2, 0), "RGB").resize((12, 12), Image.LANCZOS))
        assert (small.transpose(1, 2, 0) == direct).all()


# ------------------------------------------------------------------------------------------ folder, digits


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[str, np.ndarray], dict[str, int]]:
    root = tmp_path / "imgs"
    arrays = {"b/x.png": pattern(6, 6, 3, 1), "a/y.png": pattern(6, 6, 1, 2), "a/z.png": pattern(6, 6, 3, 3),
              "top.png": pattern(6, 6, 3, 4), "c.bmp": pattern(6, 6, 3, 5)}
    for name, array in arrays.items():
        write_png(root / name, array) if name.endswith(".png") else Image.fromarray(array).save(root / name)
    labels = {"b/x.png": 1, "a/y.png": 0, "a/z.png": 2, "top.png": 1, "c.bmp": 0}
    (root / "dataset.json").write_text(json.dumps({"labels": [[k, v] for k, v in labels.items()]}))
    (root / "notes.txt").write_text("not an image")
    return root, arrays, labels


def test_folder_with_dataset_json(tmp_path, folder):
    root, arrays, labels = folder
    images, out_labels, _ = build(tmp_path, "--source", root)
    order = sorted(arrays)  # a/y.png, a/z.png, b/x.png, c.bmp, top.png
    assert out_labels.tolist() == [labels[n] for n in order]
    assert images.shape == (5, 3, 6, 6)
    for image, name in zip(images, order):
        a = arrays[name]
        expected = np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a  # grayscale repeated to RGB
        assert (image.transpose(1, 2, 0) == expected).all(), name
    gray = build(tmp_path, "--source", root, "--channels", 1, name="gray.zip")
    lum = np.asarray(Image.fromarray(arrays["b/x.png"]).convert("L"))
    assert gray.images.shape == (5, 1, 6, 6) and (gray.images[2, 0] == lum).all()
    assert (gray.images[0, 0] == arrays["a/y.png"]).all()


def test_folder_center_crop_of_non_square_images(tmp_path):
    root = tmp_path / "wide"
    arrays = [write_png(root / "0.png", pattern(10, 16, 3, 1)), write_png(root / "1.png", pattern(12, 9, 3, 2))]
    images, labels, _ = build(tmp_path, "--source", root, "--transform", "center-crop", "--resolution", 8)
    assert labels is None and images.shape == (2, 3, 8, 8)
    for image, a in zip(images, arrays):
        h, w = a.shape[:2]
        crop = Image.fromarray(a).crop(center_crop_box(w, h))
        assert crop.size == (min(w, h),) * 2
        assert (image.transpose(1, 2, 0) == np.asarray(crop.resize((8, 8), Image.LANCZOS))).all()


def test_digits(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels, _ = build(tmp_path, "--source", "digits", "--max_images", 20)
    kept = [i for k in range(10) for i in np.flatnonzero(d.target == k)[:2]]
    order = sorted(kept)
    assert images.shape == (20, 1, 8, 8) and labels.tolist() == d.target[order].tolist()
    assert (images[:, 0] == np.floor(d.images[order] * 255 / 16 + 0.5)).all()
    rgb, _, _ = build(tmp_path, "--source", "digits", "--max_images", 20, "--channels", 3, name="rgb.zip")
    assert rgb.shape == (20, 3, 8, 8) and (rgb == images).all()


def test_round_trip_and_zip_as_source(tmp_path, folder):
    root, _, _ = folder
    built = build_dataset(DatasetRecipe(source=str(root)), progress=False)
    dest = tmp_path / "ours.zip"
    write_dataset_zip(dest, built.images, built.labels, progress=False)
    back = load_dataset_zip(dest, progress=False)
    assert (back.images == built.images).all() and (back.labels == built.labels).all()
    again = build(tmp_path, "--source", dest, name="again.zip")
    assert (again.images == built.images).all() and (again.labels == built.labels).all()
    with zipfile.ZipFile(dest) as a, zipfile.ZipFile(tmp_path / "again.zip") as b:
        assert a.read("dataset.json") == b.read("dataset.json")


def test_reads_a_zip_written_elsewhere(tmp_path):
    # As another tool may write it: labels listed out of order, one grayscale-only set, extra members ignored.
    dest = tmp_path / "theirs.zip"
    arrays = [pattern(4, 4, 1, i) for i in range(3)]
    with zipfile.ZipFile(dest, "w") as zf:
        for i, a in reversed(list(enumerate(arrays))):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="png")
            zf.writestr(archive_name(i), buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [[archive_name(2), 5], [archive_name(0), 3],
                                                           [archive_name(1), 4]]}))
        zf.writestr("README", "extra")
    images, labels, names = load_dataset_zip(dest, progress=False)
    assert names == [archive_name(i) for i in range(3)] and labels.tolist() == [3, 4, 5]
    assert images.shape == (3, 1, 4, 4) and all((images[i, 0] == arrays[i]).all() for i in range(3))


# -------------------------------------------------------------------------------------------------- mixing


@pytest.fixture
def dogs(tmp_path) -> Path:
    root = tmp_path / "dogs"
    for j in range(6):  # red 250, green = j: tells mix images apart from CIFAR ones and from each other
        a = np.zeros((32, 32, 3), dtype=np.uint8)
        a[:, :, 0], a[:, :, 1] = 250, j
        write_png(root / f"dog{j}.png", a)
    return root


def test_mix_replaces_round_alpha_n_seeded(tmp_path, cifar, dogs):
    args = ("--source", cifar, "--max_images", 10, "--mix_source", dogs, "--mix_alpha", 0.35, "--seed", 2)
    mixed = build(tmp_path, *args, name="m.zip")
    again = build(tmp_path, *args, name="m2.zip")
    plain = build(tmp_path, "--source", cifar, "--max_images", 10, name="p.zip")
    assert (mixed.images == again.images).all()
    is_dog = mixed.images[:, 0, 0, 0] == 250
    slots, picks = mix_plan(10, 6, 0.35, seed=2)
    assert np.flatnonzero(is_dog).tolist() == slots.tolist() and len(slots) == 4  # round(3.5) = 4
    assert mixed.images[slots, 1, 0, 0].tolist() == picks.tolist()  # slot j holds dog{picks[j]}
    assert (mixed.images[~is_dog] == plain.images[~is_dog]).all()
    assert (mixed.labels == plain.labels).all()  # a replacement keeps the label of the image it replaces
    other = build(tmp_path, *args[:-1], 9, name="m3.zip")
    assert not (other.images == mixed.images).all()
    none = build(tmp_path, *args[:-4], "--mix_alpha", 0, name="m0.zip")
    assert (none.images == plain.images).all()


# ---------------------------------------------------------------------------------------- dataset, writes


def test_image_dataset(tmp_path, cifar):
    dest = tmp_path / "d.zip"
    assert tool("--source", cifar, "--dest", dest, "--max_images", 10) == 0
    ds = ImageDataset(dest, seed=1)
    raw = load_dataset_zip(dest, progress=False)
    assert len(ds) == 10 and ds.shape == (3, 32, 32) and ds.num_classes == 10
    image, label = ds[3]
    assert image.dtype.is_floating_point and image.min() >= -1 and image.max() <= 1
    assert np.allclose(image.numpy(), raw.images[3] / 127.5 - 1) and int(label) == raw.labels[3]
    batch = collate_image_batch([ds[(0, 0, 3)], ds[(0, 1, 5)]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["index"].tolist() == [3, 5]
    assert batch["label"].tolist() == raw.labels[[3, 5]].tolist() and len(set(batch["sample_seed"].tolist())) == 2
    unlabeled = ImageDataset(DatasetArrays(raw.images, None, raw.names))
    assert int(unlabeled[0][1]) == -1 and unlabeled.num_classes == 0


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    dest = tmp_path / "keep.zip"
    dest.write_bytes(b"old")
    calls = []

    def failing_save(self, *a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise OSError("disk full")
        return real_save(self, *a, **k)

    real_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError):
        write_dataset_zip(dest, np.zeros((5, 1, 4, 4), np.uint8), progress=False)
    assert dest.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["keep.zip"]


# ---------------------------------------------------------------------------------------------- bad input


def _pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


class _Evil:
    def __reduce__(self):
        import os

        return (os.getcwd, ())


BAD_BATCH = "cifar-10-batches-py/data_batch_2"


def _bad_cifar(tmp_path, name: str, **override) -> Path:
    return write_tar(tmp_path / name, cifar_members(**override))


def _unlabeled(tmp_path) -> Path:
    root = tmp_path / "plain"
    write_png(root / "a.png", pattern(4, 4, 3, 0))
    return root


def _bad_folder(tmp_path, kind: str) -> Path:
    root = tmp_path / kind
    write_png(root / "a.png", pattern(8, 8, 3, 0))
    if kind == "unreadable":
        (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif kind == "sizes":
        write_png(root / "b.png", pattern(8, 6, 3, 1))
    elif kind == "badjson":
        (root / "dataset.json").write_text('{"labels": [["a.png", 0],')
    elif kind == "nolabel":
        write_png(root / "b.png", pattern(8, 8, 3, 1))
        (root / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0]]}))
    elif kind == "extralabel":
        (root / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["gone.png", 1]]}))
    return root


def _with_batch_2(raw) -> callable:
    """A maker of a CIFAR tarball whose data_batch_2 is ``raw`` (bytes, or an object pickled with protocol 2)."""
    return lambda t: _bad_cifar(t, "c.tar.gz", **{BAD_BATCH: raw if isinstance(raw, bytes) else _pickled(raw)})


U8 = np.zeros((2, 3072), np.uint8)
CASES = {  # name: (maker of a bad source or None for the good tarball, extra arguments, expected in the line)
    "not a tarball": (lambda t: (t / "cifar-10-python.tar.gz").write_bytes(b"junk" * 50), [],
                      "cifar-10-python.tar.gz: expected a CIFAR-10 python tarball"),
    "no cifar members": (lambda t: write_tar(t / "other.tar.gz", {"readme.txt": b"hi"}), [],
                         "member cifar-10-batches-py/data_batch_1 is missing"),
    "missing key": (_with_batch_2({b"data": U8}), [],
                    f"{BAD_BATCH}: expected keys b'data' and b'labels', missing b'labels'"),
    "wrong shape": (_with_batch_2({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}), [],
                    f"{BAD_BATCH}: expected b'data' a uint8 array of shape N×3072, got uint8 array of shape 2×3000"),
    "wrong dtype": (_with_batch_2({b"data": np.zeros((2, 3072)), b"labels": [0, 1]}), [], "got float64 array"),
    "labels length": (_with_batch_2({b"data": U8, b"labels": [0]}), [], "expected b'labels' a list of 2 integers"),
    "labels range": (_with_batch_2({b"data": U8, b"labels": [0, 10]}), [], "expected b'labels' in 0..9"),
    "corrupt pickle": (_with_batch_2(b"\x80\x02}q\x00garbage"), [],
                       f"{BAD_BATCH}: expected a CIFAR-10 batch pickle, cannot unpickle it"),
    "code in pickle": (_with_batch_2({b"data": _Evil()}), [], "is not part of a CIFAR-10 batch"),
    "class too small": (None, ["--max_images", 200], "class 0 has 10 images, 20 asked"),
    "classes absent": (None, ["--classes", 12], "class 10 has no images"),
    "alpha above 1": (None, ["--mix_source", "digits", "--mix_alpha", 1.5], "--mix_alpha must be in [0, 1]"),
    "alpha below 0": (None, ["--mix_source", "digits", "--mix_alpha", -0.1], "--mix_alpha must be in [0, 1]"),
    "alpha alone": (None, ["--mix_alpha", 0.5], "--mix_source and --mix_alpha go together"),
    "random labels without K": (None, ["--labels", "random"], "--labels random needs --num_classes"),
    "K without random labels": (None, ["--num_classes", 3], "--num_classes applies to --labels random only"),
    "crop without resolution": (None, ["--transform", "center-crop"], "--transform center-crop needs --resolution"),
    "random without N": (None, ["--subset", "random"], "--subset random draws --max_images"),
    "zero images": (None, ["--max_images", 0], "--max_images must be at least 1"),
    "mix pool too small": (None, ["--max_images", 20, "--mix_source", "MIXDIR", "--mix_alpha", 0.5],
                           "onedog: has 1 images, --mix_alpha 0.5 of 20 asks for 10"),
    "missing source": (lambda t: None, ["--source", "NOFILE"], "nothing.tar.gz: no such file or folder"),
    "bad choice": (None, ["--labels", "maybe"], "argument --labels: invalid choice"),
}
FOLDER_CASES = {
    "unreadable image": ("unreadable", [], "b.png: cannot read image"),
    "differing sizes": ("sizes", [], "b.png: image is 6×8 (width×height), expected 8×8 like"),
    "non-square resize": ("sizes", ["--resolution", 4], "b.png: image is 6×8 (width×height), not square"),
    "bad dataset.json": ("badjson", [], "dataset.json: expected JSON"),
    "label missing": ("nolabel", [], "dataset.json: no label for b.png"),
    "label of a file not there": ("extralabel", [], "dataset.json: labels name 'gone.png', which is not among"),
    "true labels, none given": ("plain", ["--labels", "true"], "has no labels (no dataset.json in the folder)"),
    "classes, no labels": ("plain", ["--classes", 2], "--classes needs them"),
    "test split of a folder": ("plain", ["--split", "test"], "--split test applies to a CIFAR-10 tarball only"),
}


def _assert_one_line_error(capsys, rc, expected: str, workdir: Path, before: set[str]) -> str:
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dataset_tool: error: ") and expected in lines[0], lines[0]
    assert {p.name for p in workdir.iterdir()} == before  # no output, no temporary file
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(tmp_path, cifar, capsys, case):
    make, extra, expected = CASES[case]
    source = cifar
    if make is not None:
        make(tmp_path)
        made = sorted(p for p in tmp_path.iterdir() if p.name.endswith(".tar.gz"))
        source = made[0] if made else tmp_path / "nothing.tar.gz"
    one_dog = tmp_path / "onedog"
    write_png(one_dog / "d.png", np.zeros((32, 32, 3), np.uint8))
    extra = [{"MIXDIR": one_dog, "NOFILE": source}.get(a, a) for a in extra]
    before = {p.name for p in tmp_path.iterdir()}
    rc = tool("--source", source, "--dest", tmp_path / "out.zip", *extra)
    line = _assert_one_line_error(capsys, rc, expected, tmp_path, before)
    if make is not None:
        assert str(source) in line  # names the file


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_bad_folder_exits_2_with_one_line(tmp_path, capsys, case):
    kind, extra, expected = FOLDER_CASES[case]
    root = _unlabeled(tmp_path) if kind == "plain" else _bad_folder(tmp_path, kind)
    before = {p.name for p in tmp_path.iterdir()}
    rc = tool("--source", root, "--dest", tmp_path / "out.zip", *extra)
    line = _assert_one_line_error(capsys, rc, expected, tmp_path, before)
    assert str(root) in line


def test_bad_input_names_the_file_through_the_real_entry_point(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"not a tarball at all")
    r = run_cli(SCRIPT, "--source", bad, "--dest", tmp_path / "out.zip")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"dataset_tool: error: {bad}: expected a CIFAR-10")
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-python.tar.gz"]
    r = run_cli(SCRIPT, "--source", "digits", "--dest", tmp_path / "out.txt")
    assert r.returncode == 2 and "--out must name a .zip file" in r.stderr and r.stderr.count("\n") == 1


def test_an_existing_dest_is_replaced_only_with_overwrite(tmp_path, capsys):
    dest = tmp_path / "d.zip"
    assert tool("--source", "digits", "--dest", dest, "--max_images", 10) == 0
    first = dest.read_bytes()
    capsys.readouterr()
    assert tool("--source", "digits", "--dest", dest, "--max_images", 20) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; pass --overwrite" in err[0] and dest.read_bytes() == first
    assert tool("--source", "digits", "--dest", dest, "--max_images", 20, "--overwrite") == 0
    assert len(load_dataset_zip(dest, progress=False).images) == 20


def test_a_temporary_left_by_a_killed_write_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    from diffmem.common.edm.dataset.edm_zip import _temporary_beside

    # A write killed mid-way (SIGKILL: no cleanup) leaves its temporary, named after its dead process.
    code = ("import os, sys; from pathlib import Path;"
            "from diffmem.common.edm.dataset.edm_zip import _temporary_beside;"
            "p = _temporary_beside(Path(sys.argv[1])); p.write_bytes(b'PK partial'); print(p)")
    left = Path(subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.zip")],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert left.exists()
    mine = _temporary_beside(tmp_path / "c.zip")  # a write of this (live) process: left alone
    mine.write_bytes(b"PK in progress")
    assert tool("--source", "digits", "--dest", tmp_path / "b.zip", "--max_images", 10) == 0
    assert not left.exists() and mine.exists()
