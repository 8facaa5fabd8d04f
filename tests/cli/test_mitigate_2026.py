"""The 2026 mitigations (guard, prss, clip_pad) through inference_mem.py and tradeoff.py: cost rows, settings bound
to the run folder, a bad paraphrase file and the families that refuse them, each in one line with exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from diffmem.mitigate import inference_mem, tradeoff

PROMPTS = ["The No Limits Business Woman Podcast", "a photo of a cat"]
GEN = ["--num_inference_steps", "2", "--num_images_per_prompt", "1", "--batch_size", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two captions with a ground-truth image each and a stand-in SSCD model."""
    from PIL import Image
    from sscd_standins import TinyDescriptor

    d = tmp_path_factory.mktemp("mit2026")
    (d / "p.jsonl").write_text("".join(json.dumps({"caption": p, "index": i}) + "\n" for i, p in enumerate(PROMPTS)))
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        (d / "gt_images" / str(i)).mkdir(parents=True)
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(
            d / "gt_images" / str(i) / "a.png")
    torch.jit.script(TinyDescriptor()).save(str(d / "sscd.pt"))
    return d


def _run(main, args, capsys):
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method, extra, calls, knob", [
    ("guard", [], [2], ("--guard_spike_scale", "0.5", "guard_spike_scale=0.3 (now 0.5)")),
    # no paraphrase file: step 0 tries the prompt alone (ε_u and ε_c), re-anchoring to itself costs nothing
    ("prss", [], [2], ("--prss_l_pr", "2", "prss_l_pr=3.0 (now 2.0)")),
    ("clip_pad", ["--clip_pad_mode", "ratio"], [0], ("--clip_pad_ratio", "0.4", "clip_pad_ratio=0.7 (now 0.4)")),
])
def test_each_method_runs_resumes_and_binds_its_settings(tiny_pipeline_dir, data, tmp_path, capsys, method, extra,
                                                         calls, knob):
    args = ["--model", tiny_pipeline_dir, "--data", data / "p.jsonl", *GEN, "--sscd_model", data / "sscd.pt",
            "--skip_clip", "--out", tmp_path / method, "--method", method, *extra]
    code, err = _run(inference_mem.main, [*args, "--end", "1"], capsys)
    assert code == 0, err
    code, err = _run(inference_mem.main, args, capsys)
    assert code == 0, err
    rows = _rows(tmp_path / method / "results.jsonl")
    assert [r["row"] for r in rows] == [0, 1] and all(r["extra_unet_calls"] == calls for r in rows)
    assert all(r["method"] == method and len(r["sscd"]) == 1 for r in rows)
    config = json.loads((tmp_path / method / "config.json").read_text())
    flag, value, message = knob
    assert config[flag[2:]] != float(value) and "gni_scale" not in config
    code, err = _run(inference_mem.main, [*args, flag, value], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    # another method's setting would change nothing: refused in one line, as for every method
    code, err = _run(inference_mem.main, [*args, "--ren_c", "1.1"], capsys)
    assert code == 2 and len(err) == 1 and f"--ren_c does not apply to --method {method}" in err[0], err


def test_prss_paraphrase_file_is_bound_by_content(tiny_pipeline_dir, data, tmp_path, capsys):
    para = tmp_path / "para.jsonl"
    para.write_text(json.dumps({"caption": PROMPTS[0], "paraphrases": ["a", "podcast"]}) + "\n")
    args = ["--model", tiny_pipeline_dir, "--data", data / "p.jsonl", *GEN, "--sscd_model", data / "sscd.pt",
            "--skip_clip", "--out", tmp_path / "r", "--method", "prss", "--paraphrases", para, "--prss_l_ss", "0.3"]
    code, err = _run(inference_mem.main, args, capsys)
    assert code == 0, err
    rows = _rows(tmp_path / "r" / "results.jsonl")
    assert [r["prss_paraphrases"] for r in rows] == [2, 0]
    assert rows[0]["prss_choice"] == [1]  # "a" is below 0.3 on the tiny model, the first candidate that is
    assert rows[0]["extra_unet_calls"][0] >= 3  # ε_u, the prompt and "a" at step 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["paraphrases"] == str(para) and len(config["paraphrases_sha256"]) == 64
    para.write_text(json.dumps({"caption": PROMPTS[0], "paraphrases": ["podcast"]}) + "\n")
    code, err = _run(inference_mem.main, args, capsys)
    assert code == 2 and len(err) == 1 and "paraphrases_sha256" in err[0], err


def test_bad_paraphrase_line_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text(json.dumps({"caption": "a cat"}) + "\n")
    para = tmp_path / "para.jsonl"
    para.write_text(json.dumps({"caption": "a cat", "paraphrases": ["a kitten"]}) + "\n{oops\n")
    code, err = _run(inference_mem.main, ["--model", tmp_path / "no-model", "--data", tmp_path / "p.jsonl",
                                          "--method", "prss", "--paraphrases", para, "--sscd_model", "none",
                                          "--skip_clip", "--out", tmp_path / "x"], capsys)
    assert code == 2 and len(err) == 1 and f"{para}:2: not JSON" in err[0], err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from diffmem.common.t2i.pipelines.tiny import build_family_pipeline

    return build_family_pipeline("sd3", tmp_path_factory.mktemp("sd3") / "sd3")


@pytest.mark.parametrize("method, message", [
    ("guard", "--method guard needs a UNet whose cross-attention layers attend to CLIP tokens; SD3/SD3.5 has none"),
    ("clip_pad", "--method clip_pad needs CLIP's BOS, end and padding tokens in its conditioning; SD3/SD3.5 has "
                 "none"),
])
def test_refused_on_mmdit_in_one_line(tiny_sd3, data, tmp_path, capsys, method, message):
    code, err = _run(inference_mem.main, ["--model", tiny_sd3, "--data", data / "p.jsonl", *GEN, "--sscd_model",
                                          data / "sscd.pt", "--skip_clip", "--out", tmp_path / "m", "--method",
                                          method], capsys)
    assert code == 2 and len(err) == 1 and err[0].endswith(message), err
    assert not (tmp_path / "m" / "results.jsonl").exists()


def test_tradeoff_runs_the_three_with_their_knobs(tiny_pipeline_dir, data, tmp_path, capsys):
    code, err = _run(tradeoff.main, ["--model", tiny_pipeline_dir, "--data", data / "p.jsonl", *GEN, "--sscd_model",
                                     data / "sscd.pt", "--reference_model", "ViT-S-32", "--reference_model_pretrain",
                                     "none", "--out", tmp_path / "t", "--methods", "none", "guard", "prss",
                                     "clip_pad", "clip_pad:clip_pad_mode=ratio", "--sweep",
                                     "guard_repulsion_scale=2,3"], capsys)
    assert code == 0, err
    points = {p["label"]: p for p in json.loads((tmp_path / "t" / "tradeoff.json").read_text())["points"]}
    assert [p["method"] for p in points.values()] == ["none", "guard", "guard", "prss", "clip_pad", "clip_pad"]
    assert list(points)[-1] == "clip_pad_pad_moderatio_pad_ratio0.7"  # a choice in a --methods item
    code, err = _run(tradeoff.main, ["--model", tiny_pipeline_dir, "--data", data / "p.jsonl", "--out", tmp_path / "u",
                                     "--methods", "guard:guard_orthogonalize=of"], capsys)
    assert code == 2 and err == ["tradeoff: error: --guard_orthogonalize must be one of on, off, got 'of'"], err
    extra = {p["method"]: p["extra_unet_calls_per_image"] for p in points.values()}
    assert extra == {"none": 0, "guard": 2, "prss": 2, "clip_pad": 0}
