"""detect/emm.py and common.edm.emm.sweep: the bisection on synthetic ratios, resume of a hand-built sweep folder,
the launchers (fake stages in threads, submitit's local executor), the real tiny sweep, and bad input."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import ONE_THREAD, REPO, run_cli

from diffmem.common.edm.emm.launch import LocalLauncher, NodeInfo, SizeJob, Stage, stage_command
from diffmem.common.edm.emm.search import (
    EXIT_BRACKETED,
    EXIT_FAILED,
    EXIT_NOT_BRACKETED,
    bisect_sizes,
    bracket_indices,
    effective_model_memorization,
    estimate,
    order_warnings,
    plan_round,
    spread,
)
from diffmem.common.edm.emm.state import SweepSettings, bind_settings, scan_size, size_paths
from diffmem.common.edm.emm.sweep import LaunchConfig, SweepBusyError, SweepConfig, build_job, run_sweep
from diffmem.common.errors import ConfigError

GRID = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]

# A test double of the three stage scripts: writes each stage's output; the measured ratio is 0.97 up to
# FAKE_EMM and 0.4 above; FAKE_FAIL=16,64 makes those sizes' training fail; every call goes to FAKE_CALLS.
FAKE_STAGE = r'''
import json, os, re, sys
from pathlib import Path
a = sys.argv[1:]
if "--check_args" in a:  # the argument check every stage script offers: nothing to do for the double
    sys.exit(0)
stage = "data" if "--dest" in a else "train" if "--outdir" in a else "mem"
path = a[a.index({"data": "--dest", "train": "--outdir", "mem": "--expdir"}[stage]) + 1]
size = int(re.search(r"size-(\d+)", path).group(1))
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({"stage": stage, "size": size, "argv": a}) + "\n")
if stage == "train" and str(size) in os.environ.get("FAKE_FAIL", "").split(","):
    sys.exit("fake training failed")
if stage == "data":
    Path(path).write_bytes(b"fake zip")
elif stage == "train":
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "train_summary.json").write_text("{}")
else:
    ratio = 0.97 if size <= int(os.environ.get("FAKE_EMM", "32")) else 0.4
    (Path(path) / "mem_ratio_summary.json").write_text(json.dumps(
        {"max_ratio": ratio, "max_snapshot": "snapshot-000000080", "max_images_seen": 80, "n": 8}))
'''


def falling(emm: int):
    """A synthetic max ratio that falls with |D| and crosses 0.9 just above emm."""
    return lambda n: 0.99 if n <= emm else 0.5 * emm / n


def counting(ratio):
    """measure() for bisect_sizes over a ratio function, keeping the rounds it was asked for."""
    rounds = []

    def measure(sizes):
        rounds.append(list(sizes))
        return {n: ratio(n) for n in sizes}

    return measure, rounds


# ------------------------------------------------------------------------------------------------ bisection

def test_emm_is_the_largest_size_at_or_above_the_threshold():
    ratios = {16: 0.99, 32: 0.95, 64: 0.5, 128: None}  # 128 failed: no result
    assert effective_model_memorization(ratios, 0.9) == 32
    assert effective_model_memorization({8: 0.9, 16: 0.8999}, 0.9) == 8  # the threshold itself counts
    assert effective_model_memorization({16: 0.5, 32: 0.95, 64: 0.2}, 0.9) == 32  # non-monotone: still the largest
    assert effective_model_memorization({16: 0.5, 32: None}, 0.9) is None
    assert effective_model_memorization({}, 0.9) is None


def test_spread_and_bracket_indices_on_hand_made_grids():
    assert spread([1, 2, 3, 4, 5, 6, 7], 1) == [4]  # the middle: plain bisection
    assert spread([1, 2, 3, 4, 5, 6, 7], 3) == [2, 4, 6]  # quarter points
    assert spread([1, 2, 3, 4], 1) == [2]  # even count: the lower middle
    assert spread([5, 6], 4) == [5, 6] and spread([], 1) == []
    grid = [8, 16, 32, 64, 128]
    assert bracket_indices(grid, {}, 0.9) == (-1, 5)  # nothing measured: the whole grid is open
    assert bracket_indices(grid, {16: 0.95, 128: 0.1}, 0.9) == (1, 4)
    assert bracket_indices(grid, {16: 0.95, 64: 0.3, 128: 0.1}, 0.9) == (1, 3)  # the nearest measured above
    assert bracket_indices(grid, {16: 0.5, 32: None}, 0.9) == (-1, 1)  # a failed size bounds nothing
    assert bracket_indices(grid, {128: 0.91}, 0.9) == (4, 5)


@pytest.mark.parametrize("true_emm", GRID[:-1])
def test_bisection_brackets_every_crossing_in_log2_measurements(true_emm):
    measure, rounds = counting(falling(true_emm))
    est, results = bisect_sizes(GRID, 0.9, measure)
    i = GRID.index(true_emm)
    assert (est.outcome, est.emm, est.bracket) == ("bracketed", true_emm, (true_emm, GRID[i + 1]))
    assert est.exit_code == EXIT_BRACKETED and est.warnings == []
    assert all(len(r) == 1 for r in rounds) and len(results) <= 4  # ceil(log2(len(GRID) + 1))
    assert rounds[0] == [256]  # starts in the middle of the grid
    assert f"EMM = {true_emm}" in est.message and f"|D|={GRID[i + 1]}" in est.message


def test_parallel_rounds_spread_over_the_bracket():
    measure, rounds = counting(falling(128))
    est, _ = bisect_sizes(GRID, 0.9, measure, k=3)
    assert rounds[0] == [32, 256, 1024]  # quarter points of the grid, measured at once
    assert rounds[1] == [64, 128]  # what is left of the bracket (32, 256)
    assert (est.emm, est.bracket) == (128, (128, 256))
    # K larger than what is left of the bracket: only the sizes inside it.
    assert plan_round([8, 16, 32], {8: 0.95, 32: 0.1}, 0.9, k=4).next == [16]


def test_grid_that_does_not_bracket_says_which_way_to_extend():
    est, results = bisect_sizes(GRID, 0.9, counting(lambda n: 0.99)[0])
    assert (est.outcome, est.emm, est.bracket) == ("above_grid", 4096, (4096, None))
    assert est.exit_code == EXIT_NOT_BRACKETED and len(results) <= 4
    assert "extend --sizes upwards (e.g. 8192)" in est.message and "EMM >= 4096" in est.message
    est, results = bisect_sizes(GRID, 0.9, counting(lambda n: 0.2)[0])
    assert (est.outcome, est.emm, est.bracket) == ("below_grid", None, (None, 16))
    assert est.exit_code == EXIT_NOT_BRACKETED and len(results) <= 4
    assert "smallest size |D|=16 is already below 90%" in est.message and "downwards (e.g. 8)" in est.message


def test_non_monotone_measurements_are_warned_and_the_rule_holds():
    # Round 1 (k=2) measures 64 and 512: 64 dips below the threshold, 512 is above it.
    bumpy = {16: 0.99, 32: 0.98, 64: 0.6, 128: 0.95, 256: 0.93, 512: 0.92, 1024: 0.3, 2048: 0.2, 4096: 0.1}
    measure, rounds = counting(bumpy.get)
    est, results = bisect_sizes(GRID, 0.9, measure, k=2)
    assert rounds[0] == [64, 512]
    assert (est.outcome, est.emm, est.bracket) == ("bracketed", 512, (512, 1024))
    assert len(est.warnings) == 1
    assert "|D|=64 is below the threshold (60.0%)" in est.warnings[0] and "|D|=512 (92.0%)" in est.warnings[0]
    assert order_warnings(GRID, {16: 0.95, 32: 0.97, 64: 0.2}, 0.9) == []  # a rise above it is no violation


def test_a_failed_size_the_bisection_needs_blocks_it():
    plan = plan_round(GRID, {256: None}, 0.9)
    assert (plan.next, plan.blocked) == ([], [256])
    est = estimate(GRID, {256: None}, 0.9, failures={256: "|D|=256: train exited 1; see S/size-256/train.log"})
    assert est.outcome == "blocked" and est.exit_code == EXIT_FAILED
    assert "size-256/train.log" in est.message and "--retry_failed" in est.message
    # With two candidates per round, the one that did not fail is still measured.
    assert plan_round(GRID, {64: None}, 0.9, k=2) == type(plan)(next=[512], blocked=[64])


# ------------------------------------------------------------------------------------------------ launch plumbing

def tiny_job(tmp_path, procs=1, nodes=1, port=None, config=None) -> SizeJob:
    p = size_paths(tmp_path, 8)
    stages = [Stage(s, [f"{s}.py", "--x"], p.output(s), p.log(s)) for s in ("data", "train", "mem")]
    return SizeJob(8, tmp_path, stages, "py", str(tmp_path), "submitit:slurm", procs, nodes, port, config)


def test_accelerate_launch_flags_for_gpus_and_nodes(tmp_path):
    data, train, mem = tiny_job(tmp_path).stages
    single = tiny_job(tmp_path)
    assert stage_command(single, train, NodeInfo()) == ["py", "train.py", "--x"]  # one process: plain python
    two_nodes = tiny_job(tmp_path, procs=4, nodes=2)
    node1 = NodeInfo(rank=1, num_nodes=2, main_host="gpu-a", port=31000)
    launch = ["py", "-m", "accelerate.commands.launch"]
    assert stage_command(two_nodes, train, node1) == [
        *launch, "--multi_gpu", "--num_processes", "8", "--num_machines", "2", "--machine_rank", "1",
        "--main_process_ip", "gpu-a", "--main_process_port", "31000", "train.py", "--x"]
    # The measurement shards its seeds over node 0's GPUs only, on a port of its own.
    assert stage_command(two_nodes, mem, NodeInfo(0, 2, "gpu-a", 31000)) == [
        *launch, "--multi_gpu", "--num_processes", "4", "--num_machines", "1", "--main_process_port", "31001",
        "mem.py", "--x"]
    assert stage_command(two_nodes, data, node1) == ["py", "data.py", "--x"]
    cfg = tiny_job(tmp_path, config="cpu.yaml")
    assert stage_command(cfg, train, NodeInfo()) == [*launch, "--config_file", "cpu.yaml", "train.py", "--x"]


class FakeStages:
    """Stage runner test double: writes the stage's output (ratio(size) for the measurement), records the call."""

    def __init__(self, ratio, fail=()):
        self.ratio, self.fail, self.calls = ratio, set(fail), []

    def __call__(self, argv, env, cwd, log, on_start):
        on_start(os.getpid())
        stage = "data" if "--dest" in argv else "train" if "--outdir" in argv else "mem"
        path = Path(argv[argv.index({"data": "--dest", "train": "--outdir", "mem": "--expdir"}[stage]) + 1])
        size = int(path.parent.name.split("-")[1]) if stage != "data" else int(argv[argv.index("--max_images") + 1])
        self.calls.append({"size": size, "stage": stage, "argv": argv,
                           "gpus": env.get("CUDA_VISIBLE_DEVICES"), "cwd": cwd})
        log.write_text(f"fake {stage}\n")
        if (size, stage) in self.fail:
            return 1
        if stage == "data":
            path.write_bytes(b"fake zip")
        elif stage == "train":
            path.mkdir(parents=True, exist_ok=True)
            (path / "train_summary.json").write_text("{}")
        else:
            (path / "mem_ratio_summary.json").write_text(json.dumps(
                {"max_ratio": self.ratio(size), "max_snapshot": "snapshot-000000080", "max_images_seen": 80, "n": 8}))
        return 0


