"""detect/benchmark.py: the protocol presets are consistent with the harness, and a preset runs end to end on the lab
(its table beside the published numbers, the metrics equal to a direct computation, resume, bad input)."""

from __future__ import annotations

import json
import typing

import numpy as np
import pytest
from conftest import REPO, run_cli, run_in_process

from diffmem.common.metrics import TPR_RULES, roc_points, tpr_at_fpr
from diffmem.common.t2i.benchmark import PROTOCOLS
from diffmem.common.t2i.detect_run import DetectConfig
from diffmem.common.t2i.options import ALL_DETECTORS as DETECTORS
from diffmem.common.t2i.prompt_sets import PROMPT_SETS

LAB = REPO / "data" / "lab"
SCRIPT = "detect/benchmark.py"


def test_every_preset_names_what_the_harness_has():
    fields = typing.get_type_hints(DetectConfig)
    for p in PROTOCOLS.values():
        assert p.memorized in PROMPT_SETS and p.non_memorized in PROMPT_SETS, p.name
        assert PROMPT_SETS[p.memorized].label == 1 and PROMPT_SETS[p.non_memorized].label == 0
        assert p.tpr_rule in TPR_RULES and p.latents in ("shared", "per_prompt")
        assert len({r.key for r in p.runs}) == len(p.runs)
        for r in p.runs:
            assert r.detector in DETECTORS, (p.name, r.key)
            assert all(k in fields for k, _ in r.options), (p.name, r.key)
            assert all(0 < pub.auc <= 1 and 0 <= pub.tpr <= 1 and pub.source for pub in r.published)


def test_runs_list_prints_the_protocols_runs():
    res = run_in_process(SCRIPT, "--protocol", "jeon25", "--runs", "list")
    assert res.returncode == 0, res.stderr
    assert [line.split(":")[0] for line in res.stdout.splitlines()] == [r.key for r in PROTOCOLS["jeon25"].runs]


def test_a_protocol_on_the_lab_prints_its_table_and_resumes(tmp_path):
    out = tmp_path / "bench"
    args = ["--protocol", "asthana26", "--model_id", LAB, "--memorized", LAB / "memorized.jsonl",
            "--non_memorized", LAB / "unmemorized.jsonl", "--runs", "anisotropy_g1", "--limit", 40,
            "--num_inference_steps", 10, "--out", out]
    res = run_cli(SCRIPT, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((out / "anisotropy_g1.json").read_text())
    # The metrics from the detection runs' own rows, by Jeon's argmin rule, computed here directly.
    pos = [json.loads(line)["score"] for line in (out / "runs" / "anisotropy_g1.memorized.jsonl").open()]
    neg = [json.loads(line)["score"] for line in (out / "runs" / "anisotropy_g1.non_memorized.jsonl").open()]
    assert (len(pos), len(neg)) == (12, 40)
    s, y = np.array(pos + neg), np.array([1] * len(pos) + [0] * len(neg))
    direct_auc = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert record["ours"]["auc"] == pytest.approx(direct_auc)
    fpr, tpr, _ = roc_points(s, y)
    nearest = int(np.argmin(np.abs(fpr - 0.01)))
    assert record["ours"]["tpr_at_fpr"]["1%"] == pytest.approx(tpr[nearest]) == tpr_at_fpr(fpr, tpr, 0.01,
                                                                                            "nearest_first")
    assert record["tpr_rule"] == "nearest_first" and record["published"][0]["auc"] == 0.994
    assert record["settings"]["detect"]["latents"] == "shared"
    lines = res.stdout.splitlines()
    assert any(line.startswith("anisotropy_g1") and line.rstrip().endswith("ours") for line in lines)
    assert any("SD v1.4" in line and "0.994" in line and "Asthana" in line for line in lines)
    assert "only the first 40 prompts of each set" in res.stdout
    assert json.loads((out / "benchmark.json").read_text())["records"][0]["ours"] == record["ours"]
    again = run_in_process(SCRIPT, *args)
    assert again.returncode == 0 and again.stdout.count("(0 scored now") == 2, again.stdout


@pytest.mark.parametrize("more, expected", [
    (["--protocol", "jeon25", "--runs", "nope"], "--runs nope: not a run of jeon25"),
    (["--protocol", "jeon25", "--limit", "0"], "--limit must be at least 1"),
    (["--protocol", "early26", "--model_id", str(LAB), "--runs", "wen_step0_g1"], "diffmem-prompt-sets fetch"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, more, expected):
    res = run_in_process(SCRIPT, *more, "--out", tmp_path / "b", env={"DIFFMEM_PROMPT_SETS": str(tmp_path / "cache")})
    assert res.returncode == 2 and expected in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "b").exists()
