"""detect/screen.py end to end on the lab: ranking, dedup, sharding (local shards, two processes, a submitit
array), kill and resume, confirmation without ground truth, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_cli, run_in_process

LAB = REPO / "data" / "lab"
MEMORIZED = [json.loads(line) for line in (LAB / "memorized.jsonl").read_text().splitlines()]
UNMEMORIZED = [json.loads(line) for line in (LAB / "unmemorized.jsonl").read_text().splitlines()]
WORDS = "red blue ship stone cloud river piano violin ocean tower".split()


@pytest.fixture(scope="module")
def caption_set(tmp_path_factory):
    """A parquet of the lab's memorized captions, re-spaced/re-cased copies of them, unmemorized captions and
    distractors; calibration captions (other unmemorized ones); a url→ground-truth map."""
    d = tmp_path_factory.mktemp("captions")
    caps, urls = [], []
    for r in MEMORIZED:
        caps += [r["caption"], "  " + r["caption"].upper().replace(" ", "   ") + " "]
        urls += [f"lab://{r['index']}", None]
    for r in UNMEMORIZED[:20]:
        caps.append(r["caption"])
        urls.append(None)
    for i in range(20):
        caps.append(" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(5)) + f" {i}")
        urls.append(None)
    pq.write_table(pa.table({"caption": caps, "url": urls}), d / "captions.parquet", row_group_size=8)
    (d / "cal.jsonl").write_text("".join(json.dumps({"caption": r["caption"]}) + "\n" for r in UNMEMORIZED[20:]))
    with open(d / "gt.jsonl", "w") as f:
        for r in MEMORIZED:
            for p in sorted((LAB / "gt_images" / str(r["index"])).iterdir()):
                f.write(json.dumps({"url": f"lab://{r['index']}", "path": str(p)}) + "\n")
    return d


def screen_args(d, out, *more):
    return ["--model", LAB, "--captions", d / "captions.parquet", "--calibration", d / "cal.jsonl", "--out", out,
            "--num_images_per_prompt", 2, "--batch_size", 8, "--no_progress", *more]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def scores_of(out):
    return {r["caption"]: r["score"] for r in read_jsonl(out / "screen.jsonl")}


@pytest.fixture(scope="module")
def confirmed_run(caption_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    res = run_cli("detect/screen.py", *screen_args(caption_set, out, "--top_k", 16, "--confirm_images", 8,
                                                   "--confirm_steps", 20, "--calibration_confirm", 12,
                                                   "--gt_map", caption_set / "gt.jsonl"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_screen_ranks_unique_captions_and_confirms_the_memorized_ones(confirmed_run):
    out, res = confirmed_run
    rows = read_jsonl(out / "screen.jsonl")
    assert len(rows) == 12 + 20 + 20  # each memorized caption and its re-spaced copy are one
    assert [r["rank"] for r in rows] == list(range(len(rows)))
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
    memorized = {r["caption"] for r in MEMORIZED}
    for r in rows:
        assert r["count"] == (2 if r["caption"] in memorized else 1)
    top = {r["caption"] for r in rows[:12]}
    assert len(top & memorized) >= 10  # the lab's detection AUC is 0.995
    table = pq.read_table(out / "screen.parquet").to_pylist()
    assert [t["caption"] for t in table] == [r["caption"] for r in rows]
    confirm = read_jsonl(out / "confirm.jsonl")
    assert len(confirm) == 16
    for r in confirm:
        assert (r["verdict"] == "memorized") == (r["caption"] in memorized), r
        assert len(r["images"]) == 8 and all((out / p).is_file() for p in r["images"])
        assert ("gt_sscd" in r) == (r["caption"] in memorized)
    nd = json.loads((out / "near_duplicate.json").read_text())
    assert nd["source"] == "calibrated" and nd["calibration_captions"] == 12 and nd["pairs"] == 12 * 28
    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold["calibration_captions"] == len(UNMEMORIZED) - 20
    assert all(r["above_threshold"] == (r["score"] > threshold["threshold"]) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["rows read"] == 64 and summary["counts"]["unique captions"] == 52
    html = (out / "report.html").read_text()
    assert html.count('class="memorized"') == sum(r["verdict"] == "memorized" for r in confirm)
    assert "report" in res.stdout and "captions/s" in res.stdout


def test_the_same_command_resumes_with_nothing_redone(confirmed_run, caption_set):
    out, _ = confirmed_run
    before = scores_of(out)
    res = run_in_process("detect/screen.py", *screen_args(caption_set, out, "--top_k", 16, "--confirm_images", 8,
                                                   "--confirm_steps", 20, "--calibration_confirm", 12,
                                                   "--gt_map", caption_set / "gt.jsonl"))
    assert res.returncode == 0 and " 0 scored now" in res.stdout, res.stderr[-2000:]
    assert scores_of(out) == before
    other = run_in_process("detect/screen.py", *screen_args(caption_set, out, "--seed", 1, "--confirm", "none"))
    assert other.returncode == 2 and "gen_seed=0 (now 1)" in other.stderr and len(other.stderr.splitlines()) == 1


def test_scores_do_not_depend_on_shards_order_or_batch(caption_set, confirmed_run, tmp_path):
    out = tmp_path / "shards"
    res = run_in_process("detect/screen.py", *screen_args(caption_set, out, "--confirm", "none", "--shards", 3,
                                                   "--batch_size", 5))
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((out / "parts").glob("screen-*.jsonl"))) == 3
    assert scores_of(out) == pytest.approx(scores_of(confirmed_run[0]), rel=1e-5)
    # Another order of the same captions: the same score per caption.
    rows = pq.read_table(caption_set / "captions.parquet").to_pylist()[::-1]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "reversed.parquet")
    rev = tmp_path / "rev"
    args = screen_args(caption_set, rev, "--confirm", "none", "--batch_size", 3)
    args[args.index("--captions") + 1] = tmp_path / "reversed.parquet"
    assert run_in_process("detect/screen.py", *args).returncode == 0
    want = scores_of(confirmed_run[0])
    got = scores_of(rev)
    from diffmem.common.t2i.screen.captions import normalize_caption

    assert {normalize_caption(k): v for k, v in got.items()} == pytest.approx(
        {normalize_caption(k): v for k, v in want.items()}, rel=1e-5)


def test_two_processes_give_the_same_scores(caption_set, confirmed_run, tmp_path):
    out = tmp_path / "mp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "detect/screen.py"),
           *map(str, screen_args(caption_set, out, "--confirm", "none"))]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert len([p for p in (out / "parts").glob("screen-*.jsonl") if p.read_text()]) == 2
    assert scores_of(out) == pytest.approx(scores_of(confirmed_run[0]), rel=1e-5)


def test_a_killed_run_resumes_with_each_caption_once(caption_set, tmp_path):
    out = tmp_path / "killed"
    args = screen_args(caption_set, out, "--confirm", "none", "--batch_size", 1, "--num_images_per_prompt", 4)
    proc = subprocess.Popen([sys.executable, str(REPO / "detect/screen.py"), *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    part = out / "parts" / "screen-00000.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and part.read_text().count("\n") >= 5:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = part.read_text().count("\n")
    assert 5 <= done < 52 and not (out / "screen.jsonl").exists()
    with open(part, "a") as f:
        f.write('{"id": 51, "sco')  # a write cut short by the kill
    res = run_in_process("detect/screen.py", *args)
    assert res.returncode == 0, res.stderr[-2000:]
    ids = [r["id"] for r in read_jsonl(part)]
    assert sorted(ids) == list(range(52))  # each unique caption exactly once
    assert f"{52 - done} scored now" in res.stdout


def test_a_slurm_array_through_submitit_scores_every_shard(caption_set, confirmed_run, tmp_path):
    out = tmp_path / "slurm"
    res = run_in_process("detect/screen.py", *screen_args(caption_set, out, "--top_k", 3, "--confirm_images", 4,
                                                   "--confirm_steps", 4, "--near_duplicate_threshold", 0.9,
                                                   "--launcher", "slurm", "--shards", 2, "--submitit_cluster",
                                                   "local"), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "submitted screen array" in res.stdout and "submitted confirm array" in res.stdout
    assert len(read_jsonl(out / "confirm.jsonl")) == 3 and (out / "submitit").is_dir()
    assert len([p for p in (out / "confirm" / "parts").glob("screen-*.jsonl") if p.read_text()]) == 2
    assert len([p for p in (out / "parts").glob("screen-*.jsonl") if p.read_text()]) == 2
    assert scores_of(out) == pytest.approx(scores_of(confirmed_run[0]), rel=1e-5)


def test_the_slurm_submission_asks_for_the_partition_gpus_and_array(tmp_path, monkeypatch):
    import submitit.slurm.slurm

    from diffmem.common.t2i.screen.config import ScreenConfig
    from diffmem.common.t2i.screen.files import ScreenFiles
    from diffmem.common.t2i.screen.launch import executor

    cfg = ScreenConfig(model_id="m", captions="c.txt", out=str(tmp_path), slurm_partition="gpu",
                       slurm_gpus_per_task=2, slurm_parallelism=4, timeout_min=90)
    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    ex = executor(cfg, ScreenFiles(tmp_path), "screen")
    text = ex._executor._make_submission_file_text("python -m submitit.core._submit X", "UID")
    for want in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                 "#SBATCH --job-name=diffmem-screen-screen"):
        assert want in text, text
    assert ex._executor.parameters["array_parallelism"] == 4


@pytest.mark.parametrize("make, more, expected", [
    (lambda d: (d / "c.parquet").write_bytes(b"junk"), [], "not a readable parquet file"),
    (lambda d: pq.write_table(pa.table({"caption": ["ok", None]}), d / "c.parquet"), [],
     "c.parquet:row 1: expected the caption to be a string, got null"),
    (lambda d: pq.write_table(pa.table({"title": ["ok"]}), d / "c.parquet"), [], "no caption column"),
    (lambda d: (d / "c.parquet").write_bytes(b""), ["--fpr", "1.5"], "--fpr is a rate in (0, 1)"),
    (lambda d: (d / "c.parquet").write_bytes(b""), ["--confirm", "above"], "--confirm above needs --calibration"),
    (lambda d: (d / "c.parquet").write_bytes(b""), ["--min_cluster", "1"], "--min_cluster must be in 2.."),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, make, more, expected):
    make(tmp_path)
    out = tmp_path / "out"
    res = run_in_process("detect/screen.py", "--model", LAB, "--captions", tmp_path / "c.parquet", "--out", out,
                  "--near_duplicate_threshold", "0.9", *more)
    assert res.returncode == 2 and expected in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


def test_skip_bad_rows_lists_them(tmp_path):
    pq.write_table(pa.table({"caption": ["a red cat near the sea", None, "  "]}), tmp_path / "c.parquet")
    out = tmp_path / "out"
    res = run_in_process("detect/screen.py", "--model", LAB, "--captions", tmp_path / "c.parquet", "--out", out,
                  "--confirm", "none", "--skip_bad_rows", "--no_progress")
    assert res.returncode == 0, res.stderr[-2000:]
    skipped = read_jsonl(out / "captions" / "screen.skipped.jsonl")
    assert [s["where"].rsplit(":", 1)[1] for s in skipped] == ["row 1", "row 2"]
    assert len(read_jsonl(out / "screen.jsonl")) == 1
