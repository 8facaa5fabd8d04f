"""Train an EDM diffusion model (Karras et al. 2022) on an EDM dataset zip, with DiffMemorize's experiment knobs.

    accelerate launch --config_file accelerate_configs/multi_gpu_8_fp32.yaml finetune/train_unconditional.py \\
        --data datasets/cifar10-1k.zip --outdir runs/cifar10-1k --arch ddpmpp --precond vp --duration 2000 \\
        --schedule diffmemorize --num_blocks 2 --num_channels 128 --lr 2e-4 --dropout 0.13 --seed 1024

The network is diffusers' ``UNet2DModel`` inside ``common.edm.network.EDMNetwork`` (preconditioning, skip mask
and noise embedding saved in its config). Every --snap kimg and at the end the EMA network goes to
``OUTDIR/snapshot-{images_seen:09d}/`` (what ``detect/generate.py --network`` loads); resume checkpoints are the
trainer's ``OUTDIR/checkpoint-N/``. Runs without ``accelerate launch`` too (one process).
The settings the weights depend on are recorded in ``OUTDIR/training_options.json`` and bound to the run once it has
a checkpoint or snapshot: a rerun with another value is refused with one line before anything is built or written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from diffmem.common.cli import ArgumentParser, run_main
from diffmem.common.errors import ConfigError


def int_list(text: str) -> list[int]:
    """'1,1,0' or '16' -> [1, 1, 0] / [16]."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


CHECK_ARGS_HELP = ("parse and check the arguments, then exit without reading --data or writing anything "
                   "(detect/emm.py checks a sweep's stage arguments so)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, help="EDM dataset zip (data/dataset_tool.py writes one)")
    g.add_argument("--outdir", required=True, help="run folder: snapshots, checkpoints, logs")
    g.add_argument("--cond", action="store_true", help="class-conditional on the dataset's labels")
    g.add_argument("--xflip", action="store_true", help="EDM's x-flips: the dataset doubled with mirrored copies")

    g = p.add_argument_group("network")
    g.add_argument("--arch", choices=("ddpmpp", "ncsnpp"), default="ddpmpp")
    g.add_argument("--precond", choices=("vp", "ve", "edm"), default="vp")
    g.add_argument("--num_blocks", type=int, default=2, help="resnets per resolution")
    g.add_argument("--num_channels", type=int, default=128, help="EDM's model_channels")
    g.add_argument("--channel_mult", type=int_list, default=[2, 2, 2])
    g.add_argument("--attn_resolutions", type=int_list, default=[16])
    g.add_argument("--dropout", type=float, default=0.13)
    g.add_argument("--embed", choices=("positional", "fourier"), default=None,
                   help="noise embedding; default: positional for ddpmpp, fourier for ncsnpp")
    g.add_argument("--skip_connections", type=int_list, default=None,
                   help="one 0/1 per encoder output, stem first (DiffMemorize's format); default all 1")

    g = p.add_argument_group("schedule")
    g.add_argument("--duration", type=float, default=200.0, help="training length, Mimg (fractions allowed)")
    g.add_argument("--schedule", choices=("edm", "diffmemorize"), default="edm",
                   help="diffmemorize: rescale duration, EMA half-life and LR ramp-up by |D| as Gu et al.")
    g.add_argument("--batch", type=int, default=512, help="global batch per optimizer step")
    g.add_argument("--batch_gpu", type=int, default=None, help="per-process micro-batch (accumulates the rest)")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--lr_rampup", type=float, default=None, help="LR ramp-up, kimg; default: the schedule's")
    g.add_argument("--ema", type=float, default=0.5, help="EMA half-life, Mimg")
    g.add_argument("--ema_mode", choices=("halflife", "diffmemorize", "constant"), default=None,
                   help="default: halflife with --schedule edm, diffmemorize (their mode2) with diffmemorize")
    g.add_argument("--ema_beta", type=float, default=None, help="the β of --ema_mode constant")
    g.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam",
                   help="adam: weight decay as coupled L2 (DiffMemorize's Adam); adamw: decoupled")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--max_grad_norm", type=float, default=0.0, help="gradient clipping; 0 (EDM) disables it")

    g = p.add_argument_group("run")
    g.add_argument("--snap", type=float, default=2500.0, help="kimg between snapshots (fractions allowed)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder")
    g.add_argument("--checkpoints_total_limit", type=int, default=2)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: the accelerate config's")
    g.add_argument("--report_to", choices=("tensorboard", "wandb", "all", "none"), default="tensorboard")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("--check_args", action="store_true", help=CHECK_ARGS_HELP)
    return p