def sweep_cfg(tmp_path, sizes, **launch) -> SweepConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE)
    scripts = {s: str(script) for s in ("data", "train", "mem")}
    return SweepConfig(outdir=tmp_path / "sweep", sizes=sizes,
                       settings=SweepSettings("digits", ["--resolution", "8"], ["--duration", "1"], ["--seeds", "0-7"]),
                       launch=LaunchConfig(scripts=scripts, **launch))


def finished(outdir, n, ratio):
    """A size with all three outputs on disk."""
    p = size_paths(outdir, n)
    p.run.mkdir(parents=True)
    p.data.write_bytes(b"zip")
    (p.run / "train_summary.json").write_text("{}")
    (p.run / "mem_ratio_summary.json").write_text(json.dumps(
        {"max_ratio": ratio, "max_snapshot": "snapshot-000000040", "max_images_seen": 40, "n": 8}))


def failed(outdir, n, stage="train"):
    """A size whose training failed, as run_size_job records it."""
    p = size_paths(outdir, n)
    p.run.mkdir(parents=True)
    p.data.write_bytes(b"zip")
    p.log(stage).write_text("Traceback ...\nRuntimeError: out of memory\n")
    p.status.write_text(json.dumps({"status": "failed", "stage": stage, "log": str(p.log(stage)), "exit": 1,
                                    "message": f"|D|={n}: {stage} exited 1; see {p.log(stage)}"}))


