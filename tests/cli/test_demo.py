"""``diffmem demo`` runs from an installed wheel, in a folder that is not the checkout: the lab it scores is the
wheel's own package data, and it prints AUC and TPR@1%FPR."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ONE_THREAD


def demo(site, cwd, *args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **ONE_THREAD, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "diffmem.detect.demo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_from_the_installed_wheel_scores_its_own_lab(installed_wheel, tmp_path):
    res = demo(installed_wheel, tmp_path, "--num_inference_steps", "2", "--num_images_per_prompt", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "demo_outputs"  # the default --out, in the current folder
    lab = installed_wheel / "diffmem" / "data" / "lab"
    for run, n in (("memorized", 12), ("unmemorized", 100)):
        rows = [json.loads(line) for line in (out / f"{run}.jsonl").read_text().splitlines()]
        assert len(rows) == n and all(len(r["text_noise_norm"]) == 1 for r in rows)  # one generation
        summary = json.loads((out / f"{run}.summary.json").read_text())
        assert summary["args"]["model_id"] == str(lab)  # the wheel's lab, not the checkout's
    assert {p.name for p in (out / "eval").iterdir()} >= {"summary.json", "roc.png", "scores_kde.png"}
    metrics = json.loads((out / "eval" / "summary.json").read_text())["splits"]["all"]
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith(f"demo: AUC {metrics['auc']:.3f}, TPR@1%FPR {metrics['tpr_at_fpr']['1%']:.2f}")
    assert "manifest" not in line  # other settings than the manifest's: no figures to compare with
    assert "AUC" in res.stdout and "TPR@1%FPR" in res.stdout  # evaluate's table as well


def test_demo_refuses_bad_settings_in_one_line_before_any_work(installed_wheel, tmp_path):
    res = demo(installed_wheel, tmp_path, "--num_inference_steps", "2", "--score_steps", "3", timeout=60)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "demo: error: --target_steps must lie in 0..1 (--num_inference_steps), got 0-2"], res.stderr
    res = demo(installed_wheel, tmp_path, "--model", str(tmp_path), timeout=60)
    assert res.returncode == 2 and "expected a lab-shaped pipeline folder (model_index.json missing)" in res.stderr
    assert not (tmp_path / "demo_outputs").exists()


def test_diffmem_demo_is_the_dispatchers_verb(installed_wheel, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed_wheel)}
    res = subprocess.run([sys.executable, "-m", "diffmem", "demo", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--num_inference_steps" in res.stdout and "demo_outputs" in res.stdout, res.stderr
