"""Effective Model Memorization (EMM) search: the largest |D| whose max memorization ratio stays >= a threshold.

Gu et al. define EMM as the largest training-set size |D| at which the maximum memorization ratio over the
training snapshots is still >= 90 %, and search |D| by hand. Here one resumable sweep does it: for a size N it
runs three stages as subprocesses, each done once its output exists, with its log beside it:

    data   data/dataset_tool.py --source SRC --dest SWEEP/size-N/data.zip --max_images N <dataset_args>
                                                                        -> SWEEP/size-N/data.zip       (data.log)
    train  finetune/train_unconditional.py --data … --outdir SWEEP/size-N/run <train_args>
                                                  --resume_from_checkpoint latest
                                                                        -> SWEEP/size-N/run/train_summary.json
    mem    detect/mem_ratio.py --expdir SWEEP/size-N/run --knn_ref SWEEP/size-N/data.zip <mem_args>
                                                                        -> SWEEP/size-N/run/mem_ratio_summary.json

and picks the sizes by bisection on the grid (:func:`plan_round`): the ratio falls with |D|, so it looks for
adjacent grid sizes a < b with ratio(a) >= threshold > ratio(b), measuring as few sizes as possible. A job that
fails is recorded in ``SWEEP/size-N/status.json`` (stage, exit code, log) and never counts as a result; a job
that was stopped (no failure recorded) resumes where it was, training from its latest checkpoint.

Launchers: :class:`LocalLauncher` (threads on this machine, at most max_parallel sizes at once, each with its own
GPUs and rendezvous port) and :class:`SubmititLauncher` (one submitit job per size: Slurm, or submitit's local
and debug executors). Records: ``sweep.json`` (the settings every result depends on), ``jobs.jsonl`` (every stage
started and ended), ``emm.json`` and ``emm.png`` (per-size results and the estimate).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import submitit

from common.errors import ConfigError, DiffmemError
from common.results import append_results, write_json_atomic

REPO = Path(__file__).resolve().parents[2]
STAGES = ("data", "train", "mem")
DEFAULT_SCRIPTS = {"data": str(REPO / "data" / "dataset_tool.py"),
                   "train": str(REPO / "finetune" / "train_unconditional.py"),
                   "mem": str(REPO / "detect" / "mem_ratio.py")}
LAUNCHERS = ("local", "submitit")
CLUSTERS = ("slurm", "local", "debug")
# Flags the sweep sets itself for each stage; a user value would silently fight it.
RESERVED_FLAGS = {"dataset_args": ("--source", "--dest", "--max_images"),
                  "train_args": ("--data", "--outdir", "--resume_from_checkpoint"),
                  "mem_args": ("--expdir", "--knn_ref", "--outdir", "--images")}
# Which stage output each setting produces: a setting may change until such an output exists.
SETTING_OUTPUT = {"source": "data", "dataset_args": "data", "train_args": "train", "mem_args": "mem",
                  "threshold": "mem"}
SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                "REQUEUE_HOLD", "REQUEUE_FED"}
EXIT_BRACKETED, EXIT_FAILED, EXIT_NOT_BRACKETED = 0, 1, 3


class SweepBusyError(DiffmemError):
    """A size is still being worked on by another process or job; str() is the one-line message."""


# ---------------------------------------------------------------------------------------------------- settings

@dataclass
class SweepSettings:
    """What every result of a sweep depends on; recorded in SWEEP/sweep.json."""
    source: str
    dataset_args: list[str] = field(default_factory=list)
    train_args: list[str] = field(default_factory=list)
    mem_args: list[str] = field(default_factory=list)
    threshold: float = 0.9


@dataclass
class LaunchConfig:
    """How stage jobs run: where, how many at once, on how many GPUs and nodes."""
    launcher: str = "local"
    max_parallel: int = 1
    gpus_per_job: int = 1
    nodes_per_job: int = 1
    submitit_cluster: str = "slurm"
    slurm_partition: str | None = None
    timeout_min: int = 1440
    accelerate_config: str | None = None
    scripts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SCRIPTS))


@dataclass
class SweepConfig:
    """One factor setting's EMM search: the grid of sizes, the settings, the launch and the output folder."""
    outdir: Path
    sizes: list[int]
    settings: SweepSettings
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    retry_failed: bool = False
    cwd: str = field(default_factory=os.getcwd)