def test_resume_reruns_only_the_unfinished_size_and_reports_the_failed_one(tmp_path):
    cfg = sweep_cfg(tmp_path, [8, 16, 32, 64, 128])
    out = cfg.outdir
    finished(out, 32, 0.95)  # the first round's middle size: done
    failed(out, 16)  # not needed by the bisection once 32 is above the threshold
    p64 = size_paths(out, 64)  # the next one: trained halfway, a checkpoint but no train_summary.json
    (p64.run / "checkpoint-5").mkdir(parents=True)
    p64.data.write_bytes(b"zip")
    fake, said = FakeStages(lambda n: 0.5), []
    est = run_sweep(cfg, LocalLauncher(1, 1, gpus=[], runner=fake), say=said.append)
    assert [(c["size"], c["stage"]) for c in fake.calls] == [(64, "train"), (64, "mem")]
    train = fake.calls[0]["argv"]
    assert train[-2:] == ["--resume_from_checkpoint", "latest"] and train[train.index("--data") + 1] == str(p64.data)
    assert (est.outcome, est.emm, est.bracket, est.exit_code) == ("bracketed", 32, (32, 64), 0)
    doc = json.loads((out / "emm.json").read_text())
    by = {s["size"]: s for s in doc["sizes"]}
    assert by[16]["status"] == "failed" and by[16]["log"] == str(size_paths(out, 16).log("train"))
    assert by[32]["status"] == "done" and by[32]["max_ratio"] == 0.95 and by[32]["max_snapshot"] == "snapshot-000000040"
    assert by[64]["status"] == "done" and by[64]["max_ratio"] == 0.5
    assert by[8]["status"] == by[128]["status"] == "pending"
    assert doc["emm"] == 32 and doc["bracket"] == [32, 64] and doc["outcome"] == "bracketed"
    assert any("size-16: failed earlier, not counted" in line and "size-16/train.log" in line for line in said)
    assert any("size-64: launching, |D|=64: training unfinished, resumes" in line for line in said)
    rows = [json.loads(r) for r in (out / "jobs.jsonl").read_text().splitlines()]
    assert [(r["size"], r["stage"], r["event"], r["exit"]) for r in rows] == [
        (64, "train", "start", None), (64, "train", "end", 0), (64, "mem", "start", None), (64, "mem", "end", 0)]
    assert rows[0]["launcher"] == "local" and rows[0]["log"] == str(p64.log("train")) and rows[0]["job_id"]
    assert json.loads((out / "sweep.json").read_text())["train_args"] == ["--duration", "1"]
    assert (out / "emm.png").stat().st_size > 0
    # Everything needed is on disk now: a second run launches nothing.
    again = FakeStages(lambda n: 0.5)
    assert run_sweep(cfg, LocalLauncher(1, 1, gpus=[], runner=again), say=said.append).emm == 32
    assert again.calls == []


