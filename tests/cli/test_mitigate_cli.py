"""mitigate/inference_mem.py and mitigate/tradeoff.py end to end on the tiny pipeline (offline; each CLI's first run
as a subprocess, the others in process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli as _run_cli
from conftest import run_in_process as _run_in_process
from PIL import Image
from sscd_standins import HAS_ONNX_DEFAULT, TinyDescriptor

from diffmem.common.plotting import GRID_EMPTY, GRID_GAP

PROMPTS = ["The No Limits Business Woman Podcast", "Mothers influence on her young hippo", "a photo of a cat"]
GEN = ["--num_images_per_prompt", "1", "--num_inference_steps", "3", "--gen_seed", "5"]


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_cli(script, *args):
    # One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core machine a second
    # spinning OpenMP thread can make each run several times slower.
    return _run_cli(script, *args, env=ONE_THREAD)


def run_in_process(script, *args):
    return _run_in_process(script, *args, env=ONE_THREAD)


@pytest.fixture(scope="module")
def sscd_spec(tmp_path_factory):
    """The ONNX default when installed, else a tiny random TorchScript descriptor."""
    if HAS_ONNX_DEFAULT:
        return "default"
    path = tmp_path_factory.mktemp("sscd") / "tiny.torchscript.pt"
    torch.jit.script(TinyDescriptor()).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def lab_dataset(tmp_path_factory, tiny_parts, tiny_pipe):
    """prompts.jsonl + gt_images/: row 0's ground truth is its own unmitigated generation, row 1's folder is
    empty and row 2 has none."""
    from diffmem.common.t2i.detection import encode_prompts
    from diffmem.common.t2i.sampler import decode_latents, sample_latents, to_pil
    from diffmem.common.t2i.text_noise import initial_latents

    d = tmp_path_factory.mktemp("lab")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"caption": p, "index": i}) + "\n"
                                             for i, p in enumerate(PROMPTS)))
    lat = initial_latents([0], 1, tiny_parts.latent_shape, 5,
                          init_noise_sigma=float(tiny_parts.scheduler.init_noise_sigma))
    emb, unc = encode_prompts(tiny_parts, PROMPTS[:1]).embeds.embeds, encode_prompts(tiny_parts, [""]).embeds.embeds
    img = to_pil(decode_latents(tiny_pipe.vae, sample_latents(tiny_parts, emb, unc, lat, num_inference_steps=3,
                                                              guidance_scale=7.5))[0])[0]
    (d / "gt_images" / "0").mkdir(parents=True)
    img.save(d / "gt_images" / "0" / "train.png")
    (d / "gt_images" / "1").mkdir()
    return d


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def side_by_side_tiles(path, n_rows: int, n_cols: int, tile: int = 256):
    """The picture's tiles (rows × columns of uint8 arrays), found from its bottom-right corner: labels only widen
    the picture on the left and the top."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    height, width = pixels.shape[:2]
    assert width >= n_cols * tile and height >= n_rows * tile
    step = tile + GRID_GAP

    def at(r, c):
        x, y = width - (n_cols - c) * step, height - (n_rows - r) * step  # a gap after each tile
        return pixels[y:y + tile, x:x + tile]

    return [[at(r, c) for c in range(n_cols)] for r in range(n_rows)]


