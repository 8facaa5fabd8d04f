"""The generic training loop's settings (``TrainConfig``) and the choices they take; torch-free."""

from __future__ import annotations

import os
from dataclasses import dataclass

from diffmem.common.errors import DiffmemError
from diffmem.common.settings import option

# Settings a resumed run must share with the checkpoint, or the data order / step arithmetic would differ.
RESUME_KEYS = ("seed", "train_batch_size", "num_processes", "gradient_accumulation_steps", "num_samples",
               "shuffle", "use_ema", "model_names")


# TrainConfig fields that change no trained weight: where files go and how often, what is logged or shown, and
# the run's length (a run may be extended; its steps so far stay the same, unless an LR schedule's shape depends
# on the length, which the arm then binds itself). Every other field is bound to a run once it has a checkpoint.
TRAIN_FREE_FIELDS = ("output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit",
                     "report_to", "tracker_project_name", "logging_dir", "show_progress", "validation_steps",
                     "dataloader_num_workers", "max_train_steps", "num_train_epochs")


OPTIMIZERS = ("adamw", "adam", "sgd")


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


MIXED_PRECISIONS = ("no", "fp16", "bf16")


REPORT_TO = ("tensorboard", "wandb", "all", "none")


class TrainSetupError(DiffmemError, ValueError):
    """A training setup that cannot run; str() is the one-line message for the user."""


@dataclass
class TrainConfig:
    """Settings of the generic loop (model- and data-independent)."""

    output_dir: str = option(flag="--out", aliases=("--output_dir",),
                             help="run folder: checkpoints, logs and the trained model")
    seed: int = option(0, help="seed of the data order, noise and timesteps")
    train_batch_size: int = option(16, flag="--batch_size", aliases=("--train_batch_size",), help="per process")
    num_train_epochs: int = option(100, help="passes over the data (unless --max_train_steps)")
    max_train_steps: int | None = option(None, type=int, help="overrides --num_train_epochs")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step")
    learning_rate: float = option(1e-4, help="base learning rate")
    scale_lr: bool = option(False, help="multiply the LR by accumulation x batch x processes")
    lr_scheduler: str = option("constant", choices=LR_SCHEDULERS, help="diffusers' named LR schedule")
    lr_warmup_steps: int = option(500, help="LR warm-up in optimizer steps")
    adam_beta1: float = option(0.9, help="Adam beta1")
    adam_beta2: float = option(0.999, help="Adam beta2")
    adam_weight_decay: float = option(1e-2, help="weight decay")
    adam_epsilon: float = option(1e-8, help="Adam epsilon")
    max_grad_norm: float = option(1.0, help="0 disables clipping")
    use_8bit_adam: bool = option(False, help="bitsandbytes 8-bit AdamW (needs the bnb extra and a GPU)")
    # adamw: decoupled weight decay; adam: torch Adam, weight decay as coupled L2 (EDM/DiffMemorize's
    # ``Adam(weight_decay=…)``); sgd: momentum SGD. adam_weight_decay is the weight decay of each of them.
    optimizer: str = option("adamw", choices=OPTIMIZERS, help="adamw: decoupled weight decay; adam: coupled L2; "
                                                             "sgd: momentum SGD")
    sgd_momentum: float = option(0.9, help="momentum of --optimizer sgd")
    use_ema: bool = option(False, help="keep an EMA of the weights (saved as the model)")
    ema_decay: float = option(0.9999, help="EMA decay")
    checkpointing_steps: int = option(500, help="save a checkpoint every N optimizer steps")
    checkpoints_total_limit: int | None = option(None, type=int, help="keep at most N checkpoints")
    resume_from_checkpoint: str | None = option(None, type=str, help="'latest' or a checkpoint-N folder")
    mixed_precision: str | None = option(None, choices=MIXED_PRECISIONS, help="None: the accelerate config's")
    report_to: str = option("tensorboard", choices=REPORT_TO, help="experiment tracker")
    tracker_project_name: str = option("diffmem", help="the tracker's project name")
    logging_dir: str = option("logs", help="tracker folder, relative to --out")
    dataloader_num_workers: int = option(0, help="data loader worker processes")
    allow_tf32: bool = option(False, help="TF32 matmuls on Ampere+ GPUs")
    validation_steps: int | None = option(None, type=int,
                                          help="run the validation every N steps (always at the end)")
    shuffle: bool = option(True, help="reshuffle the data every epoch", flag="--no_shuffle")
    show_progress: bool = option(True, help="hide the progress bar", flag="--no_progress")


def resolved_mixed_precision(value: str | None) -> str:
    """The mixed precision a run gets: the flag, else the one ``accelerate launch`` passes on, else no."""
    return value or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def launched_processes() -> int:
    """The number of processes of this launch (1 without ``accelerate launch``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