def flag_present(args: list[str], flag: str) -> bool:
    """Whether an argument list sets flag (``--flag V`` or ``--flag=V``)."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def check_config(cfg: SweepConfig) -> None:
    """Raise ConfigError with a one-line message for settings that cannot run."""
    sizes, s, launch = cfg.sizes, cfg.settings, cfg.launch
    if not sizes:
        raise ConfigError("--sizes: give at least one size")
    if min(sizes) < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ConfigError(f"--sizes must be positive and strictly increasing, got {','.join(map(str, sizes))}")
    if not 0.0 < s.threshold <= 1.0:
        raise ConfigError(f"--threshold is a fraction in (0, 1] (0.9 = 90 %), got {s.threshold:g}")
    if s.source != "digits" and not Path(s.source).exists():
        raise ConfigError(f"--source {s.source}: unknown source (expected 'digits', a CIFAR-10 tarball, "
                          f"an image folder or an EDM zip)")
    for name, flags in RESERVED_FLAGS.items():
        for flag in flags:
            if flag_present(getattr(s, name), flag):
                raise ConfigError(f"--{name} must not set {flag}: the sweep sets it for every size")
    if launch.launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launch.launcher}")
    if launch.submitit_cluster not in CLUSTERS:
        raise ConfigError(f"--submitit_cluster must be one of {', '.join(CLUSTERS)}, got {launch.submitit_cluster}")
    for name in ("max_parallel", "gpus_per_job", "nodes_per_job", "timeout_min"):
        if getattr(launch, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(launch, name)}")
    if launch.nodes_per_job > 1 and (launch.launcher, launch.submitit_cluster) != ("submitit", "slurm"):
        raise ConfigError("--nodes_per_job > 1 needs --launcher submitit --submitit_cluster slurm")
    if launch.accelerate_config is not None and not Path(launch.accelerate_config).is_file():
        raise ConfigError(f"--accelerate_config {launch.accelerate_config}: no such file")
    for stage in STAGES:
        if not Path(launch.scripts[stage]).is_file():
            raise ConfigError(f"{launch.scripts[stage]}: the {stage} stage's script is missing")
    if cfg.outdir.exists() and not cfg.outdir.is_dir():
        raise ConfigError(f"--outdir {cfg.outdir} is a file; expected a sweep folder")


CHECK_ARGS = "--check_args"  # every stage script: parse and check its arguments, then exit; nothing read or written
ARGS_FLAG = {"data": "--dataset_args", "train": "--train_args", "mem": "--mem_args"}


def check_stage_args(cfg: SweepConfig, python: str = sys.executable, timeout_s: float = 300.0) -> None:
    """Each stage's arguments through that stage's own parser and checks, before anything starts.

    The stage scripts run with the very arguments the sweep will give them (for the smallest size) plus
    ``--check_args``, all three at once: a stage's argument error then stops the sweep at once rather than after
    the stages before it (a dataset built, a model trained). ConfigError names the stage and quotes its one line.
    The scripts run as subprocesses: a CLI folder is no library to import.
    """
    job = build_job(cfg, cfg.sizes[0], python)
    procs = []
    try:
        for stage in job.stages:
            procs.append((stage, subprocess.Popen([python, *stage.argv, CHECK_ARGS], cwd=cfg.cwd, text=True,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        for stage, proc in procs:
            try:
                _, err = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise ConfigError(f"{ARGS_FLAG[stage.name]}: the {stage.name} stage's argument check "
                                  f"({Path(stage.argv[0]).name} {CHECK_ARGS}) did not end in {timeout_s:.0f}s") from None
            if proc.returncode != 0:
                lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
                said = lines[-1] if lines else f"exit code {proc.returncode}"
                raise ConfigError(f"{ARGS_FLAG[stage.name]}: the {stage.name} stage ({Path(stage.argv[0]).name}) "
                                  f"refuses its arguments: {said}")
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def settings_record(settings: SweepSettings) -> dict:
    """sweep.json's content: the settings, with a source path made absolute so the record survives a cd."""
    record = asdict(settings)
    if settings.source != "digits":
        record["source"] = str(Path(settings.source).resolve())
    return record


def stage_output_exists(outdir: Path, stage: str) -> bool:
    """Whether any size folder of the sweep holds output of this stage (a started training counts)."""
    for folder in outdir.glob("size-*"):
        run = folder / "run"
        if stage == "data" and (folder / "data.zip").exists():
            return True
        if stage == "train" and run.is_dir() and (any(run.glob("checkpoint-*")) or any(run.glob("snapshot-*"))):
            return True
        if stage == "mem" and (run / "mem_ratio_summary.json").exists():
            return True
    return False


def bind_settings(outdir: Path, settings: SweepSettings) -> None:
    """Record the settings in sweep.json; refuse ones that differ from a record whose outputs exist."""
    path = outdir / "sweep.json"
    new = settings_record(settings)
    if path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in new if old.get(k) != new[k]]
        bound = [k for k in changed if stage_output_exists(outdir, SETTING_OUTPUT[k])]
        if bound:
            what = ", ".join(f"{k}={show_setting(old.get(k))} (now {show_setting(new[k])})" for k in bound)
            raise ConfigError(f"{path}: this sweep has results made with {what}; use another --outdir")
        if not changed:
            return
    outdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, new)


def show_setting(value) -> str:
    """A setting as the user typed it: argument lists shell-joined."""
    return repr(shlex.join(value)) if isinstance(value, list) else repr(value)


# ---------------------------------------------------------------------------------------------------- bisection

@dataclass
class Plan:
    """The sizes to measure next, and the needed sizes that cannot be measured because they failed."""
    next: list[int]
    blocked: list[int]


@dataclass
class Estimate:
    """The search's answer: EMM (largest measured size >= threshold), its bracket and a one-line message."""
    outcome: str  # bracketed | below_grid | above_grid | blocked | searching
    emm: int | None
    bracket: tuple[int | None, int | None]
    message: str
    warnings: list[str]

    @property
    def exit_code(self) -> int:
        """0 bracketed, 3 when the grid must be extended, 1 when a needed size failed (or is unfinished)."""
        if self.outcome == "bracketed":
            return EXIT_BRACKETED
        return EXIT_NOT_BRACKETED if self.outcome in ("below_grid", "above_grid") else EXIT_FAILED


def bracket_indices(sizes: list[int], results: dict[int, float | None], threshold: float) -> tuple[int, int]:
    """(lo, hi): lo = index of the largest measured size >= threshold (-1 if none), hi = the next measured index."""
    measured = [i for i, n in enumerate(sizes) if results.get(n) is not None]
    lo = max((i for i in measured if results[sizes[i]] >= threshold), default=-1)
    hi = min((i for i in measured if i > lo), default=len(sizes))
    return lo, hi