def enlarged(path, k: int = 16):
    """A saved 16-px image as a 256-px tile: every pixel a k×k block (nearest neighbour)."""
    a = np.asarray(Image.open(path).convert("RGB"))
    return np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def test_inference_mem_end_to_end(tmp_path, tiny_pipeline_dir, lab_dataset, sscd_spec):
    common = ["--model_id", tiny_pipeline_dir, "--dataset", lab_dataset / "prompts.jsonl", *GEN,
              "--sscd_model", sscd_spec]
    clip = ["--reference_model", "ViT-S-32", "--reference_model_pretrain", "none"]

    res = run_cli("mitigate/inference_mem.py", *common, "--out", tmp_path / "none", "--method", "none", *clip)
    assert res.returncode == 0, res.stderr
    rows = _rows(tmp_path / "none" / "results.jsonl")
    assert [r["row"] for r in rows] == [0, 1, 2]
    # same latent rule as the library: row 0 reproduces its ground truth exactly
    assert rows[0]["gt_status"] == "ok" and rows[0]["sscd_max"] == pytest.approx(1.0, abs=1e-4)
    assert rows[0]["sscd_rate_gt_0.5"] == 1.0
    assert rows[1]["gt_status"] == "empty" and rows[2]["gt_status"] == "missing"
    assert "sscd" not in rows[1] and "clip_score" in rows[1]
    summary = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert summary["clip"]["calibrated"] is False and "UNCALIBRATED" in summary["clip"]["note"]
    assert summary["counts"]["without_ground_truth"] == 2
    assert [p["status"] for p in summary["prompts_without_ground_truth"]] == ["empty", "missing"]
    assert summary["sscd"]["rate_gt_0.5"] == 1.0  # one scored generation, a replica
    assert "UNCALIBRATED" in res.stdout
    # The side-by-side picture: a ground-truth row (only row 0 has an image), then the method's first generations,
    # each 16-px image a 256-px tile of 16×16 blocks.
    picture = tmp_path / "none" / "side_by_side.png"
    assert f"{picture}: the first generations side by side" in res.stdout
    (gt0, gt1, gt2), generated = side_by_side_tiles(picture, 2, 3)
    assert np.array_equal(gt0, enlarged(lab_dataset / "gt_images" / "0" / "train.png"))
    assert (gt1 == GRID_EMPTY).all() and (gt2 == GRID_EMPTY).all()
    for tile, row in zip(generated, rows):
        assert np.array_equal(tile, enlarged(tmp_path / "none" / row["image"]))

    ours = [*common, "--out", tmp_path / "ours", "--method", "ours", "--optim_target_loss", "0.05",
            "--optim_iters", "3", "--optim_lr", "0.1", "--batch_size", "2"]
    res = run_in_process("mitigate/inference_mem.py", *ours, "--skip_clip", "--with_tracking")
    assert res.returncode == 0, res.stderr
    rows = _rows(tmp_path / "ours" / "results.jsonl")
    for r in rows:
        assert r["method"] == "ours" and r["iterations"] == 3 and r["reached_target"] is False
        assert r["loss_final"] < r["loss_initial"]
        assert (tmp_path / "ours" / r["image"]).is_file()
    assert rows[0]["sscd_max"] < 1.0 - 1e-3  # the optimised embedding changed the replica
    assert list((tmp_path / "ours" / "tb").glob("events.out.tfevents.*"))

    # the same command resumes: nothing is recomputed, nothing duplicated
    (tmp_path / "ours" / "side_by_side.png").unlink()
    res = run_in_process("mitigate/inference_mem.py", *ours, "--skip_clip")
    assert res.returncode == 0, res.stderr
    assert "0 now, 3 resumed" in res.stdout
    assert _rows(tmp_path / "ours" / "results.jsonl") == rows
    # the picture is rebuilt from the images on disk: every prompt, though none was generated by this call
    for tile, row in zip(side_by_side_tiles(tmp_path / "ours" / "side_by_side.png", 2, 3)[1], rows):
        assert np.array_equal(tile, enlarged(tmp_path / "ours" / row["image"]))


def test_resume_refuses_other_settings_and_cuts_torn_line(tmp_path):
    from diffmem.common.errors import ConfigError
    from diffmem.common.t2i.mitigation.run import MitigationFiles, MitigationSettings

    files = MitigationFiles(tmp_path / "run")
    settings = MitigationSettings(method="ours", optim_iters=3)
    assert files.prepare(settings.fingerprint()) == []
    files.results.write_text('{"row": 0}\n{"row": 1, "trunc')  # killed mid-write
    assert files.prepare(settings.fingerprint()) == [{"row": 0}]
    assert files.results.read_text() == '{"row": 0}\n'
    with pytest.raises(ConfigError, match="optim_iters=3 \\(now 4\\)"):
        files.prepare(MitigationSettings(method="ours", optim_iters=4).fingerprint())
    # settings a method does not use cannot block its resume; --overwrite starts afresh
    assert "optim_iters" not in MitigationSettings(method="none").fingerprint()
    assert files.prepare(MitigationSettings(method="ours", optim_iters=4).fingerprint(), overwrite=True) == []


