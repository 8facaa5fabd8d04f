"""The files of an EMM sweep folder and what they say: each size's state, the settings record and the report.

A sweep folder is the only memory of a sweep: rerunning the command reads it back to know which sizes are done,
failed, still running (their process or Slurm job alive) or to resume. Its layout:

    SWEEP/sweep.json                 the settings every result depends on (bound once their outputs exist)
    SWEEP/jobs.jsonl                 every stage started and ended, every submitit submission
    SWEEP/emm.json, SWEEP/emm.png    per-size results and the estimate
    SWEEP/submitit/                  submitit's job folders
    SWEEP/size-N/data.zip            the data stage's output
    SWEEP/size-N/run/                the training run: checkpoint-*, snapshot-*, train_summary.json, and the
                                     memorization ratio's mem_ratio_summary.json
    SWEEP/size-N/status.json         running (with host, pid / Slurm job id), failed (stage, exit code, log) ...
    SWEEP/size-N/<stage>.log         each stage's output

A measurement on disk wins over any recorded status; a failure is recorded and never counts as a result; a
"running" status whose process or job is gone is pending again. The stages' own files are named by the modules
that write them (``common.edm.measure.mem_ratio``, ``common.edm.networks.snapshot``,
``common.training.checkpoints``: torch-free, as this module is).
"""

from __future__ import annotations

import json
import shlex
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import submitit

from diffmem.common.edm.emm.plot import EMMCurve
from diffmem.common.edm.measure.mem_ratio import SUMMARY_FILE as MEM_SUMMARY
from diffmem.common.edm.measure.mem_ratio import MemRatioError, read_summary
from diffmem.common.edm.networks.snapshot import SNAPSHOT_PREFIX
from diffmem.common.errors import ConfigError, DiffmemError
from diffmem.common.results import pid_alive, write_json_atomic
from diffmem.common.settings import option
from diffmem.common.training.checkpoints import CHECKPOINT_PREFIX, TRAIN_SUMMARY

STAGES = ("data", "train", "mem")
SWEEP_SETTINGS_FILE = "sweep.json"
JOBS_FILE = "jobs.jsonl"
REPORT_FILE = "emm.json"
REPORT_PLOT = "emm.png"
SUBMITIT_DIR = "submitit"
SIZE_PREFIX = "size-"
DATA_FILE = "data.zip"
RUN_DIR = "run"
STATUS_FILE = "status.json"
# Which stage output each setting produces: a setting may change until such an output exists.
SETTING_OUTPUT = {"source": "data", "dataset_args": "data", "train_args": "train", "mem_args": "mem",
                  "threshold": "mem"}
SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                "REQUEUE_HOLD", "REQUEUE_FED"}


def checkpoint_glob() -> str:
    """The pattern of a run's trainer checkpoints (common.training.checkpoints)."""
    return f"{CHECKPOINT_PREFIX}*"


# ---------------------------------------------------------------------------------------------------- settings

@dataclass
class SweepSettings:
    """What every result of a sweep depends on; recorded in SWEEP/sweep.json."""
    source: str = option(metavar="SRC", flag="--data", aliases=("--source",),
                         help="digits, cifar-10-python.tar.gz, an image folder or an EDM zip (data/dataset_tool.py)")
    # The stages' extra arguments; on the command line each is one shell-quoted string (detect/emm.py splits it).
    dataset_args: list[str] = field(default_factory=list)
    train_args: list[str] = field(default_factory=list)
    mem_args: list[str] = field(default_factory=list)
    threshold: float = option(0.9, flag="--mem_ratio_threshold", aliases=("--threshold",),
                              help="max memorization ratio defining EMM (fraction)")


def settings_record(settings: SweepSettings) -> dict:
    """sweep.json's content: the settings, with a source path made absolute so the record survives a cd."""
    record = asdict(settings)
    if settings.source != "digits":
        record["source"] = str(Path(settings.source).resolve())
    return record


def stage_output_exists(outdir: Path, stage: str) -> bool:
    """Whether any size folder of the sweep holds output of this stage (a started training counts)."""
    for folder in outdir.glob(f"{SIZE_PREFIX}*"):
        p = SizeFiles(folder)
        if stage == "data" and p.data.exists():
            return True
        if stage == "train" and p.run.is_dir() and (any(p.run.glob(checkpoint_glob()))
                                                    or any(p.run.glob(f"{SNAPSHOT_PREFIX}*"))):
            return True
        if stage == "mem" and p.output("mem").exists():
            return True
    return False


def bind_settings(outdir: Path, settings: SweepSettings) -> None:
    """Record the settings in sweep.json; refuse ones that differ from a record whose outputs exist."""
    path = outdir / SWEEP_SETTINGS_FILE
    new = settings_record(settings)
    if path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in new if old.get(k) != new[k]]
        bound = [k for k in changed if stage_output_exists(outdir, SETTING_OUTPUT[k])]
        if bound:
            what = ", ".join(f"{k}={show_setting(old.get(k))} (now {show_setting(new[k])})" for k in bound)
            raise ConfigError(f"{path}: this sweep has results made with {what}; use another --out")
        if not changed:
            return
    outdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, new)