def test_a_needed_size_that_failed_stops_the_search_until_retried(tmp_path):
    cfg = sweep_cfg(tmp_path, [8, 16, 32, 64, 128])
    failed(cfg.outdir, 32)
    fake = FakeStages(lambda n: 0.95 if n <= 32 else 0.2)
    est = run_sweep(cfg, LocalLauncher(1, 1, gpus=[], runner=fake), say=lambda s: None)
    assert fake.calls == [] and est.outcome == "blocked" and est.exit_code == EXIT_FAILED
    assert str(size_paths(cfg.outdir, 32).log("train")) in est.message
    cfg.retry_failed = True
    est = run_sweep(cfg, LocalLauncher(1, 1, gpus=[], runner=fake), say=lambda s: None)
    assert [(c["size"], c["stage"]) for c in fake.calls[:2]] == [(32, "train"), (32, "mem")]
    assert (est.emm, est.bracket) == (32, (32, 64))
    # A stage that fails now is recorded with its log and exit code; the search stops on it.
    failing = sweep_cfg(tmp_path / "b", [8, 16, 32])
    est = run_sweep(failing, LocalLauncher(1, 1, gpus=[], runner=FakeStages(lambda n: 1.0, fail={(16, "train")})),
                    say=lambda s: None)
    status = json.loads(size_paths(failing.outdir, 16).status.read_text())
    assert status["status"] == "failed" and status["exit"] == 1 and status["log"].endswith("size-16/train.log")
    assert est.outcome == "blocked" and "size-16/train.log" in est.message