def spread(candidates: list, k: int) -> list:
    """k of the candidates evenly inside them (the middle one for k = 1), in order."""
    m, k = len(candidates), min(k, len(candidates))
    return [candidates[(j * (m + 1)) // (k + 1) - 1] for j in range(1, k + 1)]


def plan_round(sizes: list[int], results: dict[int, float | None], threshold: float, k: int = 1) -> Plan:
    """The next round of the bisection: k sizes spread over the open bracket; failed ones (None) are blocked."""
    lo, hi = bracket_indices(sizes, results, threshold)
    picks = spread(sizes[lo + 1:hi], k)
    blocked = [n for n in picks if n in results]  # in results but no ratio: failed
    return Plan(next=[n for n in picks if n not in results], blocked=blocked)


def order_warnings(sizes: list[int], results: dict[int, float | None], threshold: float) -> list[str]:
    """One warning per measured size below the threshold that is smaller than a size at or above it."""
    done = [(n, results[n]) for n in sizes if results.get(n) is not None]
    out = []
    for n, r in done:
        above = [(m, q) for m, q in done if m > n and q >= threshold]
        if r < threshold and above:
            larger = ", ".join(f"|D|={m} ({q:.1%})" for m, q in above)
            out.append(f"non-monotone: |D|={n} is below the threshold ({r:.1%}) but larger {larger} "
                       f"are not; EMM takes the largest size at or above it")
    return out


def estimate(sizes: list[int], results: dict[int, float | None], threshold: float, k: int = 1,
             failures: dict[int, str] | None = None) -> Estimate:
    """The estimate from the measurements so far, with the message the sweep ends on."""
    lo, hi = bracket_indices(sizes, results, threshold)
    plan = plan_round(sizes, results, threshold, k)
    a = sizes[lo] if lo >= 0 else None
    b = sizes[hi] if hi < len(sizes) else None
    warnings = order_warnings(sizes, results, threshold)
    count = sum(r is not None for n, r in results.items() if n in sizes)
    measured = f"{count} of {len(sizes)} sizes measured"
    if plan.next:
        return Estimate("searching", a, (a, b), f"searching: next |D| {', '.join(map(str, plan.next))}", warnings)
    if plan.blocked:
        why = "; ".join((failures or {}).get(n, f"|D|={n} failed") for n in plan.blocked)
        return Estimate("blocked", a, (a, b), f"stopped: the bisection needs |D|={', '.join(map(str, plan.blocked))}"
                        f", which failed: {why}; fix it and rerun with --retry_failed", warnings)
    t = f"{threshold:.0%}"
    if a is None:
        r = results[sizes[0]]
        return Estimate("below_grid", None, (None, b), f"the grid does not bracket EMM: the smallest size "
                        f"|D|={b} is already below {t} ({r:.1%}); extend --sizes downwards (e.g. {max(b // 2, 1)}) "
                        f"({measured})", warnings)
    if b is None:
        return Estimate("above_grid", a, (a, None), f"the grid does not bracket EMM: the largest size |D|={a} is "
                        f"still at or above {t} ({results[a]:.1%}), so EMM >= {a}; extend --sizes upwards "
                        f"(e.g. {2 * a}) ({measured})", warnings)
    return Estimate("bracketed", a, (a, b), f"EMM = {a}: max ratio {results[a]:.1%} >= {t} at |D|={a}, "
                    f"{results[b]:.1%} < {t} at |D|={b} ({measured})", warnings)


def bisect_sizes(sizes: list[int], threshold: float, measure: Callable[[list[int]], dict[int, float | None]],
                 k: int = 1, results: dict[int, float | None] | None = None) -> tuple[Estimate, dict]:
    """Run the bisection: measure(sizes) -> {size: max ratio, or None if it failed} until nothing is left to do."""
    results = dict(results or {})
    while True:
        plan = plan_round(sizes, results, threshold, k)
        if not plan.next:
            return estimate(sizes, results, threshold, k), results
        got = measure(plan.next)
        results.update({n: got.get(n) for n in plan.next})  # a size measure() left out counts as failed


# ---------------------------------------------------------------------------------------------------- size folders

@dataclass(frozen=True)
class SizePaths:
    """Where one size's files lie: SWEEP/size-N/{data.zip, run/, status.json, <stage>.log}."""
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data.zip"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    def output(self, stage: str) -> Path:
        """The file whose existence marks the stage done."""
        return {"data": self.data, "train": self.run / "train_summary.json",
                "mem": self.run / "mem_ratio_summary.json"}[stage]

    def log(self, stage: str, node: int = 0) -> Path:
        """The stage's log (node > 0 of a multi-node job logs beside it)."""
        return self.root / (f"{stage}.log" if node == 0 else f"{stage}.node{node}.log")


def size_paths(outdir: Path, size: int) -> SizePaths:
    """The folder of size N in a sweep."""
    return SizePaths(Path(outdir) / f"size-{size}")


def read_status(path: Path) -> dict:
    """A size's status.json ({} when absent or torn)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_status(path: Path, **fields) -> None:
    """Replace a size's status.json, stamped with the time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**fields, "time": now()})


def now() -> str:
    """Local time, ISO format to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_active(status: dict, outdir: Path) -> bool:
    """Whether the process or Slurm job a 'running' status names is still alive."""
    if status.get("cluster") == "slurm" and status.get("job_id"):
        state = submitit.SlurmJob(folder=outdir / "submitit", job_id=str(status["job_id"])).state
        return state.split()[0] in SLURM_ACTIVE
    if status.get("host") != socket.gethostname():
        return False  # a local owner elsewhere cannot be checked; local runs are on this machine
    return any(pid_alive(p) for p in (status.get("pid"), status.get("stage_pid")) if p)


@dataclass
class SizeState:
    """One size as found on disk: status done|failed|pending|running, its result and where to look."""
    size: int
    status: str
    max_ratio: float | None = None
    max_snapshot: str | None = None
    max_images_seen: int | None = None
    n: int | None = None
    stage: str | None = None
    log: str | None = None
    message: str | None = None
    owner: dict | None = None

    def failure(self) -> str:
        """One line naming the failed stage, exit code and log."""
        return self.message or f"|D|={self.size}: {self.stage} failed; see {self.log}"


def scan_size(outdir: Path, size: int) -> SizeState:
    """The state of one size from its files: a measurement wins over any recorded status."""
    p = size_paths(outdir, size)
    summary_path = p.output("mem")
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
            ratio = float(summary["max_ratio"])
        except (OSError, ValueError, KeyError, TypeError):
            return SizeState(size, "failed", stage="mem", log=str(p.log("mem")),
                             message=f"|D|={size}: {summary_path} is unreadable or has no max_ratio")
        return SizeState(size, "done", ratio, summary.get("max_snapshot"), summary.get("max_images_seen"),
                         summary.get("n"), log=str(p.log("mem")))
    status = read_status(p.status)
    if status.get("status") == "failed":
        return SizeState(size, "failed", stage=status.get("stage"), log=status.get("log"),
                         message=status.get("message"))
    stage = next((s for s in STAGES if not p.output(s).exists()), "mem")
    if status.get("status") == "running" and owner_active(status, outdir):
        return SizeState(size, "running", stage=status.get("stage", stage), log=status.get("log"), owner=status)
    message = None
    checkpoints = sorted(p.run.glob("checkpoint-*"), key=lambda c: c.name) if p.run.is_dir() else []
    if stage == "train" and checkpoints:
        message = f"|D|={size}: training unfinished, resumes from its latest checkpoint"
    return SizeState(size, "pending", stage=stage, log=str(p.log(stage)), message=message)


def scan_sweep(outdir: Path, sizes: list[int]) -> dict[int, SizeState]:
    """Every grid size's state."""
    return {n: scan_size(outdir, n) for n in sizes}


def clear_failed(outdir: Path, sizes: list[int]) -> list[int]:
    """Forget recorded failures (--retry_failed): those sizes resume from their last finished stage."""
    cleared = []
    for n in sizes:
        p = size_paths(outdir, n)
        if read_status(p.status).get("status") == "failed":
            p.status.unlink()
            cleared.append(n)
    return cleared


# ---------------------------------------------------------------------------------------------------- jobs

@dataclass
class Stage:
    """One stage subprocess: the script and its arguments (no interpreter), its output and its log."""
    name: str
    argv: list[str]
    output: Path
    log: Path


@dataclass
class SizeJob:
    """Everything one size needs, picklable for submitit: its stages and how to launch them."""
    size: int
    outdir: Path
    stages: list[Stage]
    python: str
    cwd: str
    launcher: str  # local | submitit:<cluster>
    procs_per_node: int = 1  # training processes per node (GPUs, or 1 on the CPU)
    nodes: int = 1
    main_process_port: int | None = None
    accelerate_config: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def build_job(cfg: SweepConfig, size: int, python: str) -> SizeJob:
    """The three stages of one size with the sweep's settings (launch details are filled in by the launcher)."""
    s, scripts = cfg.settings, cfg.launch.scripts
    p = size_paths(cfg.outdir, size)
    source = settings_record(s)["source"]
    stages = [
        Stage("data", [scripts["data"], "--source", source, "--dest", str(p.data), "--max_images", str(size),
                       *s.dataset_args], p.output("data"), p.log("data")),
        Stage("train", [scripts["train"], "--data", str(p.data), "--outdir", str(p.run), *s.train_args,
                        "--resume_from_checkpoint", "latest"], p.output("train"), p.log("train")),
        Stage("mem", [scripts["mem"], "--expdir", str(p.run), "--knn_ref", str(p.data), *s.mem_args],
              p.output("mem"), p.log("mem")),
    ]
    return SizeJob(size=size, outdir=cfg.outdir, stages=stages, python=python, cwd=cfg.cwd,
                   launcher=cfg.launch.launcher, nodes=cfg.launch.nodes_per_job,
                   accelerate_config=cfg.launch.accelerate_config)


@dataclass
class NodeInfo:
    """This process's place in a (possibly multi-node) job and the rendezvous of its training."""
    rank: int = 0
    num_nodes: int = 1
    main_host: str = "127.0.0.1"
    port: int | None = None


def port_for(job_id: str) -> int:
    """A rendezvous port every node of a job derives alike from the job id (29500..49499)."""
    return 29500 + zlib.crc32(job_id.encode()) % 20000


def job_node(job: SizeJob) -> NodeInfo:
    """Node rank, node count and main address: from submitit's view of the Slurm job when it spans nodes."""
    if job.nodes == 1:
        port = job.main_process_port
        if port is None and job.procs_per_node > 1 and (job_id := current_job_id()) is not None:
            port = port_for(job_id)  # two Slurm jobs may share a node: not both on accelerate's default port
        return NodeInfo(port=port)
    env = submitit.JobEnvironment()
    return NodeInfo(rank=env.node, num_nodes=env.num_nodes, main_host=env.hostnames[0],
                    port=job.main_process_port or port_for(str(env.job_id)))


def uses_accelerate(job: SizeJob, stage: Stage) -> bool:
    """Training goes through accelerate launch when it spans processes or a config is given; the measurement
    (node 0 only) when the node has several GPUs, to shard the seeds."""
    if stage.name == "train":
        return job.procs_per_node * job.nodes > 1 or job.accelerate_config is not None
    return stage.name == "mem" and job.procs_per_node > 1


def accelerate_flags(job: SizeJob, node: NodeInfo, stage: Stage) -> list[str]:
    """accelerate launch's flags: the config, and for several processes their count, machine rank and rendezvous."""
    if stage.name == "mem":  # one machine, its own port: the training's may still be in TIME_WAIT
        node = NodeInfo(port=node.port + 1 if node.port is not None else None)
    flags = ["--config_file", job.accelerate_config] if job.accelerate_config and stage.name == "train" else []
    total = job.procs_per_node * node.num_nodes
    if total > 1:
        flags += ["--multi_gpu", "--num_processes", str(total), "--num_machines", str(node.num_nodes)]
        if node.num_nodes > 1:
            flags += ["--machine_rank", str(node.rank), "--main_process_ip", node.main_host]
        if node.port is not None:
            flags += ["--main_process_port", str(node.port)]
    return flags


def stage_command(job: SizeJob, stage: Stage, node: NodeInfo) -> list[str]:
    """The full command line of a stage on this node."""
    if uses_accelerate(job, stage):
        return [job.python, "-m", "accelerate.commands.launch", *accelerate_flags(job, node, stage), *stage.argv]
    return [job.python, *stage.argv]


class StageInterrupted(Exception):
    """The sweep was stopped while this stage ran; the size resumes on the next run."""


# A stage runner: (argv, env, cwd, log, on_start(pid)) -> exit code. Tests inject fakes.
StageRunner = Callable[[list[str], dict, str, Path, Callable[[int], None]], int]


class StageProcesses:
    """Runs stage subprocesses (output appended to the stage log) and can stop those it started."""

    def __init__(self, new_session: bool = True):
        # A session of their own lets Ctrl-C reach the sweep alone; stop_all then ends each group cleanly.
        self.new_session = new_session
        self.stopping = False
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def __call__(self, argv: list[str], env: dict, cwd: str, log: Path, on_start: Callable[[int], None]) -> int:
        """Run one stage to its end; its exit code. StageInterrupted when stop_all ended it."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"# {now()} {shlex.join(argv)}\n")
            f.flush()
            with self._lock:
                if self.stopping:
                    raise StageInterrupted()
                proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                        start_new_session=self.new_session)
                self._procs[proc.pid] = proc
            on_start(proc.pid)
            rc = proc.wait()
            with self._lock:
                self._procs.pop(proc.pid, None)
        if self.stopping:
            raise StageInterrupted()
        return rc

    def stop_all(self, grace_s: float = 30.0) -> None:
        """Stop every running stage: SIGTERM to its process group, SIGKILL after grace_s."""
        with self._lock:
            self.stopping = True
            procs = list(self._procs.values())
        for proc in procs:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)

    def _signal(self, proc: subprocess.Popen, sig: int) -> None:
        try:
            if self.new_session:
                os.killpg(proc.pid, sig)  # the stage's own group: accelerate's workers too
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            return  # it has already exited: nothing to signal


def current_job_id() -> str | None:
    """The submitit job id when running inside a submitit job, else None."""
    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return None


def log_stage(job: SizeJob, stage: str, command: list[str], log: Path, node: NodeInfo, **fields) -> None:
    """Append one row to SWEEP/jobs.jsonl."""
    append_results(job.outdir / "jobs.jsonl", [{
        "time": now(), "size": job.size, "stage": stage, "command": shlex.join(command), "launcher": job.launcher,
        "node": node.rank, "log": str(log), **fields}])


def wait_for_output(path: Path, status: Path, poll_s: float = 5.0) -> bool:
    """Wait until path exists (True) or the size's status says failed (False): other nodes wait for node 0."""
    while not path.exists():
        if read_status(status).get("status") == "failed":
            return False
        time.sleep(poll_s)
    return True


def run_size_job(job: SizeJob, runner: StageRunner, owner: dict) -> dict:
    """Run the unfinished stages of one size in order; record the status; returns that status.

    Node 0 does everything; the other nodes of a multi-node job wait for its dataset, join the training
    and leave the measurement to it.
    """
    node = job_node(job)
    paths = size_paths(job.outdir, job.size)
    env = {**os.environ, **job.env}
    job_id = owner.get("job_id")
    status = {"status": "running", **owner}
    for stage in job.stages:
        if stage.output.exists():
            continue
        if node.rank > 0:
            if stage.name == "data" and not wait_for_output(stage.output, paths.status):
                return {"status": "failed", "stage": "data"}
            if stage.name != "train":
                continue
        argv = stage_command(job, stage, node)
        log = paths.log(stage.name, node.rank)
        status.update(stage=stage.name, log=str(log))
        if node.rank == 0:
            write_status(paths.status, **status)

        pids: list[int] = []

        def started(pid: int, stage=stage, argv=argv, log=log) -> None:
            pids.append(pid)
            if node.rank == 0:
                write_status(paths.status, **status, stage_pid=pid)
            log_stage(job, stage.name, argv, log, node, event="start", job_id=job_id or str(pid), pid=pid,
                      exit=None)

        t0 = time.monotonic()
        try:
            rc = runner(argv, env, job.cwd, log, started)
        except StageInterrupted:
            if node.rank == 0:
                write_status(paths.status, status="interrupted", stage=stage.name, log=str(log))
            pid = pids[0] if pids else None
            log_stage(job, stage.name, argv, log, node, event="end", job_id=job_id or (pid and str(pid)), pid=pid,
                      exit=None, interrupted=True)
            raise
        pid = pids[0] if pids else None
        log_stage(job, stage.name, argv, log, node, event="end", job_id=job_id or (pid and str(pid)), pid=pid,
                  exit=rc, elapsed_s=round(time.monotonic() - t0, 1))
        if node.rank > 0:
            return {"status": "done" if rc == 0 else "failed", "stage": stage.name, "exit": rc}
        if rc != 0 or not stage.output.exists():
            what = f"exited {rc}" if rc != 0 else f"exited 0 but wrote no {stage.output.name}"
            final = {**status, "status": "failed", "exit": rc,
                     "message": f"|D|={job.size}: {stage.name} {what}; see {log}"}
            write_status(paths.status, **final)
            return final
    final = {**status, "status": "done", "stage": None, "log": None}
    if node.rank == 0:
        write_status(paths.status, **final)
    return final


class SizeJobFunction(submitit.helpers.Checkpointable):
    """A size's submitit job; after a timeout or preemption submitit requeues it and the stages resume."""

    def __call__(self, job: SizeJob) -> dict:
        owner = {"launcher": job.launcher, "cluster": job.launcher.split(":")[-1], "job_id": current_job_id(),
                 "host": socket.gethostname(), "pid": os.getpid()}
        # Inside a job the stages stay in its process group, so cancelling the job ends them too.
        return run_size_job(job, StageProcesses(new_session=False), owner)


# ---------------------------------------------------------------------------------------------------- launchers

def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and not g.strip().startswith("-")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_slots(gpus: list[str], per_job: int) -> list[list[str]]:
    """Disjoint groups of per_job GPUs (leftovers unused)."""
    return [gpus[i * per_job:(i + 1) * per_job] for i in range(len(gpus) // per_job)]


def pick_port(taken: set[int]) -> int:
    """A free TCP port on the loopback interface, with its successor (the measurement's), not yet handed out."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not {port, port + 1} & taken and port < 65535:
            taken.update((port, port + 1))
            return port


def slot_job(job: SizeJob, slot: list[str] | None, ports: set[int] | None) -> SizeJob:
    """The job bound to its GPUs (CUDA_VISIBLE_DEVICES) and, when it spans processes and ports are given, a port."""
    if slot is None:
        return replace(job, procs_per_node=1)
    port = pick_port(ports) if ports is not None and len(slot) > 1 else job.main_process_port
    return replace(job, procs_per_node=len(slot), env={**job.env, "CUDA_VISIBLE_DEVICES": ",".join(slot)},
                   main_process_port=port)


class LocalLauncher:
    """Runs sizes on this machine, at most `parallel` at once, each on its own GPUs (or the CPU)."""

    name = "local"
    can_attach = False

    def __init__(self, max_parallel: int, gpus_per_job: int, gpus: list[str] | None = None,
                 runner: StageRunner | None = None):
        gpus = visible_gpus() if gpus is None else gpus
        self.slots: list[list[str]] | None = gpu_slots(gpus, gpus_per_job) if gpus else None
        if gpus and not self.slots:
            raise ConfigError(f"--gpus_per_job {gpus_per_job}: only {len(gpus)} GPU(s) visible")
        if not gpus and gpus_per_job > 1:
            raise ConfigError(f"--gpus_per_job {gpus_per_job}: no GPU is visible (CPU runs use one process)")
        self.parallel = min(max_parallel, len(self.slots)) if self.slots else max_parallel
        self.processes = runner if runner is not None else StageProcesses()
        self.note = (f"local: {self.parallel} job(s) at once on {len(self.slots)} GPU slot(s) of {gpus_per_job}"
                     if self.slots else f"local: {self.parallel} job(s) at once on the CPU")

    def run(self, jobs: list[SizeJob], on_done: Callable[[int], None], attach: dict[int, str]) -> None:
        """Run the jobs in threads; call on_done(size) as each ends. Interrupted: stop the stages, re-raise."""
        owner = {"launcher": "local", "host": socket.gethostname(), "pid": os.getpid()}
        ports: set[int] = set()  # distinct rendezvous ports for the jobs running side by side
        with ThreadPoolExecutor(max_workers=max(len(jobs), 1)) as pool:
            futures = {}
            for i, job in enumerate(jobs):
                bound = slot_job(job, self.slots[i] if self.slots else None, ports)
                futures[pool.submit(run_size_job, bound, self.processes, owner)] = job.size
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        try:
                            fut.result()
                        except StageInterrupted:
                            continue
                        on_done(futures[fut])
            except BaseException:
                if isinstance(self.processes, StageProcesses):
                    self.processes.stop_all()
                raise


class SubmititLauncher:
    """One submitit job per size (Slurm, or submitit's local/debug executors); the same files as local runs."""

    name = "submitit"

    def __init__(self, outdir: Path, cluster: str, max_parallel: int, gpus_per_job: int, nodes_per_job: int,
                 timeout_min: int, slurm_partition: str | None = None, gpus: list[str] | None = None):
        self.folder = Path(outdir) / "submitit"
        self.cluster, self.gpus_per_job, self.nodes = cluster, gpus_per_job, nodes_per_job
        self.timeout_min, self.partition = timeout_min, slurm_partition
        self.can_attach = cluster == "slurm"
        # Slurm hands each job its GPUs; submitit's local executor would give every job the same ones.
        if cluster == "slurm":
            self.slots, self.parallel = [], max_parallel
        else:
            gpus = visible_gpus() if gpus is None else gpus
            self.slots = gpu_slots(gpus, gpus_per_job)
            if gpus and not self.slots:
                raise ConfigError(f"--gpus_per_job {gpus_per_job}: only {len(gpus)} GPU(s) visible")
            self.parallel = min(max_parallel, len(self.slots)) if self.slots else max_parallel
        where = {"slurm": f"Slurm partition {slurm_partition or '(default)'}", "local": "local processes",
                 "debug": "this process"}[cluster]
        per_job = (f"{gpus_per_job} GPU(s) × {nodes_per_job} node(s) each" if cluster == "slurm" or self.slots
                   else "on the CPU")
        self.note = f"submitit ({where}): up to {self.parallel} job(s) at once, {per_job}"

    def executor(self):
        """The AutoExecutor with the job's resources; the job processes import this checkout."""
        ex = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        setup = [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]
        params = {"timeout_min": self.timeout_min, "nodes": self.nodes, "tasks_per_node": 1}
        if self.cluster == "slurm":
            params.update(gpus_per_node=self.gpus_per_job, slurm_partition=self.partition, slurm_setup=setup)
        elif self.cluster == "local":
            params.update(gpus_per_node=0, local_setup=setup)  # GPUs go per job through SizeJob.env
        ex.update_parameters(**params)
        return ex

    def run(self, jobs: list[SizeJob], on_done: Callable[[int], None], attach: dict[int, str]) -> None:
        """Submit the jobs (or re-attach to still-running Slurm jobs), wait for each; a crashed job is failed."""
        ex = self.executor()
        launcher = f"submitit:{self.cluster}"
        handles = []
        for i, job in enumerate(jobs):
            paths = size_paths(job.outdir, job.size)
            if job.size in attach:
                handles.append((job, submitit.SlurmJob(folder=self.folder, job_id=attach[job.size])))
                continue
            slot = self.slots[i] if self.slots else None
            bound = replace(slot_job(job, slot, ports=None), launcher=launcher)
            if self.cluster == "slurm":
                bound = replace(bound, procs_per_node=self.gpus_per_job)
            ex.update_parameters(name=f"emm-size-{job.size}")
            handle = ex.submit(SizeJobFunction(), bound)
            write_status(paths.status, status="running", stage="submitted", launcher=launcher,
                         cluster=self.cluster, job_id=str(handle.job_id), host=socket.gethostname(),
                         pid=os.getpid() if self.cluster == "debug" else int_or_none(handle.job_id),
                         log=str(handle.paths.stderr))
            append_results(job.outdir / "jobs.jsonl", [{
                "time": now(), "size": job.size, "stage": "job", "event": "submit",
                "command": f"SizeJobFunction(size-{job.size}): {', '.join(s.name for s in job.stages)}",
                "launcher": launcher, "job_id": str(handle.job_id), "log": str(handle.paths.stdout), "exit": None}])
            handles.append((job, handle))
        for job, handle in handles:
            self._collect(job, handle)
            on_done(job.size)

    def _collect(self, job: SizeJob, handle) -> None:
        """Wait for one job; record a crash (not a stage failure, which the job records itself) as failed."""
        paths = size_paths(job.outdir, job.size)
        try:
            handle.results()
            return
        except Exception as exc:  # submitit re-raises whatever ended the job: the status must say so
            first = crash_line(exc)
        if scan_size(job.outdir, job.size).status not in ("done", "failed"):
            write_status(paths.status, status="failed", stage="job", log=str(handle.paths.stderr),
                         job_id=str(handle.job_id),
                         message=f"|D|={job.size}: submitit job {handle.job_id} crashed ({first}); "
                                 f"see {handle.paths.stderr}")


def crash_line(exc: Exception) -> str:
    """The exception line of the job's traceback inside submitit's error (or the error's type)."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    errors = [ln for ln in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln)]
    return (errors[-1] if errors else type(exc).__name__)[:300]


def int_or_none(text) -> int | None:
    """An integer id, or None (submitit's local job id is the controller's pid)."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def make_launcher(cfg: SweepConfig):
    """The launcher the config names."""
    launch = cfg.launch
    if launch.launcher == "local":
        return LocalLauncher(launch.max_parallel, launch.gpus_per_job)
    return SubmititLauncher(cfg.outdir, launch.submitit_cluster, launch.max_parallel, launch.gpus_per_job,
                            launch.nodes_per_job, launch.timeout_min, launch.slurm_partition)


# ---------------------------------------------------------------------------------------------------- the sweep

def results_of(states: dict[int, SizeState]) -> dict[int, float | None]:
    """The search's view of the states: a ratio per done size, None per failed one."""
    return {n: s.max_ratio for n, s in states.items() if s.status in ("done", "failed")}


def report(cfg: SweepConfig, states: dict[int, SizeState], est: Estimate) -> dict:
    """emm.json's content."""
    sizes = []
    for n, s in states.items():
        p = size_paths(cfg.outdir, n)
        sizes.append({"size": n, "data": str(p.data), "run": str(p.run), "status": s.status,
                      "max_ratio": s.max_ratio, "max_snapshot": s.max_snapshot,
                      "max_images_seen": s.max_images_seen, "n": s.n, "stage": s.stage, "log": s.log,
                      "message": s.message})
    return {"settings": settings_record(cfg.settings), "threshold": cfg.settings.threshold,
            "grid": list(cfg.sizes), "sizes": sizes, "emm": est.emm, "bracket": list(est.bracket),
            "outcome": est.outcome, "message": est.message, "warnings": est.warnings, "updated": now()}


def write_report(cfg: SweepConfig, k: int) -> tuple[Estimate, dict[int, SizeState]]:
    """Scan the sweep, write emm.json and emm.png; the estimate and the states."""
    states = scan_sweep(cfg.outdir, cfg.sizes)
    failures = {n: s.failure() for n, s in states.items() if s.status == "failed"}
    est = estimate(cfg.sizes, results_of(states), cfg.settings.threshold, k, failures)
    doc = report(cfg, states, est)
    write_json_atomic(cfg.outdir / "emm.json", doc)
    plot_curves([curve_from_report(doc, cfg.outdir.name)], cfg.outdir / "emm.png")
    return est, states


def run_sweep(cfg: SweepConfig, launcher=None, say: Callable[[str], None] = print, python: str | None = None,
              ) -> Estimate:
    """Search EMM for one factor setting; resumes whatever the sweep folder already holds."""
    check_config(cfg)
    cfg.outdir = Path(cfg.outdir).resolve()
    launcher = make_launcher(cfg) if launcher is None else launcher
    bind_settings(cfg.outdir, cfg.settings)
    k = launcher.parallel
    say(launcher.note)
    if cfg.retry_failed:
        for n in clear_failed(cfg.outdir, cfg.sizes):
            say(f"size-{n}: retrying (its failure record is cleared)")
    _, states = write_report(cfg, k)
    for s in states.values():
        if s.status == "failed":
            say(f"size-{s.size}: failed earlier, not counted: {s.failure()}")
        elif s.status == "done":
            say(f"size-{s.size}: max ratio {s.max_ratio:.1%} (reused)")

    def measure(sizes: list[int]) -> dict[int, float | None]:
        current = scan_sweep(cfg.outdir, cfg.sizes)
        busy = {n: current[n] for n in sizes if current[n].status == "running"}
        if busy and not launcher.can_attach:
            n, s = next(iter(busy.items()))
            o = s.owner or {}
            raise SweepBusyError(f"size-{n} is still running (pid {o.get('stage_pid') or o.get('pid')} on "
                                 f"{o.get('host')}, since {o.get('time')}): wait for it or stop it, then rerun")
        attach = {n: str(s.owner["job_id"]) for n, s in busy.items()}
        for n in sizes:
            why = current[n].message or f"from stage {current[n].stage}"
            say(f"size-{n}: {'waiting for running job ' + attach[n] if n in attach else 'launching, ' + why}")
        jobs = [build_job(cfg, n, python or sys.executable) for n in sizes]

        def done(n: int) -> None:
            s = scan_size(cfg.outdir, n)
            say(f"size-{n}: max ratio {s.max_ratio:.1%}" if s.status == "done" else f"size-{n}: {s.failure()}")
            write_report(cfg, k)

        launcher.run(jobs, done, attach)
        after = scan_sweep(cfg.outdir, cfg.sizes)
        for n in sizes:
            if after[n].status not in ("done", "failed"):  # a job that ended without a verdict must not loop
                write_status(size_paths(cfg.outdir, n).status, status="failed", stage=after[n].stage,
                             log=after[n].log, message=f"|D|={n}: the job ended before {after[n].stage} "
                                                       f"finished; see {after[n].log}")
        return results_of(scan_sweep(cfg.outdir, cfg.sizes))

    bisect_sizes(cfg.sizes, cfg.settings.threshold, measure, k, results_of(states))
    est, _ = write_report(cfg, k)
    return est


# ---------------------------------------------------------------------------------------------------- plots

@dataclass
class Curve:
    """One sweep on a figure: measured sizes and max ratios, its threshold and EMM."""
    label: str
    sizes: list[int]
    ratios: list[float]
    threshold: float
    emm: int | None


class SweepFileError(DiffmemError, ValueError):
    """A sweep folder without a readable emm.json; str() is the one-line message."""


def curve_from_report(doc: dict, label: str) -> Curve:
    """The measured points of an emm.json document."""
    done = [s for s in doc["sizes"] if s["status"] == "done" and s["max_ratio"] is not None]
    return Curve(label, [s["size"] for s in done], [s["max_ratio"] for s in done], doc["threshold"], doc["emm"])


def read_curve(sweep_dir: str | Path) -> Curve:
    """A sweep folder's curve, labelled by the folder name."""
    path = Path(sweep_dir) / "emm.json"
    try:
        doc = json.loads(path.read_text())
        return curve_from_report(doc, Path(sweep_dir).resolve().name)
    except FileNotFoundError:
        raise SweepFileError(f"{path}: no such file (run detect/emm.py with --outdir {sweep_dir} first)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise SweepFileError(f"{path}: not an emm.json written by detect/emm.py") from None


def plot_curves(curves: list[Curve], out: str | Path, title: str | None = None) -> Path:
    """Max memorization ratio (%) vs |D| (log x), one curve per sweep, threshold lines, EMM starred."""
    from matplotlib.ticker import NullLocator

    from common.plotting import new_axes

    fig, ax = new_axes((6.4, 4.2))
    for c in curves:
        label = f"{c.label} (EMM {c.emm if c.emm is not None else '?'})"
        (line,) = ax.plot(c.sizes, [100 * r for r in c.ratios], marker="o", label=label)
        if c.emm is not None and c.emm in c.sizes:
            ax.plot([c.emm], [100 * c.ratios[c.sizes.index(c.emm)]], marker="*", markersize=16,
                    color=line.get_color(), zorder=3)
    for t in sorted({c.threshold for c in curves}):
        ax.axhline(100 * t, linestyle="--", color="grey", linewidth=1, label=f"threshold {100 * t:g} %")
    ticks = sorted({n for c in curves for n in c.sizes})
    if ticks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.xaxis.set_minor_locator(NullLocator())  # log-2 minor ticks would get labels of their own
    ax.set_ylim(-3, 103)
    ax.set_xlabel("|D| (training images)")
    ax.set_ylabel("max memorization ratio over snapshots (%)")
    ax.set_title(title or "Effective model memorization")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return Path(out)
