"""Unconditional (and class-conditional) EDM training on ``common.trainer``: the loss, the data, the schedule
and the snapshots of ``finetune/train_unconditional.py``.

The network is one trainable ``EDMNetwork`` ("net"); the loss draws σ and the noise of sample (epoch, position)
from that sample's own seeded stream (``common.seeding``), so one process and several processes with the same
global batch see the same draws, and a resumed run continues exactly.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffmem.common.edm.dataset import ImageDataset, collate_image_batch, load_dataset_zip
from diffmem.common.edm.network import ArchConfig, build_network, count_parameters, unet_config, check_skip_mask
from diffmem.common.edm.precond import Preconditioning, denoising_loss
from diffmem.common.edm.schedule import Schedule, resolve_schedule
from diffmem.common.edm.scores import file_sha256
from diffmem.common.edm.snapshot import list_snapshots, save_snapshot
from diffmem.common.errors import ConfigError
from diffmem.common.seeding import STREAM_NOISE, torch_generator
from diffmem.common.trainer import (
    LossTerms,
    StepSchedule,
    TrainConfig,
    Trainer,
    bind_training_settings,
    bound_train_settings,
    launched_processes,
    make_accelerator,
)


@dataclass
class UnconditionalConfig:
    """Everything ``finetune/train_unconditional.py`` sets; ``train`` holds the generic loop's settings."""

    data: str
    train: TrainConfig
    cond: bool = False
    arch: ArchConfig = field(default_factory=ArchConfig)
    precond: str = "vp"
    skip_connections: list[int] | None = None
    duration: float = 200.0  # Mimg (EDM); with schedule diffmemorize, rescaled by |D|
    schedule: str = "edm"
    batch: int = 512  # global batch per optimizer step
    batch_gpu: int | None = None  # per-process micro-batch; accumulation makes up the rest
    lr_rampup: float | None = None  # kimg; None: the schedule's
    ema: float = 0.5  # EMA half-life, Mimg
    ema_mode: str | None = None
    ema_beta: float | None = None
    snap: float = 2500.0  # kimg between snapshots
    xflip: bool = False


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
        raise ConfigError(f"--batch {batch} is not divisible by the {num_processes} processes")
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
FREE_SETTINGS = ("train", "data", "duration", "snap", "batch_gpu")
# The generic loop's names for the flags of finetune/train_unconditional.py.
FLAG_NAMES = {"learning_rate": "lr", "adam_weight_decay": "weight_decay", "sgd_momentum": "momentum"}


def run_settings(cfg: UnconditionalConfig) -> dict:
    """The settings a run's weights depend on, by flag name: bound to its output folder once it has a checkpoint
    or snapshot (``training_options.json``); computed without reading the images or building a model."""
    micro, _ = micro_batch_size(cfg.batch, cfg.batch_gpu, launched_processes())
    settings = {"data_sha256": file_sha256(cfg.data)}
    for key, value in asdict(cfg).items():
        if key == "arch":
            settings.update(value)  # flat: a refusal names num_channels, not the whole architecture
        elif key not in FREE_SETTINGS:
            settings[key] = value
    # micro-batch per process (the global batch is --batch): resolved, so a change of process count shows too
    settings["batch_gpu"] = micro
    for key, value in bound_train_settings(cfg.train).items():
        if key not in ("train_batch_size", "gradient_accumulation_steps"):  # set from --batch and --batch_gpu
            settings[FLAG_NAMES.get(key, key)] = value
    return settings


def train_unconditional(cfg: UnconditionalConfig):
    """Train an EDMNetwork on an EDM dataset zip; returns the trainer's TrainSummary."""
    # Before the data is decoded or a model built: a refused resume writes nothing (one line, exit 2).
    bound = run_settings(cfg)
    bind_training_settings(cfg.train, bound, results_exist=bool(list_snapshots(cfg.train.output_dir)))
    local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
    data = load_dataset_zip(cfg.data, progress=local_main and cfg.train.show_progress)
    base = ImageDataset(data, seed=cfg.train.seed)
    if cfg.cond and not base.has_labels:
        raise ConfigError(f"{cfg.data}: --cond needs labels in dataset.json (this dataset has none)")
    if cfg.xflip and base.is_float:
        # A mirrored MoLRG sample is not in the mixture (mirroring leaves its subspaces): augmentation stays off.
        raise ConfigError(f"{cfg.data}: holds float data (MoLRG); --xflip would leave its distribution, omit it")
    dataset = XFlipDataset(base) if cfg.xflip else base
    channels, height, width = base.shape
    if height != width:
        raise ConfigError(f"{cfg.data}: images are {height}×{width}; the network needs square images")
    arch = ArchConfig(**{**asdict(cfg.arch), "resolution": height, "channels": channels,
                         "label_dim": base.num_classes if cfg.cond else 0})
    if cfg.skip_connections is not None:
        check_skip_mask(cfg.skip_connections, unet_config(arch))
    schedule = resolve_schedule(cfg.schedule, duration_mimg=cfg.duration, ema_mimg=cfg.ema,
                                dataset_size=len(dataset), batch=cfg.batch, lr_rampup_kimg=cfg.lr_rampup,
                                ema_mode=cfg.ema_mode, ema_beta=cfg.ema_beta)

    # --batch is global (EDM's rule): split it over the launched processes and accumulation rounds.
    train = cfg.train
    micro, accum = micro_batch_size(cfg.batch, cfg.batch_gpu, int(os.environ.get("WORLD_SIZE", "1")))
    train.train_batch_size, train.gradient_accumulation_steps = micro, accum
    train.max_train_steps = schedule.total_steps
    train.checkpointing_steps = checkpoint_every(schedule, cfg.snap)
    accelerator = make_accelerator(train)

    # The same initial weights on every process (and for every process count): seed the global RNG.
    torch.manual_seed(train.seed)
    pre = Preconditioning(cfg.precond)
    net = build_network(arch, pre, cfg.skip_connections).train()
    # snapshot.json: the bound settings (training_options.json) and what follows from them and the data.
    settings = {**bound, "data": str(Path(cfg.data).resolve()), "duration": cfg.duration, "snap": cfg.snap,
                "arch_resolved": asdict(arch), "dataset_size": len(dataset), "parameters": count_parameters(net),
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