def test_a_size_still_running_elsewhere_is_not_started_twice(tmp_path):
    import socket
    import subprocess

    cfg = sweep_cfg(tmp_path, [8, 16, 32])
    p16 = size_paths(cfg.outdir, 16)  # the first round's size, left "running" by a sweep that was killed
    p16.root.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        p16.status.write_text(json.dumps({"status": "running", "stage": "train", "host": socket.gethostname(),
                                          "pid": 2 ** 22 + 1, "stage_pid": other.pid, "time": "earlier"}))
        fake = FakeStages(lambda n: 0.95)
        with pytest.raises(SweepBusyError, match=f"size-16 is still running \\(pid {other.pid} on"):
            run_sweep(cfg, LocalLauncher(1, 1, gpus=[], runner=fake), say=lambda s: None)
        assert json.loads((cfg.outdir / "emm.json").read_text())["sizes"][1]["status"] == "running"
    finally:
        other.kill()
        other.wait()
    # Its processes are gone: the size resumes.
    est = run_sweep(cfg, LocalLauncher(1, 1, gpus=[], runner=fake), say=lambda s: None)
    assert fake.calls[0]["size"] == 16 and est.outcome == "above_grid"


def test_parallel_local_jobs_get_distinct_gpus_and_ports(tmp_path):
    cfg = sweep_cfg(tmp_path, [8, 16, 32, 64, 128, 256, 512], max_parallel=3, gpus_per_job=2)
    fake = FakeStages(lambda n: 0.95 if n <= 64 else 0.1)
    launcher = LocalLauncher(3, 2, gpus=["0", "1", "2", "3", "4"], runner=fake)
    assert launcher.parallel == 2  # two slots of two GPUs; the fifth GPU stays unused
    run_sweep(cfg, launcher, say=lambda s: None)
    first = [c for c in fake.calls if c["stage"] == "train"][:2]
    assert sorted(c["gpus"] for c in first) == ["0,1", "2,3"]
    ports = [c["argv"][c["argv"].index("--main_process_port") + 1] for c in first]
    assert len(set(ports)) == 2
    assert all(c["argv"][1:5] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"]
               for c in first)


def test_a_crashed_submitit_job_is_recorded_failed_with_its_log(tmp_path):
    cfg = sweep_cfg(tmp_path, [8, 16], launcher="submitit", submitit_cluster="local")  # debug would open pdb
    est = run_sweep(cfg, python=str(tmp_path / "no-python"), say=lambda s: None)  # the job cannot start a stage
    status = json.loads(size_paths(cfg.outdir, 8).status.read_text())
    assert status["status"] == "failed" and status["stage"] == "job" and "FileNotFoundError" in status["message"]
    assert status["log"].startswith(str(cfg.outdir / "submitit"))
    assert est.outcome == "blocked" and status["log"] in est.message
    submits = [json.loads(r) for r in (cfg.outdir / "jobs.jsonl").read_text().splitlines()]
    assert [(r["size"], r["stage"], r["launcher"]) for r in submits] == [(8, "job", "submitit:local")]


