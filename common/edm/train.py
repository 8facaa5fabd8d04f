"""Unconditional (and class-conditional) EDM training on ``common.training.loop``: the loss, the data, the schedule
and the snapshots of ``finetune/train_unconditional.py``.

The network is one trainable denoiser ("net"): our ``EDMNetwork`` on diffusers' ``UNet2DModel`` (``--arch ddpmpp |
ncsnpp``) or EDM's own SongUNet / DhariwalUNet in EDM's preconditioner (``--arch edm-*``,
``common.edm.networks.build``); both take ``net(x, σ, class_labels)``. The loss draws σ and the noise of sample
(epoch, position)
from that sample's own seeded stream (``common.seeding``), so one process and several processes with the same
global batch see the same draws, and a resumed run continues exactly.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from diffmem.common.edm.dataset.edm_zip import ImageDataset, collate_image_batch, load_dataset_zip
from diffmem.common.edm.networks.build import (
    EDM_PRECONDS,
    ArchConfig,
    build_network,
    count_parameters,
    describe,
    is_edm_arch,
)
from diffmem.common.edm.networks.snapshot import list_snapshots, save_snapshot
from diffmem.common.edm.precond import PRECONDS, Preconditioning, denoising_loss
from diffmem.common.edm.schedule import EMA_MODES, SCHEDULES, Schedule, resolve_schedule
from diffmem.common.errors import ConfigError
from diffmem.common.results import file_sha256
from diffmem.common.runlock import lock_run_folder
from diffmem.common.seeding import STREAM_NOISE, torch_generator
from diffmem.common.settings import int_list, option
from diffmem.common.training.builders import make_accelerator
from diffmem.common.training.checkpoints import bind_training_settings, bound_train_settings
from diffmem.common.training.config import MIXED_PRECISIONS, OPTIMIZERS, REPORT_TO, TrainConfig, launched_processes
from diffmem.common.training.loop import LossTerms, StepSchedule, Trainer


@dataclass
class LoopSettings:
    """The generic loop's settings as ``finetune/train_unconditional.py`` names them, with the EDM wing's
    defaults (EDM's and DiffMemorize's Adam: LR 2e-4, no weight decay, no clipping)."""

    lr: float = option(2e-4, help="learning rate after the ramp-up")
    optimizer: str = option("adam", choices=OPTIMIZERS,
                            help="adam: weight decay as coupled L2 (DiffMemorize's Adam); adamw: decoupled")
    weight_decay: float = option(0.0, help="weight decay of the optimizer")
    momentum: float = option(0.9, help="SGD momentum")
    max_grad_norm: float = option(0.0, help="gradient clipping; 0 (EDM) disables it")
    seed: int = option(0, help="initial weights, data order, σ and noise draws")
    resume_from_checkpoint: str | None = option(None, type=str, metavar="latest|PATH",
                                                help="'latest' or a checkpoint-N folder")
    checkpoints_total_limit: int = option(2, help="resume checkpoints kept")
    mixed_precision: str | None = option(None, choices=MIXED_PRECISIONS, help="None: the accelerate config's")
    report_to: str = option("tensorboard", choices=REPORT_TO, help="experiment tracker")
    progress: bool = option(True, flag="--no_progress", help="progress bar (--no_progress: none)")

    def train_config(self, output_dir: str) -> TrainConfig:
        """The generic loop's settings for a run in ``output_dir`` (batch and length are set by the run)."""
        return TrainConfig(
            output_dir=str(output_dir), seed=self.seed, learning_rate=self.lr, optimizer=self.optimizer,
            adam_weight_decay=self.weight_decay, sgd_momentum=self.momentum, max_grad_norm=self.max_grad_norm,
            use_ema=True, checkpoints_total_limit=self.checkpoints_total_limit,
            resume_from_checkpoint=self.resume_from_checkpoint, mixed_precision=self.mixed_precision,
            report_to=self.report_to, tracker_project_name="diffmem-edm", show_progress=self.progress,
        )


