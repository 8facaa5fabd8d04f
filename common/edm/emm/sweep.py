"""An EMM sweep: the largest |D| whose max memorization ratio stays >= a threshold, found by running the stages.

Gu et al. define Effective Model Memorization as the largest training-set size |D| at which the maximum
memorization ratio over the training snapshots is still >= 90 %, and search |D| by hand. Here one resumable sweep
does it: for a size N it runs three stages as subprocesses, each done once its output exists, with its log beside
it:

    data   data/dataset_tool.py --source SRC --dest SWEEP/size-N/data.zip --max_images N <dataset_args>
                                                                        -> SWEEP/size-N/data.zip       (data.log)
    train  finetune/train_unconditional.py --data … --outdir SWEEP/size-N/run <train_args>
                                                  --resume_from_checkpoint latest
                                                                        -> SWEEP/size-N/run/train_summary.json
    mem    detect/mem_ratio.py --expdir SWEEP/size-N/run --knn_ref SWEEP/size-N/data.zip <mem_args>
                                                                        -> SWEEP/size-N/run/mem_ratio_summary.json

This module is the orchestration: the settings and their checks (each stage's arguments through its own parser
first), the stage commands, and the loop that asks the bisection (``common.edm.emm.search``) which sizes to measure,
has a launcher run them (``common.edm.emm.launch``), reads back what they left in the sweep folder
(``common.edm.emm.state``) and rewrites the report, ``emm.json`` and ``emm.png``, after every size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffmem.common.edm.emm.launch import CLUSTERS, LAUNCHERS, REPO, LocalLauncher, SizeJob, Stage, SubmititLauncher
from diffmem.common.edm.emm.plot import plot_emm_curves
from diffmem.common.edm.emm.search import Estimate, bisect_sizes, estimate
from diffmem.common.edm.emm.state import (
    REPORT_FILE,
    REPORT_PLOT,
    STAGES,
    SizeState,
    SweepSettings,
    bind_settings,
    clear_failed,
    curve_from_report,
    now,
    results_of,
    scan_size,
    scan_sweep,
    settings_record,
    size_name,
    size_paths,
    write_status,
)
from diffmem.common.errors import ConfigError, DiffmemError
from diffmem.common.resources import accelerate_config
from diffmem.common.results import write_json_atomic
from diffmem.common.settings import option

DEFAULT_SCRIPTS = {"data": str(REPO / "data" / "dataset_tool.py"),
                   "train": str(REPO / "finetune" / "train_unconditional.py"),
                   "mem": str(REPO / "detect" / "mem_ratio.py")}
# The stage scripts' flags the sweep sets for every size. The stage CLIs define them; a CLI folder is no library
# to import, so the sweep names each once here.
SOURCE, DEST, MAX_IMAGES = "--source", "--dest", "--max_images"  # data/dataset_tool.py
DATA, OUTDIR, RESUME, RESUME_LATEST = "--data", "--outdir", "--resume_from_checkpoint", "latest"  # training
EXPDIR, KNN_REF, IMAGES = "--expdir", "--knn_ref", "--images"  # detect/mem_ratio.py (and OUTDIR)
CHECK_ARGS = "--check_args"  # every stage script: parse and check its arguments, then exit; nothing read or written
STAGE_FLAGS = {"data": (SOURCE, DEST, MAX_IMAGES), "train": (DATA, OUTDIR, RESUME),
               "mem": (EXPDIR, KNN_REF, OUTDIR, IMAGES)}
ARGS_FLAG = {"data": "--dataset_args", "train": "--train_args", "mem": "--mem_args"}  # detect/emm.py's options
# Flags the sweep sets itself for each stage, by the setting that must not set them: a user value would fight it.
RESERVED_FLAGS = {ARGS_FLAG[stage][2:]: STAGE_FLAGS[stage] for stage in STAGES}
# The other spellings the stage CLIs take for those flags (their canonical names and aliases, docs/vocabulary.md):
# "--out X" in --train_args fights the sweep's --outdir as much as "--outdir X" does.
FLAG_SPELLINGS = {SOURCE: ("--data",), DEST: ("--out",), OUTDIR: ("--out",), EXPDIR: ("--model",),
                  KNN_REF: ("--data",)}


class SweepBusyError(DiffmemError):
    """A size is still being worked on by another process or job; str() is the one-line message."""


# ---------------------------------------------------------------------------------------------------- settings

@dataclass
class LaunchConfig:
    """How stage jobs run: where, how many at once, on how many GPUs and nodes."""
    launcher: str = option("local", choices=LAUNCHERS,
                           help="local: subprocesses here; submitit: one submitit job per size")
    max_parallel: int = option(1, metavar="K",
                               help="sizes measured at once (a bisection round measures K sizes spread over the "
                                    "bracket)")
    gpus_per_job: int = option(1, metavar="G", help="GPUs per size (per node)")
    nodes_per_job: int = option(1, metavar="N", help="nodes per size (Slurm only)")
    submitit_cluster: str = option("slurm", choices=CLUSTERS,
                                   help="submitit's executor: slurm, or local/debug to try a sweep without Slurm")
    slurm_partition: str | None = option(None, type=str, metavar="P", help="Slurm partition (None: the cluster's "
                                                                            "default)")
    timeout_min: int = option(1440, help="submitit job time limit; a job that reaches it is requeued and resumes")
    accelerate_config: str | None = option(None, type=str, metavar="YAML",
                                           help="accelerate config for training (None: accelerate launch only "
                                                "when multi-process)")
    scripts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SCRIPTS))


@dataclass
class SweepConfig:
    """One factor setting's EMM search: the grid of sizes, the settings, the launch and the output folder."""
    outdir: Path = option(flag="--out", aliases=("--outdir",), help="the sweep folder", type=Path, metavar="SWEEP")
    sizes: list[int]  # on the command line, one comma-separated string (detect/emm.py)
    settings: SweepSettings
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    retry_failed: bool = option(False, help="rerun sizes recorded as failed")
    cwd: str = field(default_factory=os.getcwd)

    def validate(self) -> None:
        """Raise ConfigError with a one-line message for settings that cannot run."""
        sizes, s, launch = self.sizes, self.settings, self.launch
        if not sizes:
            raise ConfigError("--sizes: give at least one size")
        if min(sizes) < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ConfigError(f"--sizes must be positive and strictly increasing, got {','.join(map(str, sizes))}")
        if not 0.0 < s.threshold <= 1.0:
            raise ConfigError(f"--mem_ratio_threshold is a fraction in (0, 1] (0.9 = 90 %), got {s.threshold:g}")
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
            raise ConfigError(f"--submitit_cluster must be one of {', '.join(CLUSTERS)}, "
                              f"got {launch.submitit_cluster}")
        for name in ("max_parallel", "gpus_per_job", "nodes_per_job", "timeout_min"):
            if getattr(launch, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(launch, name)}")
        if launch.nodes_per_job > 1 and (launch.launcher, launch.submitit_cluster) != ("submitit", "slurm"):
            raise ConfigError("--nodes_per_job > 1 needs --launcher submitit --submitit_cluster slurm")
        if launch.accelerate_config is not None:
            try:  # a file, or the name of a config shipped with diffmem (cpu, single_gpu_fp16, ...)
                accelerate_config(launch.accelerate_config)
            except ConfigError as exc:
                raise ConfigError(f"--accelerate_config {exc}") from None
        for stage in STAGES:
            if not Path(launch.scripts[stage]).is_file():
                raise ConfigError(f"{launch.scripts[stage]}: the {stage} stage's script is missing")
        if self.outdir.exists() and not self.outdir.is_dir():
            raise ConfigError(f"--out {self.outdir} is a file; expected a sweep folder")


