"""One reader of generated images and datasets (common.edm.images) behind mem_ratio's --images and similarity's
features: the same fields, seed rule and checks for a folder, an EDM zip and an images.npz."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffmem.common.edm.dataset.edm_zip import write_dataset_zip
from diffmem.common.edm.images import ImagesError, open_images, seed_from_name
from diffmem.common.edm.measure import mem_ratio as memratio
from diffmem.common.edm.measure import reproducibility as scores


def images(n=3, h=4, w=4):
    return (np.arange(n * h * w, dtype=np.uint8).reshape(n, h, w, 1) * 5)


def test_folder_zip_and_npz_read_alike(tmp_path):
    x = images()
    folder = tmp_path / "pngs"
    (folder / "000000").mkdir(parents=True)
    for s, im in zip((7, 3, 11), x):
        Image.fromarray(im[..., 0]).save(folder / "000000" / f"{s:06d}.png")
    npz = tmp_path / "images.npz"
    order = np.argsort([7, 3, 11])  # the folder reads in path order: seeds 3, 7, 11
    np.savez(npz, images=x[order], seeds=np.array([3, 7, 11]))
    zip_path = tmp_path / "d.zip"
    write_dataset_zip(zip_path, x.transpose(0, 3, 1, 2), progress=False)
    a, b, z = open_images(folder), open_images(npz), open_images(zip_path)
    assert a.seeds.tolist() == b.seeds.tolist() == [3, 7, 11] and a.has_seeds and b.has_seeds
    assert all(np.array_equal(a.load(i), b.load(i)) for i in range(3))
    assert z.seeds.tolist() == [-1, -1, -1] and not z.has_seeds  # EDM zip members are img00000000.png: no seeds
    assert all(np.array_equal(z.load(i), x[i]) for i in range(3))
    z.close()
    # Both callers see those seeds: mem_ratio keys its rows by them, similarity writes them with the features.
    assert memratio.load_measured_images(folder).seeds == memratio.load_measured_images(npz).seeds == [3, 7, 11]
    assert memratio.load_measured_images(zip_path).seeds == [0, 1, 2]  # no seeds: positions
    assert scores.open_images is open_images and scores.seed_from_name is seed_from_name


def test_seed_rule():
    assert seed_from_name("001000/001234.PNG") == 1234
    assert seed_from_name("img00000000.png") == -1 and seed_from_name("000001.jpg") == -1


@pytest.mark.parametrize("arrays, needle", [
    (dict(pictures=images()), "no 'images' array"),
    (dict(features=np.zeros((3, 4), np.float32)), "it is a features file"),
    (dict(images=images().astype(np.float32)), "expected 'images' uint8 N×H×W×C"),
    (dict(images=images(), seeds=np.array([1, 1, 2])), "one distinct integer >= 0 per image"),
    (dict(images=images(), seeds=np.array([0, 1])), "one distinct integer >= 0 per image"),
])
def test_bad_npz_is_one_line(tmp_path, arrays, needle):
    path = tmp_path / "x.npz"
    np.savez(path, **arrays)
    with pytest.raises(ImagesError, match=needle):
        open_images(path)
    with pytest.raises(memratio.MemRatioError, match=needle):
        memratio.load_measured_images(path)


def test_missing_path_and_other_files(tmp_path):
    with pytest.raises(ImagesError, match="no such file or folder"):
        open_images(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImagesError, match="got a file that is none of these"):
        open_images(tmp_path / "notes.txt")