@pytest.mark.parametrize("extra, expected", [
    (["--dataset", "/nonexistent/prompts.jsonl"], "no such file"),
    (["--optim_target_steps", "7"], "--optim_target_steps must lie in 0..2"),
    (["--reference_model_pretrain", "laion_nope"], "unknown pretrained tag 'laion_nope'"),
    (["--gt_dir", "/nonexistent/gt"], "--gt_dir is not a folder"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, lab_dataset, extra, expected):
    # --model_id: an existing folder, though no pipeline (a model reference that does not exist is refused first).
    args = ["--model_id", tmp_path, "--dataset", lab_dataset / "prompts.jsonl", "--run_name", "x",
            "--num_inference_steps", "3", "--sscd_model", "none", "--out", tmp_path / "x", *extra]
    res = run_in_process("mitigate/inference_mem.py", *args)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], res.stderr
    assert not (tmp_path / "x").exists()  # rejected before anything was loaded or written


def test_cp1252_csv_is_one_line_exit_2(tmp_path):
    csv = tmp_path / "webster.csv"
    csv.write_bytes(";Caption;URL\n0;fine;u\n1;“smart quotes”;u\n".encode("cp1252"))
    res = run_in_process("mitigate/inference_mem.py", "--model_id", tmp_path, "--dataset", csv,
                  "--run_name", "x", "--sscd_model", "none", "--out", tmp_path / "x")
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"inference_mem: error: {csv}:3: not UTF-8 text (byte 0x93 at column 3); "
                     f"re-save the file as UTF-8"]
    assert not (tmp_path / "x").exists()