def test_an_unreadable_ratio_summary_fails_the_size_with_its_path(tmp_path):
    finished(tmp_path, 8, 0.95)
    assert (scan_size(tmp_path, 8).status, scan_size(tmp_path, 8).max_snapshot) == ("done", "snapshot-000000040")
    summary = size_paths(tmp_path, 8).output("mem")
    for torn in ("{", json.dumps({"max_snapshot": "snapshot-000000040"}), json.dumps({"max_ratio": "high"})):
        summary.write_text(torn)
        state = scan_size(tmp_path, 8)
        assert state.status == "failed" and state.stage == "mem"
        assert state.message == f"|D|=8: {summary} is unreadable or has no max_ratio"


def test_settings_bind_once_their_outputs_exist(tmp_path):
    s = SweepSettings("digits", [], ["--duration", "1"], [])
    bind_settings(tmp_path, s)
    # Nothing produced yet: another setting is accepted and recorded.
    bind_settings(tmp_path, SweepSettings("digits", [], ["--duration", "2"], []))
    assert json.loads((tmp_path / "sweep.json").read_text())["train_args"] == ["--duration", "2"]
    (tmp_path / "size-8" / "run" / "checkpoint-5").mkdir(parents=True)
    bind_settings(tmp_path, SweepSettings("digits", [], ["--duration", "2"], ["--seeds", "0-7"]))  # mem: not yet
    with pytest.raises(ConfigError, match="train_args='--duration 2' \\(now '--duration 3'\\)"):
        bind_settings(tmp_path, SweepSettings("digits", [], ["--duration", "3"], ["--seeds", "0-7"]))


def test_job_commands_carry_the_sweep_settings(tmp_path):
    cfg = sweep_cfg(tmp_path, [8])
    job = build_job(cfg, 8, "py")
    data, train, mem = (s.argv[1:] for s in job.stages)
    p = size_paths(cfg.outdir, 8)
    assert data == ["--source", "digits", "--dest", str(p.data), "--max_images", "8", "--resolution", "8"]
    assert train == ["--data", str(p.data), "--outdir", str(p.run), "--duration", "1",
                     "--resume_from_checkpoint", "latest"]
    assert mem == ["--expdir", str(p.run), "--knn_ref", str(p.data), "--seeds", "0-7"]


def test_accelerate_config_is_a_file_or_a_shipped_configs_name(tmp_path):
    from diffmem.common.resources import accelerate_configs_dir

    cfg = sweep_cfg(tmp_path, [8], accelerate_config="cpu")  # found in the installation, from any folder
    cfg.validate()
    assert build_job(cfg, 8, "py").accelerate_config == str(accelerate_configs_dir() / "cpu.yaml")
    own = tmp_path / "mine.yaml"
    own.write_text("compute_environment: LOCAL_MACHINE\n")
    cfg = sweep_cfg(tmp_path, [8], accelerate_config=str(own))
    cfg.validate()
    assert build_job(cfg, 8, "py").accelerate_config == str(own)
    with pytest.raises(ConfigError, match=r"^--accelerate_config gpu9: no such accelerate config file, nor a "
                                          r"shipped one \(shipped: cpu, deepspeed_zero2, "):
        sweep_cfg(tmp_path, [8], accelerate_config="gpu9").validate()


# ------------------------------------------------------------------------------------------------ the CLI

def emm(*args, env=None, timeout=300):
    return run_cli("detect/emm.py", *args, env={"CUDA_VISIBLE_DEVICES": "", **ONE_THREAD, **(env or {})},
                   timeout=timeout)


@pytest.fixture
def fake_scripts(tmp_path):
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE)
    return f"--stage_scripts=data={script},train={script},mem={script}"


def calls_of(path):
    return [json.loads(r) for r in path.read_text().splitlines()] if path.exists() else []


