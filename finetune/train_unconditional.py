"""Train an EDM diffusion model (Karras et al. 2022) on an EDM dataset zip, with DiffMemorize's experiment knobs.

    accelerate launch --config_file accelerate_configs/multi_gpu_8_fp32.yaml finetune/train_unconditional.py \\
        --data datasets/cifar10-1k.zip --out runs/cifar10-1k --arch edm-ddpmpp --precond vp --duration 2000 \\
        --schedule diffmemorize --num_blocks 2 --num_channels 128 --lr 2e-4 --dropout 0.13 --seed 1024

The network is EDM's own SongUNet / DhariwalUNet in EDM's preconditioner (``--arch edm-ddpmpp | edm-ncsnpp |
edm-adm``, ``common.edm.networks.build``) or diffusers' ``UNet2DModel`` inside ``common.edm.networks.unet2d.EDMNetwork``
(``--arch ddpmpp | ncsnpp``). Every --snap kimg and at the end the EMA network goes to
``OUTDIR/snapshot-{images_seen:09d}/`` (what ``detect/generate.py --model`` loads); resume checkpoints are the
trainer's ``OUTDIR/checkpoint-N/``. Runs without ``accelerate launch`` too (one process).
The settings the weights depend on are recorded in ``OUTDIR/training_options.json`` and bound to the run once it has
a checkpoint or snapshot: a rerun with another value is refused with one line before anything is built or written.
"""

from __future__ import annotations

import os

from diffmem.common.cli import ArgumentParser, add_settings_arguments, run_main, settings_from_args
from diffmem.common.edm.networks.build import ArchConfig
from diffmem.common.edm.train import LoopSettings, UnconditionalConfig

CHECK_ARGS_HELP = ("parse and check the arguments, then exit without reading --data or writing anything "
                   "(detect/emm.py checks a sweep's stage arguments so)")
DATA_FIELDS = ("data", "outdir", "cond", "xflip")
NETWORK_FIELDS = ("precond", "skip_connections")
SCHEDULE_FIELDS = ("duration", "schedule", "batch", "batch_gpu", "lr_rampup", "ema", "ema_mode", "ema_beta")
RUN_FIELDS = ("snap", "seed", "resume_from_checkpoint", "checkpoints_total_limit", "mixed_precision", "report_to",
              "progress")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(p.add_argument_group("data and output"), UnconditionalConfig, only=DATA_FIELDS)
    g = p.add_argument_group("network")
    add_settings_arguments(g, ArchConfig, only=("arch", "num_channels", "channel_mult", "num_blocks",
                                                "attn_resolutions", "dropout", "embed"))
    add_settings_arguments(g, UnconditionalConfig, only=NETWORK_FIELDS)
    g = p.add_argument_group("schedule and optimizer")
    add_settings_arguments(g, UnconditionalConfig, only=SCHEDULE_FIELDS)
    add_settings_arguments(g, LoopSettings, only=("lr", "optimizer", "weight_decay", "momentum", "max_grad_norm"))
    g = p.add_argument_group("run")
    add_settings_arguments(g, UnconditionalConfig, only=RUN_FIELDS)
    add_settings_arguments(g, LoopSettings, only=RUN_FIELDS)
    g.add_argument("--check_args", action="store_true", help=CHECK_ARGS_HELP)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[UnconditionalConfig, bool]:
    """The run's settings and whether only to check them (--check_args)."""
    a = build_parser().parse_args(argv)
    cfg = settings_from_args(UnconditionalConfig, a, arch=settings_from_args(ArchConfig, a),
                             loop=settings_from_args(LoopSettings, a))
    return cfg, a.check_args


def run(cfg: UnconditionalConfig, check_only: bool = False) -> None:
    """Validate the settings, train, and print one summary line from the main process."""
    cfg.validate(data_must_exist=not check_only)
    if check_only:
        return
    from diffmem.common.edm.train import train_unconditional
    from diffmem.common.training.checkpoints import resolve_resume

    resolve_resume(cfg.loop.resume_from_checkpoint, cfg.outdir)
    summary = train_unconditional(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {summary.global_step} steps ({summary.samples_seen} images); snapshots in {cfg.outdir}")


def main(argv: list[str] | None = None) -> int:
    return run_main("train_unconditional", run, *parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
