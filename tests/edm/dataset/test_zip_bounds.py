"""Zip members are bounded before they are read: a deflate bomb in a dataset zip (a 1 MB zip whose dataset.json
inflates to 1 GiB drove dataset_tool to 2.1 GB and mem_ratio to 2.75 GB, both exit 0) is refused on one line that
names the zip and the member, and a member is read no further than the size its zip entry declares."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script
from PIL import Image

from diffmem.common.edm.dataset import edm_zip as D
from diffmem.common.edm.dataset.sources import open_source
from diffmem.common.edm.images import ImagesError, open_images

DATASET_TOOL = load_script("data/dataset_tool.py", "dataset_tool_cli_bounds")
# Inflates ~1000:1 under deflate, like every deflate bomb; 8 MiB is past RATIO_FLOOR_BYTES and quick to build.
SPACES = b" " * (8 << 20)


def png(value: int, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, np.uint8), "RGB").save(buf, format="png")
    return buf.getvalue()


def bomb_zip(path: Path, labels: bytes = SPACES, images: int = 2) -> Path:
    """An EDM dataset zip of ``images`` small PNGs whose dataset.json is ``labels``, deflated."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(images):
            zf.writestr(D.archive_name(i), png(10 * i))
        zf.writestr(D.LABELS_FILE, labels)
    return path


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_dataset_tool_refuses_a_deflate_bomb(tmp_path, capsys):
    bomb = bomb_zip(tmp_path / "bomb.zip")
    assert bomb.stat().st_size < 100_000
    assert DATASET_TOOL.main(["--source", str(bomb), "--dest", str(tmp_path / "out.zip")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"dataset_tool: error: {bomb}:{D.LABELS_FILE}: compressed ")
    assert f"past the {D.MAX_COMPRESSION_RATIO}:1" in line
    assert not (tmp_path / "out.zip").exists()


def test_mem_ratio_refuses_a_deflate_bomb_as_its_training_set(tmp_path, capsys):
    from diffmem.detect import mem_ratio

    folder = tmp_path / "gen"
    folder.mkdir()
    for seed in range(2):
        (folder / f"{seed:06d}.png").write_bytes(png(seed))
    bomb = bomb_zip(tmp_path / "bomb.zip")
    rc = mem_ratio.main(["--images", str(folder), "--knn_ref", str(bomb), "--outdir", str(tmp_path / "out"),
                         "--device", "cpu"])
    assert rc == 2
    assert f"mem_ratio: error: {bomb}:{D.LABELS_FILE}: compressed " in one_line(capsys.readouterr().err)


def test_a_bomb_image_member_is_refused_before_any_is_read(tmp_path):
    path = tmp_path / "img-bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(D.archive_name(0), png(0))
        zf.writestr(D.archive_name(1), SPACES)  # named as an image, a bomb inside
    with pytest.raises(D.DatasetError, match=rf"{D.archive_name(1)}: compressed \d+:1"):
        open_source(path)
    with pytest.raises(ImagesError, match=rf"{path}:{D.archive_name(1)}: compressed"):
        open_images(path)


def test_declared_size_past_the_member_bound_is_refused(tmp_path, monkeypatch):
    # Stored, so no ratio to speak of: the size bound alone refuses it (made small here to keep the test quick).
    monkeypatch.setattr(D, "MAX_JSON_MEMBER_BYTES", 4096)
    labels = json.dumps({"labels": None}).encode() + b" " * 5000
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(D.archive_name(0), png(0))
        zf.writestr(D.LABELS_FILE, labels)
    with pytest.raises(D.DatasetError, match=rf"{path}:{D.LABELS_FILE}: the zip declares it inflates to .* more "
                                             r"than the 4096 bytes"):
        D.load_dataset_zip(path, progress=False)


def test_an_npz_bomb_is_refused(tmp_path):
    path = tmp_path / "images.npz"
    np.savez_compressed(path, images=np.zeros((128, 128, 128, 3), np.uint8))  # 6 MiB of zeros, ~1000:1
    with pytest.raises(ImagesError, match=r"images.npz:images.npy: compressed \d+:1"):
        open_images(path)


class Endless(io.RawIOBase):
    """A member stream that gives more than its entry declared."""

    def readable(self):
        return True

    def readinto(self, b):
        b[:] = b"x" * len(b)
        return len(b)


def test_a_member_is_read_no_further_than_declared():
    with pytest.raises(D.DatasetError, match="inflates past the 16 bytes its zip entry declares"):
        D.read_bounded(io.BufferedReader(Endless()), 16, "z.zip:dataset.json")
    with pytest.raises(D.DatasetError, match="holds 3 bytes, not the 16"):
        D.read_bounded(io.BytesIO(b"abc"), 16, "z.zip:dataset.json")
    assert D.read_bounded(io.BytesIO(b"abc"), 3, "z.zip:dataset.json") == b"abc"


def test_a_lying_declared_size_does_not_inflate_past_it(tmp_path):
    # The central directory says 16 bytes for an 8 MiB member: zipfile stops at 16 and the CRC then fails.
    path = bomb_zip(tmp_path / "liar.zip")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(D.LABELS_FILE)
    # its central-directory entry: signature PK\1\2, the name at byte 46, the uncompressed size at byte 24
    offset = next(i for i in range(len(data)) if data[i:i + 4] == b"PK\x01\x02"
                  and data[i + 46:i + 46 + len(D.LABELS_FILE)] == D.LABELS_FILE.encode())
    data[offset + 24:offset + 28] = (16).to_bytes(4, "little")  # uncompressed size
    path.write_bytes(bytes(data))
    assert info.file_size == len(SPACES)
    with zipfile.ZipFile(path) as zf:
        with pytest.raises(D.DatasetError, match=rf"liar.zip:{D.LABELS_FILE}: cannot read the zip member "
                                                 r"\(BadZipFile: Bad CRC-32"):
            D.read_zip_member(zf, D.LABELS_FILE, f"{path}:{D.LABELS_FILE}")


def test_genuine_zips_pass(tmp_path):
    # Our own zip (stored members) and the same re-zipped with deflate at its best, as a user's zip -9 would.
    images = np.stack([np.full((3, 32, 32), v, np.uint8) for v in range(0, 250, 10)])
    images[:, :, ::2] = 7  # some structure, yet far more compressible than a photo
    ours = tmp_path / "ours.zip"
    D.write_dataset_zip(ours, images, np.arange(len(images)) % 10, progress=False)
    rezipped = tmp_path / "rezipped.zip"
    with zipfile.ZipFile(ours) as src, zipfile.ZipFile(rezipped, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    for path in (ours, rezipped):
        back = D.load_dataset_zip(path, progress=False)
        assert (back.images == images).all() and back.labels.tolist() == (np.arange(len(images)) % 10).tolist()
    # A float zip, and an npz as numpy's savez writes it.
    floats = np.random.default_rng(0).standard_normal((4, 1, 4, 4)).astype(np.float32)
    D.write_float_dataset_zip(tmp_path / "f.zip", floats)
    assert (D.load_dataset_zip(tmp_path / "f.zip", progress=False).images == floats).all()
    np.savez(tmp_path / "g.npz", images=images.transpose(0, 2, 3, 1))
    assert len(open_images(tmp_path / "g.npz").names) == len(images)