@dataclass
class UnconditionalConfig:
    """Everything ``finetune/train_unconditional.py`` sets: data, network, schedule (here), the architecture's
    widths (``arch``) and the generic loop's settings (``loop``)."""

    data: str = option(help="EDM dataset zip (data/dataset_tool.py writes one)", metavar="ZIP")
    outdir: str = option(flag="--out", aliases=("--outdir",), help="run folder: snapshots, checkpoints, logs",
                         metavar="DIR")
    cond: bool = option(False, help="class-conditional on the dataset's labels")
    xflip: bool = option(False, help="EDM's x-flips: the dataset doubled with mirrored copies")
    arch: ArchConfig = field(default_factory=ArchConfig)
    precond: str = option("vp", choices=PRECONDS, help="preconditioning and loss (Karras et al. 2022, Table 1)")
    skip_connections: list[int] | None = option(None, type=int_list, nargs="+", metavar="0/1",
                                                help="one 0/1 per encoder output, stem first (DiffMemorize's "
                                                     "format); None: all 1")
    duration: float = option(200.0, help="training length, Mimg (fractions allowed); with --schedule diffmemorize "
                                         "rescaled by |D|")
    schedule: str = option("edm", choices=SCHEDULES,
                           help="diffmemorize: rescale duration, EMA half-life and LR ramp-up by |D| as Gu et al.")
    batch: int = option(512, flag="--batch_size", aliases=("--batch",), help="global batch per optimizer step")
    batch_gpu: int | None = option(None, type=int, metavar="N",
                                   help="per-process micro-batch (accumulation makes up the rest; None: all)")
    lr_rampup: float | None = option(None, type=float, metavar="KIMG", help="LR ramp-up, kimg (None: the "
                                                                            "schedule's)")
    ema: float = option(0.5, help="EMA half-life, Mimg")
    ema_mode: str | None = option(None, choices=EMA_MODES,
                                  help="None: halflife with --schedule edm, diffmemorize (their mode2) with "
                                       "diffmemorize")
    ema_beta: float | None = option(None, type=float, metavar="B", help="the β of --ema_mode constant")
    snap: float = option(2500.0, help="kimg between snapshots (fractions allowed)")
    loop: LoopSettings = field(default_factory=LoopSettings)

    def validate(self, data_must_exist: bool = True) -> None:
        """Argument-level checks, before any file is read or written; raises ConfigError (one line)."""
        self.arch.validate()
        for name in ("batch",):
            if getattr(self, name) < 1:
                raise ConfigError(f"--batch_size must be >= 1, got {getattr(self, name)}")
        if self.batch_gpu is not None and self.batch_gpu < 1:
            raise ConfigError(f"--batch_gpu must be >= 1, got {self.batch_gpu}")
        for name, value in (("duration", self.duration), ("snap", self.snap), ("lr", self.loop.lr)):
            if value <= 0:
                raise ConfigError(f"--{name} must be > 0, got {value}")
        if self.ema < 0:
            raise ConfigError(f"--ema must be >= 0, got {self.ema}")
        if self.loop.weight_decay < 0:
            raise ConfigError(f"--weight_decay must be >= 0, got {self.loop.weight_decay}")
        if (self.ema_mode == "constant") != (self.ema_beta is not None):
            raise ConfigError("--ema_mode constant and --ema_beta go together")
        if self.ema_beta is not None and not 0.0 <= self.ema_beta <= 1.0:
            raise ConfigError(f"--ema_beta must be in [0, 1], got {self.ema_beta}")
        if self.skip_connections is not None and any(m not in (0, 1) for m in self.skip_connections):
            raise ConfigError(f"--skip_connections takes 0/1 entries, got {','.join(map(str, self.skip_connections))}")
        if self.precond not in EDM_PRECONDS and is_edm_arch(self.arch.arch):
            raise ConfigError(f"--arch {self.arch.arch} trains with --precond {' | '.join(EDM_PRECONDS)}")
        out = Path(self.outdir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; expected a run folder (new or one to resume)")
        if data_must_exist and not Path(self.data).is_file():
            raise ConfigError(f"--data {self.data}: no such file (expected an EDM dataset zip; see "
                              "data/dataset_tool.py)")


# ----------------------------------------------------------------------------------------- data


class XFlipDataset:
    """EDM's ``--xflip``: the dataset doubled, item N + i being image i mirrored left-right (not a random flip)."""

    def __init__(self, base: ImageDataset):
        self.base = base

    def __len__(self) -> int:
        return 2 * len(self.base)

    def __getitem__(self, key):
        epoch, position, index = key
        n = len(self.base)
        item = self.base[(epoch, position, index % n)]
        if index >= n:
            item["pixel_values"] = item["pixel_values"].flip(-1)
        item["index"] = int(index)
        return item


# ----------------------------------------------------------------------------------------- loss


class EDMTrainingLoss:
    """batch -> LossTerms: λ(σ)‖D(y + σε; σ) − y‖² per sample (Karras et al. 2022, Eq. 2 and Table 1)."""

    def __init__(self, pre: Preconditioning, device: torch.device, conditional: bool):
        self.pre = pre
        self.device = device
        self.conditional = conditional

    def __call__(self, batch: dict, models: dict) -> LossTerms:
        net = models["net"]
        y = batch["pixel_values"].float()
        # One generator per sample for both draws (σ's, then the noise): a second seeded stream per sample was
        # a measurable share of a small model's step.
        gens = [torch_generator(int(s), STREAM_NOISE) for s in batch["sample_seed"].tolist()]
        draw_fn = torch.randn if self.pre.draw_is_normal else torch.rand
        draw = torch.cat([draw_fn(1, generator=g) for g in gens]).to(self.device)
        sigma = self.pre.training_sigma(draw)
        noise = torch.stack([torch.randn(tuple(y.shape[1:]), generator=g) for g in gens]).to(self.device)
        labels = batch["label"] if self.conditional else None
        denoised = net(y + noise * sigma.view(-1, 1, 1, 1), sigma, labels)
        return LossTerms(per_sample=denoising_loss(denoised, y, sigma, self.pre), stats={"sigma": sigma})


# ------------------------------------------------------------------------------------- the run


def micro_batch_size(batch: int, batch_gpu: int | None, num_processes: int) -> tuple[int, int]:
    """(per-process micro-batch, accumulation rounds) for a global batch, as EDM's --batch-gpu splits it."""
    if batch % num_processes:
        raise ConfigError(f"--batch_size {batch} is not divisible by the {num_processes} processes")
    per_process = batch // num_processes
    micro = min(batch_gpu or per_process, per_process)
    if per_process % micro:
        raise ConfigError(f"--batch_gpu {micro} does not divide the per-process batch {per_process}")
    return micro, per_process // micro


def snapshot_steps(schedule: Schedule, snap_kimg: float):
    """snapshot_due(step): whether images seen crossed a multiple of snap_kimg · 1000 during optimizer step
    ``step`` (1-based, as the trainer counts), so snapshots follow images whatever the batch."""
    every = max(snap_kimg * 1000, 1e-9)

    def due(step: int) -> bool:
        return int(step * schedule.batch // every) > int((step - 1) * schedule.batch // every)

    return due


def checkpoint_every(schedule: Schedule, snap_kimg: float) -> int:
    """Optimizer steps between resume checkpoints: about one snapshot interval."""
    return max(1, round(snap_kimg * 1000 / schedule.batch))


# Settings that change no weight: --duration only says where to stop (the LR and EMA schedules do not depend on
# it), so a run may be extended; --snap says when to write snapshots and checkpoints. --data is bound by its hash.
FREE_SETTINGS = ("loop", "outdir", "data", "duration", "snap", "batch_gpu")
# The generic loop's names for the flags of finetune/train_unconditional.py.
FLAG_NAMES = {"learning_rate": "lr", "adam_weight_decay": "weight_decay", "sgd_momentum": "momentum"}


def run_settings(cfg: UnconditionalConfig) -> dict:
    """The settings a run's weights depend on, by flag name: bound to its output folder once it has a checkpoint
    or snapshot (``training_options.json``); computed without reading the images or building a model."""
    micro, _ = micro_batch_size(cfg.batch, cfg.batch_gpu, launched_processes())
    settings = {"data_sha256": file_sha256(cfg.data)}
    for key, value in asdict(cfg).items():
        if key == "arch":
            # flat (a refusal names num_channels, not the whole architecture), widths resolved
            settings.update(asdict(cfg.arch.resolved()))
        elif key not in FREE_SETTINGS:
            settings[key] = value
    # micro-batch per process (the global batch is --batch): resolved, so a change of process count shows too
    settings["batch_gpu"] = micro
    for key, value in bound_train_settings(cfg.loop.train_config(cfg.outdir)).items():
        if key not in ("train_batch_size", "gradient_accumulation_steps"):  # set from --batch and --batch_gpu
            settings[FLAG_NAMES.get(key, key)] = value
    return settings


def train_unconditional(cfg: UnconditionalConfig):
    """Train an EDM denoiser on an EDM dataset zip; returns the trainer's TrainSummary."""
    # Before the data is decoded or a model built: a refused resume writes nothing (one line, exit 2).
    bound = run_settings(cfg)
    train = cfg.loop.train_config(cfg.outdir)
    with lock_run_folder(train.output_dir, "--out"):
        bind_training_settings(train, bound, results_exist=bool(list_snapshots(train.output_dir)),
                               outdir_flag="--out")
        local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
        data = load_dataset_zip(cfg.data, progress=local_main and train.show_progress)
        base = ImageDataset(data, seed=train.seed)
        if cfg.cond and not base.has_labels:
            raise ConfigError(f"{cfg.data}: --cond needs labels in dataset.json (this dataset has none)")
        if cfg.xflip and base.is_float:
            # A mirrored MoLRG sample is not in the mixture (mirroring leaves its subspaces): augmentation stays off.
            raise ConfigError(f"{cfg.data}: holds float data (MoLRG); --xflip would leave its distribution, omit it")
        dataset = XFlipDataset(base) if cfg.xflip else base
        channels, height, width = base.shape
        if height != width:
            raise ConfigError(f"{cfg.data}: images are {height}×{width}; the network needs square images")
        arch = replace(cfg.arch, resolution=height, channels=channels,
                       label_dim=base.num_classes if cfg.cond else 0).resolved()
        # The same initial weights on every process (and for every process count): seed the global RNG. Built
        # before the accelerator, so that a skip mask of the wrong length is refused before anything is written.
        torch.manual_seed(cfg.loop.seed)
        pre = Preconditioning(cfg.precond)
        net = build_network(arch, pre, cfg.skip_connections).train()
        schedule = resolve_schedule(cfg.schedule, duration_mimg=cfg.duration, ema_mimg=cfg.ema,
                                    dataset_size=len(dataset), batch=cfg.batch, lr_rampup_kimg=cfg.lr_rampup,
                                    ema_mode=cfg.ema_mode, ema_beta=cfg.ema_beta)

        # --batch is global (EDM's rule): split it over the launched processes and accumulation rounds.
        micro, accum = micro_batch_size(cfg.batch, cfg.batch_gpu, int(os.environ.get("WORLD_SIZE", "1")))
        train.train_batch_size, train.gradient_accumulation_steps = micro, accum
        train.max_train_steps = schedule.total_steps
        train.checkpointing_steps = checkpoint_every(schedule, cfg.snap)
        accelerator = make_accelerator(train)
        # snapshot.json: the bound settings (training_options.json) and what follows from them and the data.
        settings = {**bound, "data": str(Path(cfg.data).resolve()), "duration": cfg.duration, "snap": cfg.snap,
                    "arch_resolved": describe(arch), "dataset_size": len(dataset), "parameters": count_parameters(net),
                    "schedule_resolved": asdict(schedule)}
        out = Path(train.output_dir)

        def snapshot(step: int, models: dict) -> None:
            images = step * schedule.batch
            save_snapshot(models["net"], out, images, {
                "step": step, "sampler": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "steps": 18},
                "training": settings,
            })

        trainer = Trainer(
            accelerator, train, {"net": net},
            EDMTrainingLoss(pre, accelerator.device, conditional=cfg.cond), dataset, collate_image_batch,
            tracker_config={k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))},
            extra_state={"schedule": asdict(schedule)},
            schedule=StepSchedule(lr=schedule.lr, ema_beta=schedule.ema, snapshot=snapshot,
                                  snapshot_due=snapshot_steps(schedule, cfg.snap)),
        )
        return trainer.train()