def validate_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments as one line, or None."""
    for name in ("num_blocks", "num_channels", "batch"):
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    if args.batch_gpu is not None and args.batch_gpu < 1:
        return f"--batch_gpu must be >= 1, got {args.batch_gpu}"
    for name in ("duration", "snap", "lr"):
        if getattr(args, name) <= 0:
            return f"--{name} must be > 0, got {getattr(args, name)}"
    if args.ema < 0:
        return f"--ema must be >= 0, got {args.ema}"
    if not args.channel_mult or min(args.channel_mult) < 1:
        return f"--channel_mult needs positive integers, got {args.channel_mult}"
    if not 0.0 <= args.dropout < 1.0:
        return f"--dropout must be in [0, 1), got {args.dropout}"
    if args.weight_decay < 0:
        return f"--weight_decay must be >= 0, got {args.weight_decay}"
    if (args.ema_mode == "constant") != (args.ema_beta is not None):
        return "--ema_mode constant and --ema_beta go together"
    if args.ema_beta is not None and not 0.0 <= args.ema_beta <= 1.0:
        return f"--ema_beta must be in [0, 1], got {args.ema_beta}"
    if Path(args.outdir).exists() and not Path(args.outdir).is_dir():
        return f"--outdir {args.outdir} is a file; expected a run folder (new or one to resume)"
    if not args.check_args and not Path(args.data).is_file():
        return f"--data {args.data}: no such file (expected an EDM dataset zip; see data/dataset_tool.py)"
    return None


def config_from_args(args: argparse.Namespace):
    from diffmem.common.edm.network import ArchConfig
    from diffmem.common.edm.train import UnconditionalConfig
    from diffmem.common.trainer import TrainConfig

    train = TrainConfig(
        output_dir=args.outdir, seed=args.seed, learning_rate=args.lr, optimizer=args.optimizer,
        adam_weight_decay=args.weight_decay, sgd_momentum=args.momentum, max_grad_norm=args.max_grad_norm,
        use_ema=True, checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint, mixed_precision=args.mixed_precision,
        report_to=args.report_to, tracker_project_name="diffmem-edm", show_progress=not args.no_progress,
    )
    arch = ArchConfig(arch=args.arch, num_channels=args.num_channels, channel_mult=tuple(args.channel_mult),
                      num_blocks=args.num_blocks, attn_resolutions=tuple(args.attn_resolutions),
                      dropout=args.dropout, embed=args.embed)
    return UnconditionalConfig(
        data=args.data, train=train, cond=args.cond, arch=arch, precond=args.precond,
        skip_connections=args.skip_connections, duration=args.duration, schedule=args.schedule,
        batch=args.batch, batch_gpu=args.batch_gpu, lr_rampup=args.lr_rampup, ema=args.ema,
        ema_mode=args.ema_mode, ema_beta=args.ema_beta, snap=args.snap, xflip=args.xflip,
    )


def run(args: argparse.Namespace) -> None:
    """Validate the arguments, train, and print one summary line from the main process."""
    problem = validate_args(args)
    if problem is not None:
        raise ConfigError(problem)
    if args.check_args:
        return
    from diffmem.common.edm.train import train_unconditional
    from diffmem.common.trainer import resolve_resume

    cfg = config_from_args(args)
    resolve_resume(cfg.train.resume_from_checkpoint, cfg.train.output_dir)
    summary = train_unconditional(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {summary.global_step} steps ({summary.samples_seen} images); snapshots in {cfg.train.output_dir}")


def main(argv: list[str] | None = None) -> int:
    return run_main("train_unconditional", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