def flag_present(args: list[str], flag: str) -> bool:
    """Whether an argument list sets flag (``--flag V`` or ``--flag=V``) in any of its spellings (FLAG_SPELLINGS,
    and ``--a-b`` for ``--a_b``, which the stage CLIs take alike)."""
    wanted = {f.replace("-", "_") for f in (flag, *FLAG_SPELLINGS.get(flag, ()))}
    return any(a.partition("=")[0].replace("-", "_") in wanted for a in args if a.startswith("--"))


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
                                  f"({Path(stage.argv[0]).name} {CHECK_ARGS}) did not end in "
                                  f"{timeout_s:.0f}s") from None
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


# ---------------------------------------------------------------------------------------------------- jobs

def build_job(cfg: SweepConfig, size: int, python: str) -> SizeJob:
    """The three stages of one size with the sweep's settings (launch details are filled in by the launcher)."""
    s, scripts = cfg.settings, cfg.launch.scripts
    p = size_paths(cfg.outdir, size)
    source = settings_record(s)["source"]
    stages = [
        Stage("data", [scripts["data"], SOURCE, source, DEST, str(p.data), MAX_IMAGES, str(size), *s.dataset_args],
              p.output("data"), p.log("data")),
        Stage("train", [scripts["train"], DATA, str(p.data), OUTDIR, str(p.run), *s.train_args,
                        RESUME, RESUME_LATEST], p.output("train"), p.log("train")),
        Stage("mem", [scripts["mem"], EXPDIR, str(p.run), KNN_REF, str(p.data), *s.mem_args],
              p.output("mem"), p.log("mem")),
    ]
    return SizeJob(size=size, outdir=cfg.outdir, stages=stages, python=python, cwd=cfg.cwd,
                   launcher=cfg.launch.launcher, nodes=cfg.launch.nodes_per_job,
                   accelerate_config=None if cfg.launch.accelerate_config is None
                   else str(accelerate_config(cfg.launch.accelerate_config)))


