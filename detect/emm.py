"""Search Effective Model Memorization (EMM, Gu et al.): the largest |D| whose max memorization ratio is >= 90 %.

    python detect/emm.py --data digits --sizes 16 32 64 128 256 --out SWEEP \\
        [--dataset_args "--resolution 8 --labels none"] [--train_args "--duration 2 --num_channels 16"] \\
        [--mem_args "--seeds 0-255"] [--mem_ratio_threshold 0.9] [--launcher local|submitit] [--max_parallel K] \\
        [--submitit_cluster slurm|local|debug] [--slurm_partition P] [--gpus_per_job G] [--nodes_per_job N]
    python detect/emm.py plot SWEEP_A SWEEP_B ... --out emm.png

For each size N chosen by bisection on the grid it builds SWEEP/size-N/data.zip (data/dataset_tool.py), trains
SWEEP/size-N/run (finetune/train_unconditional.py) and measures it (detect/mem_ratio.py, max over snapshots).
Each stage's arguments are checked by that stage's own parser (its --check_args) before anything starts.
Writes SWEEP/emm.json, SWEEP/emm.png, SWEEP/jobs.jsonl and SWEEP/sweep.json; re-running the command resumes.
Exit codes: 0 EMM bracketed; 3 the grid does not bracket it (the message says which way to extend --sizes, or, when
the smallest size memorized nothing or was still rising at its last snapshot, to train longer first); 1 a size the
bisection needs failed (its log is named); 2 bad input.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from diffmem.common.cli import ArgumentParser, ListAction, add_settings_arguments, run_main, settings_from_args
from diffmem.common.edm.emm.plot import plot_emm_curves
from diffmem.common.edm.emm.state import REPORT_FILE, REPORT_PLOT, STAGES, SweepSettings, read_curve
from diffmem.common.edm.emm.sweep import (
    DEFAULT_SCRIPTS,
    LaunchConfig,
    SweepConfig,
    check_stage_args,
    run_sweep,
)
from diffmem.common.errors import ConfigError
from diffmem.common.settings import int_list


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="emm", description=__doc__.split("\n\n")[0],
                       epilog="Values of the *_args options are shell-quoted argument strings; one that is a "
                              "single flag needs the = form: --train_args=--no_progress")
    add_settings_arguments(p, SweepSettings, only=("source",))
    p.add_argument("--sizes", required=True, nargs="+", type=int_list, action=ListAction, metavar="N",
                   help="the grid of |D|, increasing: 16 32 64 or 16,32,64")
    add_settings_arguments(p, SweepConfig, only=("outdir",))
    # SweepSettings holds these as argument lists; here each is one shell-quoted string, split by split_args.
    p.add_argument("--dataset_args", default="", metavar="ARGS", help="more data/dataset_tool.py arguments")
    p.add_argument("--train_args", default="", metavar="ARGS", help="more finetune/train_unconditional.py arguments")
    p.add_argument("--mem_args", default="", metavar="ARGS", help="more detect/mem_ratio.py arguments")
    add_settings_arguments(p, SweepSettings, only=("threshold",))
    g = p.add_argument_group("launch")
    add_settings_arguments(g, LaunchConfig, exclude=("scripts",))
    add_settings_arguments(g, SweepConfig, only=("retry_failed",))
    # Test hook: replace stage scripts (data=PATH,train=PATH,mem=PATH) by doubles; the real ones are the default.
    p.add_argument("--stage_scripts", default="", help=argparse.SUPPRESS)
    return p


def build_plot_parser() -> ArgumentParser:
    p = ArgumentParser(prog="emm plot", description="Several sweeps' max ratio vs |D| on one figure.")
    p.add_argument("sweeps", nargs="+", type=Path, metavar="SWEEP", help="sweep folders holding emm.json")
    p.add_argument("--out", required=True, type=Path, metavar="PNG", help="the figure (PNG) to write")
    p.add_argument("--title", default=None, help="figure title (None: \"Effective model memorization\")")
    return p


def split_args(flag: str, text: str) -> list[str]:
    """A shell-quoted argument string as a list; ConfigError when it does not parse."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r}: {exc}") from None


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
    settings = settings_from_args(SweepSettings, a, **{name: split_args(f"--{name}", getattr(a, name))
                                                        for name in ("dataset_args", "train_args", "mem_args")})
    launch = settings_from_args(LaunchConfig, a, scripts=parse_scripts(a.stage_scripts))
    return settings_from_args(SweepConfig, a, sizes=a.sizes, settings=settings, launch=launch)


def sweep(a) -> int:
    """Run (or resume) the sweep; print the estimate; its exit code."""
    cfg = config_from_args(a)
    cfg.validate()
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