def show_setting(value) -> str:
    """A setting as the user typed it: argument lists shell-joined."""
    return repr(shlex.join(value)) if isinstance(value, list) else repr(value)


# ---------------------------------------------------------------------------------------------------- size folders

@dataclass(frozen=True)
class SizeFiles:
    """Where one size's files lie: SWEEP/size-N/{data.zip, run/, status.json, <stage>.log}."""
    root: Path

    @property
    def data(self) -> Path:
        return self.root / DATA_FILE

    @property
    def run(self) -> Path:
        return self.root / RUN_DIR

    @property
    def status(self) -> Path:
        return self.root / STATUS_FILE

    def output(self, stage: str) -> Path:
        """The file whose existence marks the stage done."""
        return {"data": self.data, "train": self.run / TRAIN_SUMMARY, "mem": self.run / MEM_SUMMARY}[stage]

    def log(self, stage: str, node: int = 0) -> Path:
        """The stage's log (node > 0 of a multi-node job logs beside it)."""
        return self.root / (f"{stage}.log" if node == 0 else f"{stage}.node{node}.log")


def size_name(size: int) -> str:
    """The folder name of size N in a sweep, which is also how progress lines name that size."""
    return f"{SIZE_PREFIX}{size}"


def size_paths(outdir: Path, size: int) -> SizeFiles:
    """The folder of size N in a sweep."""
    return SizeFiles(Path(outdir) / size_name(size))


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


def owner_active(status: dict, outdir: Path) -> bool:
    """Whether the process or Slurm job a 'running' status names is still alive."""
    if status.get("cluster") == "slurm" and status.get("job_id"):
        state = submitit.SlurmJob(folder=outdir / SUBMITIT_DIR, job_id=str(status["job_id"])).state
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
    trajectory: list[float] | None = None  # a done size's ratio at each snapshot, in training order

    def failure(self) -> str:
        """One line naming the failed stage, exit code and log."""
        return self.message or f"|D|={self.size}: {self.stage} failed; see {self.log}"


def scan_size(outdir: Path, size: int) -> SizeState:
    """The state of one size from its files: a measurement wins over any recorded status."""
    p = size_paths(outdir, size)
    summary_path = p.output("mem")
    if summary_path.exists():
        try:
            summary = read_summary(summary_path)
        except MemRatioError:
            return SizeState(size, "failed", stage="mem", log=str(p.log("mem")),
                             message=f"|D|={size}: {summary_path} is unreadable or has no max_ratio")
        return SizeState(size, "done", summary.max_ratio, summary.max_snapshot, summary.max_images_seen,
                         summary.n, log=str(p.log("mem")), trajectory=ratio_trajectory(summary_path))
    status = read_status(p.status)
    if status.get("status") == "failed":
        return SizeState(size, "failed", stage=status.get("stage"), log=status.get("log"),
                         message=status.get("message"))
    stage = next((s for s in STAGES if not p.output(s).exists()), "mem")
    if status.get("status") == "running" and owner_active(status, outdir):
        return SizeState(size, "running", stage=status.get("stage", stage), log=status.get("log"), owner=status)
    message = None
    if stage == "train" and p.run.is_dir() and any(p.run.glob(checkpoint_glob())):
        message = f"|D|={size}: training unfinished, resumes from its latest checkpoint"
    return SizeState(size, "pending", stage=stage, log=str(p.log(stage)), message=message)


def ratio_trajectory(path: Path) -> list[float]:
    """A run's memorization ratio at each snapshot in training order: the ``per_snapshot`` table of its
    mem_ratio_summary.json ([] when the file has none or is unreadable; the maximum alone is read elsewhere)."""
    try:
        doc = json.loads(Path(path).read_text())
        return [float(row["ratio"]) for row in doc.get("per_snapshot") or []]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


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



def results_of(states: dict[int, SizeState]) -> dict[int, float | None]:
    """The search's view of the states: a ratio per done size, None per failed one."""
    return {n: s.max_ratio for n, s in states.items() if s.status in ("done", "failed")}


# ---------------------------------------------------------------------------------------------------- the report

class SweepFileError(DiffmemError, ValueError):
    """A sweep folder without a readable emm.json; str() is the one-line message."""


def curve_from_report(doc: dict, label: str) -> EMMCurve:
    """The measured points of an emm.json document."""
    done = [s for s in doc["sizes"] if s["status"] == "done" and s["max_ratio"] is not None]
    return EMMCurve(label, [s["size"] for s in done], [s["max_ratio"] for s in done], doc["threshold"], doc["emm"])


def read_curve(sweep_dir: str | Path) -> EMMCurve:
    """A sweep folder's curve, labelled by the folder name."""
    path = Path(sweep_dir) / REPORT_FILE
    try:
        doc = json.loads(path.read_text())
        return curve_from_report(doc, Path(sweep_dir).resolve().name)
    except FileNotFoundError:
        raise SweepFileError(f"{path}: no such file (run detect/emm.py with --out {sweep_dir} first)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise SweepFileError(f"{path}: not an emm.json written by detect/emm.py") from None
