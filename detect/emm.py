"""Search Effective Model Memorization (EMM, Gu et al.): the largest |D| whose max memorization ratio is >= 90 %.

    python detect/emm.py --source digits --sizes 16,32,64,128,256 --outdir SWEEP \\
        [--dataset_args "--resolution 8 --labels none"] [--train_args "--duration 2 --num_channels 16"] \\
        [--mem_args "--seeds 0-255"] [--threshold 0.9] [--launcher local|submitit] [--max_parallel K] \\
        [--submitit_cluster slurm|local|debug] [--slurm_partition P] [--gpus_per_job G] [--nodes_per_job N]
    python detect/emm.py plot SWEEP_A SWEEP_B ... --out emm.png

For each size N chosen by bisection on the grid it builds SWEEP/size-N/data.zip (data/dataset_tool.py), trains
SWEEP/size-N/run (finetune/train_unconditional.py) and measures it (detect/mem_ratio.py, max over snapshots).
Each stage's arguments are checked by that stage's own parser (its --check_args) before anything starts.
Writes SWEEP/emm.json, SWEEP/emm.png, SWEEP/jobs.jsonl and SWEEP/sweep.json; re-running the command resumes.
Exit codes: 0 EMM bracketed; 3 the grid does not bracket it (the message says which way to extend --sizes);
1 a size the bisection needs failed (its log is named); 2 bad input.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from diffmem.common.cli import ArgumentParser, run_main
from diffmem.common.edm.launch import CLUSTERS, LAUNCHERS
from diffmem.common.edm.sweep import (
    DEFAULT_SCRIPTS,
    LaunchConfig,
    SweepConfig,
    check_config,
    check_stage_args,
    run_sweep,
)
from diffmem.common.edm.sweep_state import REPORT_FILE, REPORT_PLOT, STAGES, SweepSettings, read_curve
from diffmem.common.errors import ConfigError
from diffmem.common.plotting import plot_emm_curves


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="emm", description=__doc__.split("\n\n")[0],
                       epilog="Values of the *_args options are shell-quoted argument strings; one that is a "
                              "single flag needs the = form: --train_args=--no_progress")
    p.add_argument("--source", required=True, metavar="SRC",
                   help="digits, cifar-10-python.tar.gz, an image folder or an EDM zip (data/dataset_tool.py)")
    p.add_argument("--sizes", required=True, metavar="N,N,...", help="the grid of |D|, increasing")
    p.add_argument("--outdir", required=True, type=Path, metavar="SWEEP", help="the sweep folder")
    p.add_argument("--dataset_args", default="", metavar="ARGS", help="more data/dataset_tool.py arguments")
    p.add_argument("--train_args", default="", metavar="ARGS", help="more finetune/train_unconditional.py arguments")
    p.add_argument("--mem_args", default="", metavar="ARGS", help="more detect/mem_ratio.py arguments")
    p.add_argument("--threshold", type=float, default=0.9, help="max memorization ratio defining EMM (fraction)")
    g = p.add_argument_group("launch")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: subprocesses here; submitit: one submitit job per size")
    g.add_argument("--max_parallel", type=int, default=1, metavar="K",
                   help="sizes measured at once (a bisection round measures K sizes spread over the bracket)")
    g.add_argument("--gpus_per_job", type=int, default=1, metavar="G", help="GPUs per size (per node)")
    g.add_argument("--nodes_per_job", type=int, default=1, metavar="N", help="nodes per size (Slurm only)")
    g.add_argument("--submitit_cluster", choices=CLUSTERS, default="slurm",
                   help="submitit's executor: slurm, or local/debug to try a sweep without Slurm")
    g.add_argument("--slurm_partition", metavar="P")
    g.add_argument("--timeout_min", type=int, default=1440,
                   help="submitit job time limit; a job that reaches it is requeued and resumes")
    g.add_argument("--accelerate_config", metavar="YAML",
                   help="accelerate config for training (default: accelerate launch only when multi-process)")
    g.add_argument("--retry_failed", action="store_true", help="rerun sizes recorded as failed")
    # Test hook: replace stage scripts (data=PATH,train=PATH,mem=PATH) by doubles; the real ones are the default.
    p.add_argument("--stage_scripts", default="", help=argparse.SUPPRESS)
    return p


def build_plot_parser() -> ArgumentParser:
    p = ArgumentParser(prog="emm plot", description="Several sweeps' max ratio vs |D| on one figure.")
    p.add_argument("sweeps", nargs="+", type=Path, metavar="SWEEP", help="sweep folders holding emm.json")
    p.add_argument("--out", required=True, type=Path, metavar="PNG")
    p.add_argument("--title", default=None)
    return p


def split_args(flag: str, text: str) -> list[str]:
    """A shell-quoted argument string as a list; ConfigError when it does not parse."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r}: {exc}") from None


def parse_sizes(text: str) -> list[int]:
    """'16,32,64' -> [16, 32, 64]."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--sizes: expected comma-separated integers, got {text!r}") from None


def parse_scripts(text: str) -> dict[str, str]:
    """The real stage scripts, with 'stage=PATH' replacements."""
    scripts = dict(DEFAULT_SCRIPTS)
    for item in filter(None, text.split(",")):
        stage, _, path = item.partition("=")
        if stage not in STAGES or not path:
            raise ConfigError(f"--stage_scripts: expected stage=PATH with stage in {', '.join(STAGES)}, got {item!r}")
        scripts[stage] = str(Path(path).resolve())
    return scripts


def config_from_args(a) -> SweepConfig:
    settings = SweepSettings(source=a.source, dataset_args=split_args("--dataset_args", a.dataset_args),
                             train_args=split_args("--train_args", a.train_args),
                             mem_args=split_args("--mem_args", a.mem_args), threshold=a.threshold)
    launch = LaunchConfig(launcher=a.launcher, max_parallel=a.max_parallel, gpus_per_job=a.gpus_per_job,
                          nodes_per_job=a.nodes_per_job, submitit_cluster=a.submitit_cluster,
                          slurm_partition=a.slurm_partition, timeout_min=a.timeout_min,
                          accelerate_config=a.accelerate_config, scripts=parse_scripts(a.stage_scripts))
    return SweepConfig(outdir=a.outdir, sizes=parse_sizes(a.sizes), settings=settings, launch=launch,
                       retry_failed=a.retry_failed)


def sweep(a) -> int:
    """Run (or resume) the sweep; print the estimate; its exit code."""
    cfg = config_from_args(a)
    check_config(cfg)
    check_stage_args(cfg)  # each stage's own parser, before any stage runs
    est = run_sweep(cfg)
    for w in est.warnings:
        print(f"emm: warning: {w}", file=sys.stderr)
    print(est.message)
    print(f"wrote {cfg.outdir / REPORT_FILE} and {cfg.outdir / REPORT_PLOT}")
    return est.exit_code


def plot(a) -> None:
    """Several sweeps on one figure."""
    out = plot_emm_curves([read_curve(d) for d in a.sweeps], a.out, a.title)
    print(f"wrote {out}")


def stop_on_sigterm(signum, frame) -> None:
    # KeyboardInterrupt unwinds through the launcher, which stops the stage processes it started.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return run_main("emm plot", plot, build_plot_parser().parse_args(argv[1:]))
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    codes: list[int] = []
    try:
        rc = run_main("emm", lambda a: codes.append(sweep(a)), build_parser().parse_args(argv))
    except KeyboardInterrupt:
        print("emm: stopped; the same command resumes the sweep", file=sys.stderr)
        return 130
    return rc or codes[0]


if __name__ == "__main__":
    sys.exit(main())
