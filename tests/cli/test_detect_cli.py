"""detect/detect_mem.py through its real entry point: outputs, errors, kill-and-resume, two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_cli, run_in_process

PROMPTS = [f"prompt number {i} about a {w}" for i, w in enumerate(
    "cat dog tree house river boat car lamp chair cup bird fish star moon sun road".split())]
LONG = " ".join(["very long caption"] * 40)


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"caption": p, "label": i % 2, "index": 1000 + i} for i, p in enumerate(PROMPTS)]
    rows.append({"caption": LONG})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def library_scores(parts, prompts, rows, **kw):
    from diffmem.common.t2i.detection import score_prompts

    trace, _ = score_prompts(parts, prompts, rows, **kw)
    return trace.score.tolist()


def test_end_to_end(tiny_pipeline_dir, tiny_parts, dataset, tmp_path):
    out = tmp_path / "out"
    res = run_cli("detect/detect_mem.py", "--model_id", tiny_pipeline_dir, "--dataset", dataset, "--run_name", "e2e",
                  "--output_dir", out, "--num_images_per_prompt", 2, "--batch_size", 5, "--score_steps", 2,
                  "--num_inference_steps", 10, "--label", 1)
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(out / "e2e.jsonl")
    assert [r["row"] for r in rows] == list(range(len(PROMPTS) + 1))
    assert rows[0]["index"] == 1000 and rows[-1]["index"] == len(PROMPTS)  # own index, else the row
    assert rows[-1]["label"] == 1 and rows[1]["label"] == 1 and rows[2]["label"] == 0  # --label fills gaps only
    assert all(len(r["text_noise_norm"]) == 2 and len(r["text_noise_norm"][0]) == 2 for r in rows)
    assert [r["truncated"] for r in rows].count(True) == 1 and rows[-1]["truncated"]
    for r in rows:
        flat = [v for gen in r["text_noise_norm"] for v in gen]
        assert r["score"] == pytest.approx(sum(flat) / len(flat), rel=1e-6)
    expected = library_scores(tiny_parts, PROMPTS + [LONG], list(range(len(rows))), num_images_per_prompt=2,
                              score_steps=2, num_inference_steps=10)
    assert [r["score"] for r in rows] == pytest.approx(expected, rel=1e-5)
    summary = json.loads((out / "e2e.summary.json").read_text())
    assert summary["counts"]["prompts"] == len(rows) and summary["counts"]["truncated"] == 1
    assert summary["counts"]["scored_this_run"] == len(rows) and summary["prompts_per_s"] > 0
    assert summary["counts"]["labels"] == {"0": len(PROMPTS) // 2, "1": len(PROMPTS) // 2 + 1}


def test_bad_row_is_reported_before_any_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "fine"}\n{"caption": "broken"\n')
    # An existing folder, though no pipeline: a model reference that does not exist is refused first.
    res = run_in_process("detect/detect_mem.py", "--model_id", tmp_path, "--dataset", bad, "--run_name", "x",
                  "--output_dir", tmp_path / "out")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and f"{bad}:2:" in res.stderr and "expected a JSON object" in res.stderr
    assert not (tmp_path / "out").exists()


def test_latin1_dataset_is_one_line_before_any_model_is_loaded(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"caption": "fine"}\n{"caption": "café"}\n'.encode("latin-1"))
    res = run_in_process("detect/detect_mem.py", "--model_id", tmp_path, "--dataset", latin1,
                  "--run_name", "x", "--output_dir", tmp_path / "out")
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [f"detect_mem: error: {latin1}:2: not UTF-8 text (byte 0xe9 at column 17); "
                                       f"re-save the file as UTF-8"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,expected", [
    (["--score_steps", "0"], "expected a positive step count or 'all', got '0'"),
    (["--score_steps", "first"], "expected a positive step count or 'all'"),
    (["--target_steps", "50"], "--target_steps must be a prefix of the trajectory"),
    (["--target_steps", "0-50"], "--target_steps must lie in 0..49"),
    (["--target_steps", "first"], "--target_steps must be a prefix"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--num_inference_steps", "0"], "--num_inference_steps must be at least 1, got 0"),  # not --target_steps'
    (["--latents", "random"], "invalid choice"),
    (["--detector", "oracle"], "invalid choice"),
    (["--detector", "sharpness", "--score_steps", "2"], "--target_steps applies to --detector wen only"),
    (["--detector", "sharpness", "--target_steps", "0-1"], "--target_steps applies to --detector wen only"),
    (["--anisotropy_weights", "1", "2"], "--anisotropy_weights applies to --detector anisotropy only"),
    (["--detector", "anisotropy", "--num_inference_steps", "2"], "needs --num_inference_steps of at least 3"),
])
def test_bad_settings_are_one_line(dataset, tmp_path, args, expected):
    res = run_in_process("detect/detect_mem.py", "--model_id", "m", "--dataset", dataset, "--run_name", "x",
                  "--output_dir", tmp_path, *args)
    assert res.returncode == 2 and expected in res.stderr and res.stderr.strip().count("\n") == 0


def test_unknown_model_is_one_line(dataset, tmp_path):
    res = run_in_process("detect/detect_mem.py", "--model_id", tmp_path / "missing-model", "--dataset", dataset,
                  "--run_name", "x", "--output_dir", tmp_path / "out")
    assert res.returncode == 2 and "missing-model: no such folder, and not a Hub id (owner/name)" in res.stderr
    assert "Traceback" not in res.stderr


def test_failed_run_does_not_block_its_corrected_retry(tiny_pipeline_dir, dataset, tmp_path):
    out = tmp_path / "out"
    args = ["--dataset", dataset, "--run_name", "p", "--output_dir", out, "--end", 2,
            "--num_images_per_prompt", 1, "--num_inference_steps", 3, "--score_steps", 1]
    failed = run_in_process("detect/detect_mem.py", "--model_id", tmp_path / "nope", *args)
    assert failed.returncode == 2 and "nope: no such folder" in failed.stderr

    fixed = run_in_process("detect/detect_mem.py", "--model_id", tiny_pipeline_dir, *args)
    assert fixed.returncode == 0, fixed.stderr
    assert [r["row"] for r in read_jsonl(out / "p.jsonl")] == [0, 1]
    # Now that results exist, their settings bind the run.
    other = run_in_process("detect/detect_mem.py", "--model_id", tmp_path, *args)  # another folder (no pipeline)
    assert other.returncode == 2 and f"model_id={str(tiny_pipeline_dir)!r}" in other.stderr


def test_killed_run_resumes_with_every_row_once(tiny_pipeline_dir, tiny_parts, dataset, tmp_path):
    out = tmp_path / "out"
    args = ["--model_id", tiny_pipeline_dir, "--dataset", dataset, "--run_name", "r", "--output_dir", out,
            "--num_images_per_prompt", 2, "--batch_size", 1, "--num_inference_steps", 6, "--score_steps", "all"]
    cmd = [sys.executable, str(REPO / "detect/detect_mem.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    part = out / "r.parts" / "part-0.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and part.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = part.read_text().count("\n")
    assert 3 <= done < len(PROMPTS) + 1, "the run must be killed mid-way"
    assert not (out / "r.jsonl").exists()
    with open(part, "a") as f:  # a write cut short by the kill
        f.write('{"row": 9, "index": 1009, "prompt": "prompt number 9 ab')

    res = run_in_process("detect/detect_mem.py", *args)
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(out / "r.jsonl")
    assert [r["row"] for r in rows] == list(range(len(PROMPTS) + 1))
    assert read_jsonl(part)  # torn tail cut: every line of the part parses
    summary = json.loads((out / "r.summary.json").read_text())
    assert summary["counts"]["resumed"] == done and summary["counts"]["scored_this_run"] == len(rows) - done
    expected = library_scores(tiny_parts, PROMPTS + [LONG], list(range(len(rows))), num_images_per_prompt=2,
                              num_inference_steps=6, score_steps=6)
    assert [r["score"] for r in rows] == pytest.approx(expected, rel=1e-5)

    # Same command again: nothing to do; different scoring settings: refused.
    again = run_in_process("detect/detect_mem.py", *args)
    assert again.returncode == 0 and "0 scored now" in again.stdout
    other = run_in_process("detect/detect_mem.py", *args, "--gen_seed", 5)
    assert other.returncode == 2 and "gen_seed=0 (now 5)" in other.stderr


def test_zero_step_detectors_end_to_end_and_resume_binds_the_detector(tiny_pipeline_dir, tiny_parts, dataset,
                                                                       tmp_path):
    out = tmp_path / "out"
    args = ["--model_id", tiny_pipeline_dir, "--dataset", dataset, "--output_dir", out, "--num_images_per_prompt", 2,
            "--batch_size", 4, "--end", 6]
    res = run_in_process("detect/detect_mem.py", *args, "--run_name", "ani", "--detector", "anisotropy",
                  "--anisotropy_weights", "1", "0.5")
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(out / "ani.jsonl")
    expected = library_scores(tiny_parts, PROMPTS[:6], list(range(6)), num_images_per_prompt=2,
                              detector="anisotropy", anisotropy_weights=(1.0, 0.5))
    assert [r["score"] for r in rows] == pytest.approx(expected, rel=1e-5)
    for r in rows:  # the terms are kept, so a notebook can re-weight them
        assert r["detector"] == "anisotropy" and r["weights"] == [1.0, 0.5] and r["timesteps"] == [981, 41]
        n = sum(v for (v,) in r["text_noise_norm"]) / 2
        assert r["score"] == pytest.approx(n + 0.5 * sum(r["channel_cosine"]) / 2, rel=1e-5)
    assert json.loads((out / "ani.summary.json").read_text())["detector"] == "anisotropy"

    for changed, message in [(["--detector", "sharpness"], "detector='anisotropy' (now 'sharpness')"),
                             (["--detector", "anisotropy", "--anisotropy_weights", "1", "2"],
                              "anisotropy_weights=[1.0, 0.5] (now [1.0, 2.0])")]:
        other = run_in_process("detect/detect_mem.py", *args, "--run_name", "ani", *changed)
        assert other.returncode == 2 and message in other.stderr, other.stderr

    res = run_in_process("detect/detect_mem.py", *args, "--run_name", "sharp", "--detector", "sharpness")
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(out / "sharp.jsonl")
    expected = library_scores(tiny_parts, PROMPTS[:6], list(range(6)), num_images_per_prompt=2, detector="sharpness")
    assert [r["score"] for r in rows] == pytest.approx(expected, rel=1e-5)
    assert all(r["detector"] == "sharpness" and len(r["sharpness"]) == 2 for r in rows)


def test_run_from_before_detectors_resumes_as_wen(tiny_pipeline_dir, dataset, tmp_path):
    out = tmp_path / "out"
    args = ["--model_id", tiny_pipeline_dir, "--dataset", dataset, "--run_name", "old", "--output_dir", out,
            "--end", 2, "--num_images_per_prompt", 1]
    assert run_in_process("detect/detect_mem.py", *args).returncode == 0
    config = out / "old.parts" / "config.json"
    settings = json.loads(config.read_text())
    assert settings.pop("detector") == "wen"
    config.write_text(json.dumps(settings))  # the config of a run made before --detector existed
    again = run_in_process("detect/detect_mem.py", *args)
    assert again.returncode == 0 and "0 scored now" in again.stdout, again.stderr
    other = run_in_process("detect/detect_mem.py", *args, "--detector", "anisotropy")
    assert other.returncode == 2 and "detector='wen' (now 'anisotropy')" in other.stderr


@pytest.mark.parametrize("detector", ["wen", "sharpness"])
def test_two_processes_shard_and_merge(tiny_pipeline_dir, tiny_parts, dataset, tmp_path, detector):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "detect/detect_mem.py"), "--model_id", str(tiny_pipeline_dir), "--dataset", str(dataset),
           "--run_name", "mp", "--output_dir", str(out), "--num_images_per_prompt", "2", "--batch_size", "3",
           "--detector", detector]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    parts = sorted((out / "mp.parts").glob("part-*.jsonl"))
    assert len(parts) == 2 and all(read_jsonl(p) for p in parts)
    rows = read_jsonl(out / "mp.jsonl")
    assert [r["row"] for r in rows] == list(range(len(PROMPTS) + 1))
    expected = library_scores(tiny_parts, PROMPTS + [LONG], list(range(len(rows))), num_images_per_prompt=2,
                              detector=detector)
    assert [r["score"] for r in rows] == pytest.approx(expected, rel=1e-5)


def test_a_resume_on_another_dataset_is_refused_row_by_row(tiny_pipeline_dir, dataset, tmp_path, capsys):
    from diffmem.detect.detect_mem import main

    def last_line():
        return capsys.readouterr().err.strip().splitlines()[-1]

    out = tmp_path / "out"
    args = ["--model_id", str(tiny_pipeline_dir), "--run_name", "r", "--output_dir", str(out), "--end", "2",
            "--num_images_per_prompt", "1", "--num_inference_steps", "3"]
    assert main([*args, "--dataset", str(dataset)]) == 0
    before = (out / "r.jsonl").read_bytes()
    capsys.readouterr()
    unmemorized = tmp_path / "unmemorized.jsonl"
    unmemorized.write_text("".join(json.dumps({"caption": f"an ordinary photo {i}", "label": 0}) + "\n"
                                   for i in range(4)))
    assert main([*args, "--dataset", str(unmemorized)]) == 2
    line = last_line()
    assert "r.jsonl: row 0 holds another prompt ('prompt number 0 about a cat'" in line, line
    assert "pass --overwrite or a new --run_name" in line
    relabelled = tmp_path / "relabelled.jsonl"
    relabelled.write_text("".join(json.dumps({"caption": p, "label": 1 - i % 2, "index": 1000 + i}) + "\n"
                                  for i, p in enumerate(PROMPTS)))
    assert main([*args, "--dataset", str(relabelled)]) == 2
    assert "row 0 holds another label ('0'; the dataset's is '1')" in last_line()
    # The same first rows, another row further on: the dataset's content is bound, not only the rows done.
    edited = tmp_path / "edited.jsonl"
    edited.write_text(dataset.read_text().replace("about a moon", "about a comet"))
    assert main([*args, "--dataset", str(edited)]) == 2
    assert "dataset_sha256=" in last_line()
    assert (out / "r.jsonl").read_bytes() == before
    assert main([*args, "--dataset", str(dataset), "--end", "3"]) == 0  # the same dataset extends the run