def make_launcher(cfg: SweepConfig):
    """The launcher the config names."""
    launch = cfg.launch
    if launch.launcher == "local":
        return LocalLauncher(launch.max_parallel, launch.gpus_per_job)
    return SubmititLauncher(cfg.outdir, launch.submitit_cluster, launch.max_parallel, launch.gpus_per_job,
                            launch.nodes_per_job, launch.timeout_min, launch.slurm_partition)


# ---------------------------------------------------------------------------------------------------- the sweep

def report(cfg: SweepConfig, states: dict[int, SizeState], est: Estimate) -> dict:
    """emm.json's content."""
    sizes = []
    for n, s in states.items():
        p = size_paths(cfg.outdir, n)
        sizes.append({"size": n, "data": str(p.data), "run": str(p.run), "status": s.status,
                      "max_ratio": s.max_ratio, "max_snapshot": s.max_snapshot,
                      "max_images_seen": s.max_images_seen, "n": s.n, "stage": s.stage, "log": s.log,
                      "message": s.message, "ratio_trajectory": s.trajectory})
    return {"settings": settings_record(cfg.settings), "threshold": cfg.settings.threshold,
            "grid": list(cfg.sizes), "sizes": sizes, "emm": est.emm, "bracket": list(est.bracket),
            "outcome": est.outcome, "message": est.message, "warnings": est.warnings, "updated": now()}


def write_report(cfg: SweepConfig, k: int) -> tuple[Estimate, dict[int, SizeState]]:
    """Scan the sweep, write emm.json and emm.png; the estimate and the states."""
    states = scan_sweep(cfg.outdir, cfg.sizes)
    failures = {n: s.failure() for n, s in states.items() if s.status == "failed"}
    trajectories = {n: s.trajectory for n, s in states.items() if s.trajectory}
    est = estimate(cfg.sizes, results_of(states), cfg.settings.threshold, k, failures, trajectories)
    doc = report(cfg, states, est)
    write_json_atomic(cfg.outdir / REPORT_FILE, doc)
    plot_emm_curves([curve_from_report(doc, cfg.outdir.name)], cfg.outdir / REPORT_PLOT)
    return est, states


def run_sweep(cfg: SweepConfig, launcher=None, say: Callable[[str], None] = print, python: str | None = None,
              ) -> Estimate:
    """Search EMM for one factor setting; resumes whatever the sweep folder already holds."""
    cfg.validate()
    cfg.outdir = Path(cfg.outdir).resolve()
    launcher = make_launcher(cfg) if launcher is None else launcher
    bind_settings(cfg.outdir, cfg.settings)
    k = launcher.parallel
    say(launcher.note)
    if cfg.retry_failed:
        for n in clear_failed(cfg.outdir, cfg.sizes):
            say(f"{size_name(n)}: retrying (its failure record is cleared)")
    _, states = write_report(cfg, k)
    for s in states.values():
        if s.status == "failed":
            say(f"{size_name(s.size)}: failed earlier, not counted: {s.failure()}")
        elif s.status == "done":
            say(f"{size_name(s.size)}: max ratio {s.max_ratio:.1%} (reused)")

    def measure(sizes: list[int]) -> dict[int, float | None]:
        current = scan_sweep(cfg.outdir, cfg.sizes)
        busy = {n: current[n] for n in sizes if current[n].status == "running"}
        if busy and not launcher.can_attach:
            n, s = next(iter(busy.items()))
            o = s.owner or {}
            raise SweepBusyError(f"{size_name(n)} is still running (pid {o.get('stage_pid') or o.get('pid')} on "
                                 f"{o.get('host')}, since {o.get('time')}): wait for it or stop it, then rerun")
        attach = {n: str(s.owner["job_id"]) for n, s in busy.items()}
        for n in sizes:
            why = current[n].message or f"from stage {current[n].stage}"
            say(f"{size_name(n)}: {'waiting for running job ' + attach[n] if n in attach else 'launching, ' + why}")
        jobs = [build_job(cfg, n, python or sys.executable) for n in sizes]

        def done(n: int) -> None:
            s = scan_size(cfg.outdir, n)
            name = size_name(n)
            say(f"{name}: max ratio {s.max_ratio:.1%}" if s.status == "done" else f"{name}: {s.failure()}")
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

