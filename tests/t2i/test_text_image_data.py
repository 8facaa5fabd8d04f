"""Training data: both folder layouts, Wen et al.'s mixture counts, unreadable images, seeded transforms."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.common.t2i.text_image_data import (
    CaptionConfig,
    ImageDataError,
    ImageTransformConfig,
    TextImageCollator,
    TextImageDataset,
    build_mixture,
    choose_caption,
    read_image_folder,
    transform_image,
)


def write_flat(folder, n, prefix="img", size=(16, 16), start=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"{prefix}{i:03d}.jpg")
        (folder / f"{prefix}{i:03d}.txt").write_text(f"caption {prefix} {i}\n")
    return folder


def corrupt(path):
    # A JPEG header followed by garbage: opens, but cannot be decoded.
    data = path.read_bytes()
    path.write_bytes(data[:40] + b"\x00" * 20)


# ------------------------------------------------------------------------------------------ readers


def test_flat_folder_in_file_name_order_with_stripped_captions(tmp_path):
    folder = write_flat(tmp_path / "mem", 3)
    (folder / "notes.md").write_text("ignored")
    recs = read_image_folder(folder, memorized=True)
    assert [r.path.split("/")[-1] for r in recs] == ["img000.jpg", "img001.jpg", "img002.jpg"]
    assert [r.caption for r in recs] == ["caption img 0", "caption img 1", "caption img 2"]
    assert all(r.memorized for r in recs)


def test_flat_folder_without_caption_file_names_the_image(tmp_path):
    folder = write_flat(tmp_path / "mem", 2)
    (folder / "img001.txt").unlink()
    with pytest.raises(ImageDataError, match=r"img001\.jpg: expected its caption in img001\.txt"):
        read_image_folder(folder)


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageDataError, match="no images found"):
        read_image_folder(tmp_path / "empty")
    with pytest.raises(ImageDataError, match="no such data folder"):
        read_image_folder(tmp_path / "nope")


def test_imagefolder_metadata_jsonl_in_line_order_with_caption_lists(tmp_path):
    folder = write_flat(tmp_path / "ds", 3)
    rows = [{"file_name": "img002.jpg", "text": "two"}, {"file_name": "img000.jpg", "text": ["zero", "nil"]}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = read_image_folder(folder)
    assert [r.path.split("/")[-1] for r in recs] == ["img002.jpg", "img000.jpg"]
    assert recs[0].caption == "two" and recs[1].caption == ("zero", "nil")


@pytest.mark.parametrize("line, message", [
    ("not json", r"metadata\.jsonl:2: expected a JSON object, got invalid JSON"),
    (json.dumps({"text": "x"}), r"metadata\.jsonl:2: expected a \"file_name\" string"),
    (json.dumps({"file_name": "img000.jpg", "text": 3}), r"metadata\.jsonl:2: expected a caption string"),
    (json.dumps({"file_name": "missing.jpg", "text": "x"}), r"metadata\.jsonl:2: image file 'missing\.jpg' not found"),
])
def test_metadata_errors_name_file_and_line(tmp_path, line, message):
    folder = write_flat(tmp_path / "ds", 1)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "img000.jpg", "text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(ImageDataError, match=message):
        read_image_folder(folder)


def test_latin1_caption_txt_and_metadata_are_one_line_errors(tmp_path):
    flat = write_flat(tmp_path / "flat", 2)
    (flat / "img001.txt").write_bytes("un café".encode("latin-1"))
    with pytest.raises(ImageDataError, match=r"img001\.txt:1: not UTF-8 text \(byte 0xe9 at column 7\); re-save"):
        read_image_folder(flat)
    folder = write_flat(tmp_path / "ds", 1)
    (folder / "metadata.jsonl").write_bytes('{"file_name": "img000.jpg", "text": "café"}\n'.encode("latin-1"))
    with pytest.raises(ImageDataError, match=r"metadata\.jsonl:1: not UTF-8 text \(byte 0xe9 at column 41\)"):
        read_image_folder(folder)


def test_utf8_bom_caption_txt_and_metadata_are_read(tmp_path):
    flat = write_flat(tmp_path / "flat", 1)
    (flat / "img000.txt").write_text("un café\n", encoding="utf-8-sig")
    assert read_image_folder(flat)[0].caption == "un café"
    folder = write_flat(tmp_path / "ds", 1)
    (folder / "metadata.jsonl").write_text('{"file_name": "img000.jpg", "text": "café"}\n', encoding="utf-8-sig")
    assert read_image_folder(folder)[0].caption == "café"


# ------------------------------------------------------------------------------------------ mixture


def reference_mixture(mem, non_mem, end, repeats, ratio):
    """Wen et al.'s get_dataset_finetune, as a loop over lists (their reference code's logic)."""
    data = list(mem[:end]) * repeats
    mem_len = len(data)
    if non_mem is not None:
        for item in non_mem:
            if len(data) >= mem_len * (1 + ratio):
                break
            data.append(item)
        data = data[: int(mem_len * (1 + ratio))]
    return data


@pytest.mark.parametrize("n_mem, n_pool, end, repeats, ratio", [
    (5, 40, 3, 4, 0.5),
    (5, 40, None, 2, 1.0),
    (4, 100, 4, 10, 2.0),
    (6, 10, 2, 1, 0.0),
    (3, 50, 3, 3, 0.3),  # 9 · 1.3 = 11.7: floor, as the reference
])
def test_mixture_matches_wen_et_al_counts_and_order(tmp_path, n_mem, n_pool, end, repeats, ratio):
    mem = read_image_folder(write_flat(tmp_path / "mem", n_mem, "m"), memorized=True)
    pool = read_image_folder(write_flat(tmp_path / "pool", n_pool, "p", start=100))
    records, report = build_mixture(mem, pool, end=end, repeats=repeats, non_mem_ratio=ratio)
    expected = reference_mixture(mem, pool, end, repeats, ratio)
    assert [r.path for r in records] == [r.path for r in expected]
    used = len(mem[:end])
    assert report.mem_used == used and report.mem_samples == used * repeats
    assert report.non_mem_used == len(expected) - used * repeats == report.non_mem_requested
    assert report.total == len(records)
    assert sum(r.memorized for r in records) == used * repeats
    assert report.warnings == []


def test_small_non_memorized_pool_warns_and_reports(tmp_path):
    mem = read_image_folder(write_flat(tmp_path / "mem", 2, "m"), memorized=True)
    pool = read_image_folder(write_flat(tmp_path / "pool", 3, "p", start=100))
    expected = "non-memorized pool has 3 readable images but --non_mem_ratio 1.0 asks for 10"
    with pytest.warns(UserWarning, match=expected):
        records, report = build_mixture(mem, pool, repeats=5, non_mem_ratio=1.0)
    assert len(records) == 13 and report.non_mem_requested == 10 and report.non_mem_used == 3
    assert report.warnings and "asks for 10" in report.warnings[0]


def test_corrupt_image_stops_with_a_clear_error_by_default(tmp_path):
    folder = write_flat(tmp_path / "mem", 3, "m")
    corrupt(folder / "m001.jpg")
    mem = read_image_folder(folder, memorized=True)
    with pytest.raises(ImageDataError, match=r"m001\.jpg: cannot read image \(.*\); pass --skip_corrupt_images"):
        build_mixture(mem)


def test_corrupt_images_skipped_are_reported_and_pool_refilled(tmp_path):
    mem_dir = write_flat(tmp_path / "mem", 4, "m")
    pool_dir = write_flat(tmp_path / "pool", 10, "p", start=100)
    corrupt(mem_dir / "m002.jpg")
    corrupt(pool_dir / "p101.jpg")
    (pool_dir / "p103.jpg").write_bytes(b"not an image at all")
    mem = read_image_folder(mem_dir, memorized=True)
    pool = read_image_folder(pool_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records, report = build_mixture(mem, pool, end=4, repeats=2, non_mem_ratio=0.5, on_corrupt="skip")
    assert any("skipped 3 unreadable image(s)" in str(w.message) for w in caught)
    # 3 readable memorized images x 2 repeats = 6 samples; 3 non-memorized, taken past the two bad ones.
    assert report.mem_used == 3 and report.mem_samples == 6
    assert report.non_mem_requested == 3 and report.non_mem_used == 3
    assert [r.path.split("/")[-1] for r in records[6:]] == ["p100.jpg", "p102.jpg", "p104.jpg"]
    assert sorted(s["image"].split("/")[-1] for s in report.skipped_images) == ["m002.jpg", "p101.jpg", "p103.jpg"]
    assert report.total == len(records) == 9


# ---------------------------------------------------------------------------------- transforms/dataset


def test_transform_is_a_function_of_the_generator_and_center_crop_ignores_it():
    img = Image.fromarray(np.arange(24 * 16 * 3, dtype=np.uint8).reshape(16, 24, 3) % 251)
    cfg = ImageTransformConfig(resolution=8, center_crop=False, random_flip=True)
    a = transform_image(img, cfg, np.random.default_rng(0))
    b = transform_image(img, cfg, np.random.default_rng(0))
    assert a.shape == (3, 8, 8) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    outs = {transform_image(img, cfg, np.random.default_rng(s)).sum().item() for s in range(12)}
    assert len(outs) > 1
    center = ImageTransformConfig(resolution=8, center_crop=True, random_flip=False)
    c = [transform_image(img, center, np.random.default_rng(s)) for s in range(3)]
    assert torch.equal(c[0], c[1]) and torch.equal(c[1], c[2])


@pytest.mark.parametrize("h, w, r", [(20, 18, 16), (37, 53, 16), (100, 31, 24), (16, 16, 16)])
def test_center_crop_transform_equals_the_diffusers_example_torchvision_pipeline(h, w, r):
    T = pytest.importorskip("torchvision.transforms")
    img = Image.fromarray(np.random.default_rng(h * w).integers(0, 255, (h, w, 3), dtype=np.uint8))
    example = T.Compose([T.Resize(r, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(r), T.ToTensor(),
                         T.Normalize([0.5], [0.5])])(img)
    ours = transform_image(img, ImageTransformConfig(r, center_crop=True), np.random.default_rng(0))
    torch.testing.assert_close(ours, example, rtol=0, atol=1e-6)


def test_transform_crop_offsets_by_hand():
    # 8x4 image resized to short side 4 stays 8x4; a 4x4 crop at left offset L shows columns L..L+3.
    arr = np.zeros((4, 8, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(8)[None, :] * 30
    img = Image.fromarray(arr)
    cfg = ImageTransformConfig(resolution=4, center_crop=False, random_flip=False)
    for seed in range(5):
        g = np.random.default_rng(seed)
        top, left = int(g.integers(0, 1)), int(g.integers(0, 5))
        out = transform_image(img, cfg, np.random.default_rng(seed))
        expected = (np.arange(left, left + 4) * 30 / 255.0 - 0.5) / 0.5
        assert top == 0
        np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-6)


def test_caption_dropout_rate_and_list_choice():
    cfg = CaptionConfig(caption_dropout=0.3)
    dropped = sum(choose_caption("x", cfg, np.random.default_rng(s)) == "" for s in range(1000))
    assert 240 <= dropped <= 360
    picks = {choose_caption(("a", "b", "c"), CaptionConfig(), np.random.default_rng(s)) for s in range(50)}
    assert picks == {"a", "b", "c"}


def test_dataset_items_depend_on_position_not_on_batching(tmp_path):
    from diffmem.common.t2i.tokenizer import build_clip_tokenizer

    recs = read_image_folder(write_flat(tmp_path / "mem", 3, size=(20, 16)))
    ds = TextImageDataset(recs, ImageTransformConfig(8, random_flip=True), CaptionConfig("rand_numb_add", 2),
                          seed=5)
    a = ds[(0, 4, 1)]
    b = ds[(0, 4, 1)]
    c = ds[(0, 5, 1)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    assert a["sample_seed"] == b["sample_seed"] != c["sample_seed"]
    assert a["caption"] != c["caption"]
    collate = TextImageCollator(build_clip_tokenizer(tmp_path / "tok"))
    batch = collate([ds[(0, 0, 0)], a])
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["input_ids"].shape == (2, 77)
    assert batch["index"].tolist() == [0, 1]
    assert torch.equal(batch["pixel_values"][1], a["pixel_values"])


def test_dataset_reads_rows_of_a_hf_dataset(tmp_path):
    import datasets

    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    hf = datasets.Dataset.from_dict({"image": [img, img], "text": ["one", "two"]})
    hf = hf.cast_column("image", datasets.Image())
    from diffmem.common.t2i.text_image_data import hf_dataset_records

    recs = hf_dataset_records(hf, "image", "text", "local")
    assert [r.key for r in recs] == ["local[0]", "local[1]"]
    ds = TextImageDataset(recs, ImageTransformConfig(8), CaptionConfig(), seed=0, hf_dataset=hf)
    item = ds[(0, 0, 1)]
    assert item["caption"] == "two"
    assert torch.allclose(item["pixel_values"], torch.full((3, 8, 8), 200 / 255 * 2 - 1), atol=1e-6)
    with pytest.raises(ImageDataError, match="--caption_column 'caption' is not a column"):
        hf_dataset_records(hf, "image", "caption", "local")