def test_tradeoff_end_to_end(tmp_path, tiny_pipeline_dir, lab_dataset, sscd_spec):
    res = run_cli("mitigate/tradeoff.py", "--model_id", tiny_pipeline_dir, "--dataset", lab_dataset / "prompts.jsonl",
                  "--run_name", "sweep", "--out", tmp_path / "sweep", *GEN, "--end", "1", "--target_losses", "0.3",
                  "--repeat_nums", "1", "--baselines", "rand_word_repeat", "--optim_iters", "2",
                  "--sscd_model", sscd_spec, "--reference_model", "ViT-S-32", "--reference_model_pretrain", "none")
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "sweep" / "tradeoff.json").read_text())
    assert [p["label"] for p in out["points"]] == ["none", "ours_target0.3", "rand_word_repeat_repeat1"]
    assert out["points"][0]["sscd_mean"] == pytest.approx(1.0, abs=1e-4)
    assert all(p["clip_score_mean"] is not None for p in out["points"])
    assert (tmp_path / "sweep" / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sweep" / "ours_target0.3" / "results.jsonl").is_file()
    # side by side: the ground truth, then one row per run, for the one prompt
    picture = tmp_path / "sweep" / "side_by_side.png"
    assert str(picture) in res.stdout
    tiles = side_by_side_tiles(picture, 4, 1)
    assert np.array_equal(tiles[0][0], enlarged(lab_dataset / "gt_images" / "0" / "train.png"))
    for (tile,), point in zip(tiles[1:], out["points"]):
        assert np.array_equal(tile, enlarged(tmp_path / "sweep" / point["label"] / "images" / "00000.png"))


@pytest.fixture()
def out_of_memory_above_one_image(monkeypatch):
    """Every first batch with more than one generation per prompt runs out of memory, as on a small GPU."""
    import diffmem.common.t2i.mitigation.run as mitigation_run

    real_condition_batch = mitigation_run.condition_batch

    def condition_batch(parts, uncond_embed, prompts, rows, settings):
        if settings.num_images_per_prompt > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_condition_batch(parts, uncond_embed, prompts, rows, settings)

    monkeypatch.setattr(mitigation_run, "condition_batch", condition_batch)


# A run that failed before its first result (here: out of memory, answered by fewer generations) recorded
# settings that describe nothing; they must not refuse the corrected retry, while a run with results still does.

def test_inference_mem_failed_first_batch_does_not_bind_the_retry(tmp_path, tiny_pipeline_dir, lab_dataset,
                                                                 out_of_memory_above_one_image):
    from diffmem.mitigate.inference_mem import main

    args = ["--model_id", str(tiny_pipeline_dir), "--dataset", str(lab_dataset / "prompts.jsonl"), "--end", "1",
            "--run_name", "r", "--method", "none", "--num_inference_steps", "3", "--sscd_model", "none",
            "--skip_clip", "--out", str(tmp_path / "r")]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        main([*args, "--num_images_per_prompt", "2"])
    assert main([*args, "--num_images_per_prompt", "1"]) == 0
    assert [r["row"] for r in _rows(tmp_path / "r" / "results.jsonl")] == [0]
    assert main([*args, "--num_images_per_prompt", "2"]) == 2


def test_tradeoff_failed_first_batch_does_not_bind_the_retry(tmp_path, tiny_pipeline_dir, lab_dataset, sscd_spec,
                                                             out_of_memory_above_one_image):
    from diffmem.mitigate.tradeoff import main

    args = ["--model_id", str(tiny_pipeline_dir), "--dataset", str(lab_dataset / "prompts.jsonl"), "--end", "1",
            "--run_name", "sweep", "--num_inference_steps", "3", "--target_losses", "--baselines",
            "rand_word_repeat", "--repeat_nums", "1", "--sscd_model", sscd_spec, "--reference_model", "ViT-S-32",
            "--reference_model_pretrain", "none", "--out", str(tmp_path / "sweep")]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        main([*args, "--num_images_per_prompt", "2"])
    assert main([*args, "--num_images_per_prompt", "1"]) == 0
    points = json.loads((tmp_path / "sweep" / "tradeoff.json").read_text())["points"]
    assert [p["label"] for p in points] == ["none", "rand_word_repeat_repeat1"]
    assert main([*args, "--num_images_per_prompt", "2"]) == 2


# ------------------------------------------------------------------- a resume is the same run, or refused


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_resume_binds_model_dtype_evaluators_and_dataset(tmp_path, tiny_pipeline_dir, lab_dataset, sscd_spec,
                                                           capsys):
    from diffmem.mitigate.inference_mem import main

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"caption": f"another prompt {i}", "index": i}) + "\n" for i in range(3)))
    base = ["--dataset", str(lab_dataset / "prompts.jsonl"), "--end", "2", "--run_name", "r", "--method", "none",
            *GEN, "--sscd_model", sscd_spec, "--skip_clip", "--gt_dir", str(lab_dataset), "--out", str(tmp_path / "r")]
    model = ["--model_id", str(tiny_pipeline_dir)]
    assert main([*model, *base]) == 0
    capsys.readouterr()
    results = tmp_path / "r" / "results.jsonl"
    before = results.read_bytes()
    for change, expected in [
        (["--dtype", "bf16"], "dtype='fp32' (now 'bf16')"),
        (["--sscd_preprocess", "zhang"], "(now 'zhang')"),
        (["--sscd_model", "none"], "sscd_model="),
        (["--reference_model", "ViT-S-32", "--reference_model_pretrain", "none"],
         "clip_model=None (now 'ViT-S-32:none')"),
        (["--unet_id", str(tiny_pipeline_dir / "unet")], "unet_id=None"),
    ]:
        args = [*model, *base, *change]
        if "--reference_model" in change:
            args.remove("--skip_clip")
        assert main(args) == 2, change
        line = one_line_error(capsys)
        assert "earlier results of this run used" in line and expected in line, line
    # Another prompt file under the run: the stored rows hold other prompts.
    args = [*model, *base]
    args[args.index("--dataset") + 1] = str(other)
    assert main(args) == 2
    line = one_line_error(capsys)
    assert "results.jsonl: row 0 holds another prompt ('The No Limits Business Woman Podcast'" in line, line
    assert "pass --overwrite or another --out" in line
    # The same rows in a file whose other rows changed: the dataset's content is bound.
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps({"caption": p if i < 2 else "changed", "index": i}) + "\n"
                              for i, p in enumerate(PROMPTS)))
    args[args.index("--dataset") + 1] = str(edited)
    assert main(args) == 2
    assert "dataset_sha256=" in one_line_error(capsys)
    assert results.read_bytes() == before
    # A moved copy of the same file resumes.
    moved = tmp_path / "moved" / "prompts.jsonl"
    moved.parent.mkdir()
    moved.write_bytes((lab_dataset / "prompts.jsonl").read_bytes())
    args[args.index("--dataset") + 1] = str(moved)
    assert main(args) == 0
    assert results.read_bytes() == before


def test_tradeoff_binds_the_dtype_of_each_run(tmp_path, tiny_pipeline_dir, lab_dataset, sscd_spec, capsys):
    from diffmem.mitigate.tradeoff import main

    args = ["--model_id", str(tiny_pipeline_dir), "--dataset", str(lab_dataset / "prompts.jsonl"), "--end", "1",
            "--run_name", "sweep", *GEN, "--target_losses", "--baselines", "--sscd_model", sscd_spec,
            "--reference_model", "ViT-S-32", "--reference_model_pretrain", "none", "--out", str(tmp_path / "sweep")]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--dtype", "bf16"]) == 2
    line = one_line_error(capsys)
    assert "sweep/none/config.json: earlier results of this run used dtype='fp32' (now 'bf16')" in line, line
