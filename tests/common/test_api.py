"""diffmem.common.api, the notebooks' public API, on the shipped lab (CPU, a few DDIM steps): its numbers are the
CLIs' for the same settings, and it writes only where it is told."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from diffmem.common import api, resources
from diffmem.common.errors import ConfigError
from diffmem.common.metrics import ResultsFileError

FEW = dict(num_images_per_prompt=1, num_inference_steps=3)


@pytest.fixture(scope="module")
def lab_model():
    return api.load_model()  # None: the shipped lab


def test_import_diffmem_and_its_resources_stay_light():
    code = ("import sys, diffmem, diffmem.common.resources as r; r.lab_dir(); "
            "assert not {'torch', 'diffusers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_lab_dir_is_the_shipped_lab():
    lab = api.lab_dir()
    assert lab == REPO / "data" / "lab" and (lab / "model_index.json").is_file()
    records = api.read_prompts(lab / "memorized.jsonl")
    assert len(records) == 12 and all(r.label == 1 for r in records) and records[3].row == 3


def test_score_prompts_gives_detect_mems_rows(lab_model, tmp_path):
    from diffmem.detect.detect_mem import main as detect_main

    lab = api.lab_dir()
    rows = api.score_prompts(lab_model, lab / "memorized.jsonl", score_steps=2, progress=False, **FEW)
    assert detect_main(["--model_id", str(lab), "--dataset", str(lab / "memorized.jsonl"), "--run_name", "cli",
                        "--output_dir", str(tmp_path), "--score_steps", "2", "--num_images_per_prompt", "1",
                        "--num_inference_steps", "3"]) == 0
    cli = api.read_results(tmp_path / "cli.jsonl")
    assert [{k: v for k, v in r.items() if k != "score"} for r in rows] == [
        {k: v for k, v in r.items() if k != "score"} for r in cli]  # the same rows: prompts, labels, norms
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in cli], rel=1e-6)
    assert rows[0]["label"] == 1 and len(rows[0]["text_noise_norm"][0]) == 2  # [generation][step]
    strings = api.score_prompts(lab_model, [r["prompt"] for r in rows[:2]], progress=False, **FEW)
    assert [r["row"] for r in strings] == [0, 1] and "label" not in strings[0]
    assert [r["score"] for r in strings] == pytest.approx([r["score"] for r in api.score_prompts(
        lab_model, api.read_prompts(lab / "memorized.jsonl")[:2], progress=False, **FEW)])


def test_results_round_trip_and_evaluate_writes_only_into_out_dir(lab_model, tmp_path):
    lab = api.lab_dir()
    rows = [row for name in ("memorized.jsonl", "unmemorized.jsonl")
            for row in api.score_prompts(lab_model, lab / name, progress=False, **FEW)]
    out = api.output_dir(tmp_path / "out" / "nested")
    path = api.write_results(out / "scores.jsonl", rows)
    assert api.read_results(path) == json.loads(json.dumps(rows))
    report = api.evaluate(path, out)
    assert report.note is None and report.metrics["all"]["auc"] > 0.9  # the lab's memorized captions stand out
    assert report.metrics["all"]["n_pos"] == 12 and report.metrics["all"]["n_neg"] == 100
    assert "AUC" in report.table and "TPR@1%FPR" in report.table
    assert sorted(p.name for p in out.iterdir()) == ["roc.png", "scores.jsonl", "scores_kde.png"]
    one_class = api.write_results(tmp_path / "mem.jsonl", rows[:12])
    report = api.evaluate(one_class)
    assert report.metrics == {} and report.roc_png is None and "expected rows of both classes" in report.note
    with pytest.raises(ResultsFileError, match="no such results file"):
        api.read_results(tmp_path / "absent.jsonl")


def test_explain_tokens_and_its_pictures(lab_model, tmp_path):
    prompt = api.read_prompts(api.lab_dir() / "memorized.jsonl")[0].prompt
    (result,) = api.explain_tokens(lab_model, [prompt], target_steps=[0, 1], **FEW)
    assert result.prompt == prompt and result.target_steps == [0, 1] and len(result.objective) == 2
    words = [t.strip() for t, _ in result.ranking()]
    assert sorted(words) == sorted(prompt.split()) and max(n for _, n in result.ranking()) == pytest.approx(1.0)
    before = api.explain_tokens(lab_model, [prompt, prompt], [0, 0], wrt="token_embeds", batch_size=1, **FEW)
    assert before[0].scores == pytest.approx(before[1].scores) and before[0].wrt == "token_embeds"
    fragment = api.token_heatmap([result, before[0]])
    assert "wrt prompt_embeds" in fragment and "wrt token_embeds" in fragment and "<html>" not in fragment
    assert api.token_heatmap([result], title="T").startswith("<!DOCTYPE html>")
    api.plot_token_bars(result, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > 0


def test_output_dir_refuses_the_installed_package(tmp_path, monkeypatch):
    assert api.output_dir(tmp_path / "a") == tmp_path / "a"  # a checkout's tree is the user's own
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="expected a folder, it is a file"):
        api.output_dir(tmp_path / "file")
    installed = tmp_path / "site-packages" / "diffmem"
    installed.mkdir(parents=True)
    monkeypatch.setattr(resources, "package_root", lambda: installed)
    with pytest.raises(ConfigError, match="inside the installed diffmem package"):
        api.output_dir(installed / "notebooks" / "out")
    assert not (installed / "notebooks").exists()
    assert api.output_dir(tmp_path / "b").is_dir()


def test_resources_find_the_shipped_files(tmp_path, monkeypatch):
    assert resources.package_root() == REPO  # the checkout is the package
    assert resources.accelerate_config("cpu") == REPO / "accelerate_configs" / "cpu.yaml"
    assert resources.accelerate_config("cpu.yaml") == REPO / "accelerate_configs" / "cpu.yaml"
    assert "single_gpu_fp16" in resources.accelerate_config_names()
    own = tmp_path / "cpu.yaml"
    own.write_text("")
    monkeypatch.chdir(tmp_path)
    assert resources.accelerate_config("cpu.yaml") == own.relative_to(tmp_path)  # an existing file comes first
    with pytest.raises(ConfigError, match=r"^nope: no such accelerate config file, nor a shipped one \(shipped: cpu"):
        resources.accelerate_config("nope")
    assert {p.name for p in resources.notebooks_dir().glob("*.ipynb")} == {"token_significance.ipynb",
                                                                           "detection_report.ipynb"}
    monkeypatch.setattr(resources, "package_root", lambda: tmp_path)
    with pytest.raises(resources.MissingResourceError, match="the memorization lab is not in this installation"):
        resources.lab_dir()