def test_submitit_local_sweep_end_to_end_resumes_and_plots(tmp_path, fake_scripts):
    calls = tmp_path / "calls.jsonl"
    env = {"FAKE_CALLS": str(calls), "FAKE_EMM": "64"}
    sweep = tmp_path / "factor-a"
    args = ["--source", "digits", "--sizes", "16,32,64,128,256", "--outdir", sweep, "--launcher", "submitit",
            "--submitit_cluster", "local", "--max_parallel", "2", "--train_args", "--duration 1", fake_scripts]
    res = emm(*args, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "EMM = 64" in res.stdout and "|D|=128" in res.stdout
    doc = json.loads((sweep / "emm.json").read_text())
    assert (doc["emm"], doc["bracket"], doc["outcome"]) == (64, [64, 128], "bracketed")
    measured = sorted(s["size"] for s in doc["sizes"] if s["status"] == "done")
    assert measured == [32, 64, 128]  # round 1: 32 and 128 at once; round 2: 64
    rows = calls_of(sweep / "jobs.jsonl")
    submits = [r for r in rows if r["stage"] == "job"]
    assert sorted(r["size"] for r in submits) == [32, 64, 128] and all(r["job_id"] for r in submits)
    ends = [r for r in rows if r.get("event") == "end"]
    assert len(ends) == 9 and {r["launcher"] for r in ends} == {"submitit:local"} and {r["exit"] for r in ends} == {0}
    assert {r["job_id"] for r in ends} <= {r["job_id"] for r in submits}
    assert (sweep / "emm.png").stat().st_size > 0 and (sweep / "submitit").is_dir()
    n_calls = len(calls_of(calls))
    assert n_calls == 9
    # The same command again reuses every finished stage.
    res = emm(*args, env=env)
    assert res.returncode == 0 and "EMM = 64" in res.stdout and len(calls_of(calls)) == n_calls
    # Another factor setting (here: a lower EMM), then both on one figure.
    other = tmp_path / "factor-b"
    res = emm(*args[:5], other, *args[6:], env={**env, "FAKE_EMM": "16"})
    assert res.returncode == 0 and "EMM = 16" in res.stdout
    res = emm("plot", sweep, other, "--out", tmp_path / "both.png")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "both.png").stat().st_size > 0


def test_cli_failure_exit_code_names_the_log_and_grid_extension(tmp_path, fake_scripts):
    calls = tmp_path / "calls.jsonl"
    sweep = tmp_path / "sweep"
    args = ["--source", "digits", "--sizes", "8,16,32", "--outdir", sweep, fake_scripts]
    res = emm(*args, env={"FAKE_CALLS": str(calls), "FAKE_FAIL": "16"})
    assert res.returncode == EXIT_FAILED, res.stdout + res.stderr
    assert f"{sweep / 'size-16' / 'train.log'}" in res.stdout and "--retry_failed" in res.stdout
    assert json.loads((sweep / "emm.json").read_text())["sizes"][1]["status"] == "failed"
    # Rerun without --retry_failed: the failure is reported again, nothing is relaunched.
    n = len(calls_of(calls))
    res = emm(*args, env={"FAKE_CALLS": str(calls)})
    assert res.returncode == EXIT_FAILED and len(calls_of(calls)) == n
    res = emm(*args, "--retry_failed", env={"FAKE_CALLS": str(calls), "FAKE_EMM": "64"})
    assert res.returncode == EXIT_NOT_BRACKETED, res.stdout + res.stderr
    assert "extend --sizes upwards (e.g. 64)" in res.stdout
    # Different settings once results exist: refused with one line.
    res = emm(*args, "--mem_args", "--seeds 0-3", env={"FAKE_CALLS": str(calls)})
    assert res.returncode == 2 and "sweep.json" in res.stderr and "mem_args" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--sizes", "16,8"], "strictly increasing"),
    (["--sizes", "0,8"], "positive"),
    (["--sizes", "8,x"], "comma-separated integers"),
    (["--threshold", "90"], "fraction in (0, 1]"),
    (["--threshold", "0"], "fraction in (0, 1]"),
    (["--train_args", "--lr '1e-3"], "--train_args"),
    (["--source", "no-such-source"], "unknown source"),
    (["--train_args", "--outdir elsewhere"], "must not set --outdir"),
    (["--mem_args", "--knn_ref x.zip"], "must not set --knn_ref"),
    (["--nodes_per_job", "2"], "needs --launcher submitit --submitit_cluster slurm"),
    (["--max_parallel", "0"], "--max_parallel must be >= 1"),
    (["--gpus_per_job", "2"], "no GPU is visible"),
    (["--stage_scripts", "eval=x.py"], "--stage_scripts"),
    # Each stage's own parser, before anything starts (no dataset built, no model trained first).
    (["--train_args", "--bogus 3"], "--train_args: the train stage (train_unconditional.py) refuses its arguments: "
                                    "train_unconditional.py: error: unrecognized argument --bogus (see --help)"),
    (["--mem_args", "--seeds 5-2"],
     "--mem_args: the mem stage (mem_ratio.py) refuses its arguments: mem_ratio: error:"),
    (["--dataset_args", "--resolution x"], "--dataset_args: the data stage (dataset_tool.py) refuses its arguments"),
    (["--train_args", "--dropout 1.5"], "--dropout must be in [0, 1)"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, message):
    base = {"--source": "digits", "--sizes": "8,16", "--outdir": str(tmp_path / "s")}
    flags = dict(zip(extra[::2], extra[1::2]))
    res = emm(*[x for k, v in {**base, **flags}.items() for x in (k, v)])
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_plot_of_a_folder_without_results_is_one_line(tmp_path):
    res = emm("plot", tmp_path, "--out", tmp_path / "x.png")
    assert res.returncode == 2 and "emm.json: no such file" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ the real stages

TINY_TRAIN = ("--num_channels 8 --channel_mult 1,2 --num_blocks 1 --attn_resolutions 0 --dropout 0 --batch 8 "
              "--duration 0.00008 --snap 0.04 --report_to none --no_progress")


@pytest.mark.skipif(not (REPO / "detect" / "mem_ratio.py").exists(), reason="detect/mem_ratio.py not built yet")
def test_real_tiny_sweep_through_submitit_local(tmp_path):
    sweep = tmp_path / "digits8"
    t0 = time.monotonic()
    res = emm("--source", "digits", "--sizes", "8,16", "--outdir", sweep, "--launcher", "submitit",
              "--submitit_cluster", "local", "--max_parallel", "2", "--dataset_args", "--resolution 8 --labels none",
              "--train_args", TINY_TRAIN, "--mem_args=--seeds 0-7", timeout=900)
    elapsed = time.monotonic() - t0
    print(f"real tiny sweep: {elapsed:.0f} s")
    assert res.returncode in (EXIT_BRACKETED, EXIT_NOT_BRACKETED), res.stdout + res.stderr
    doc = json.loads((sweep / "emm.json").read_text())
    assert [s["status"] for s in doc["sizes"]] == ["done", "done"]  # both sizes in the first round
    for s in doc["sizes"]:
        assert 0.0 <= s["max_ratio"] <= 1.0 and s["n"] == 8 and s["max_snapshot"].startswith("snapshot-")
        run = Path(s["run"])
        assert sorted(p.name for p in run.glob("snapshot-*")) == ["snapshot-000000040", "snapshot-000000080"]
        assert (run / "train_summary.json").exists() and Path(s["data"]).exists()
    rows = calls_of(sweep / "jobs.jsonl")
    ends = {(r["size"], r["stage"]): r for r in rows if r.get("event") == "end"}
    assert set(ends) == {(n, st) for n in (8, 16) for st in ("data", "train", "mem")}
    assert all(r["exit"] == 0 for r in ends.values())
    assert ends[(8, "train")]["command"].endswith("--resume_from_checkpoint latest")
    assert sys.executable in ends[(8, "train")]["command"]
    assert doc["outcome"] in ("bracketed", "below_grid", "above_grid") and doc["message"] in res.stdout
