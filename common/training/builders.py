"""What the loop is built from: the Accelerator, the optimizer, the LR schedule and the EMA."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffmem.common.training.config import OPTIMIZERS, TrainConfig, TrainSetupError

if TYPE_CHECKING:  # the loop imports this module
    from diffmem.common.training.loop import StepSchedule


def make_accelerator(cfg: TrainConfig):
    """An Accelerator for ``cfg`` (mixed precision from cfg, else from the accelerate config / launch flags)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / cfg.logging_dir))
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to in (None, "none") else cfg.report_to,
            project_config=project,
        )
    except (ValueError, RuntimeError, ImportError) as exc:
        first = str(exc).strip().splitlines()
        raise TrainSetupError(f"cannot set up Accelerate: {first[0] if first else type(exc).__name__}") from exc
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise TrainSetupError(
            f"{world} processes were launched but Accelerate runs each alone (no GPU: launch with "
            "ACCELERATE_USE_CPU=true for multi-process CPU training)"
        )
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    """The dtype frozen modules are kept in: fp16/bf16 under mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, lr: float):
    """Fused AdamW (or Adam with coupled L2, or momentum SGD, by ``cfg.optimizer``), or bitsandbytes' 8-bit
    AdamW with ``use_8bit_adam``."""
    if cfg.optimizer not in OPTIMIZERS:
        raise TrainSetupError(f"unknown optimizer {cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise TrainSetupError("--use_8bit_adam needs bitsandbytes (pip install 'diffmem[bnb]')") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.sgd_momentum, weight_decay=cfg.adam_weight_decay,
                               foreach=True)
    # The fused kernel (CPU and CUDA) updates every tensor in one call: on small models the per-tensor Python
    # loop of the default CPU path was a fifth of a training step (a 49408-row token embedding included).
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=True)
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=True)


def scheduled_ema(params, decay_fn: Callable[[int], float], foreach: bool):
    """A diffusers ``EMAModel`` whose β at optimizer step k (0-based) is ``decay_fn(k)``: EDM's half-life EMA
    and DiffMemorize's modes change β every step, which EMAModel's warm-up formula cannot express."""
    from diffusers.training_utils import EMAModel

    class ScheduledEMAModel(EMAModel):
        def get_decay(self, optimization_step: int) -> float:
            # EMAModel.step increments optimization_step before asking, so the first update asks for 1.
            return float(decay_fn(optimization_step - 1))

    return ScheduledEMAModel(params, foreach=foreach)


def configure_deepspeed(accelerator, cfg: TrainConfig, names: list[str]) -> bool:
    """Fit DeepSpeed's config to the loop (micro-batch, clipping); whether DeepSpeed runs."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return False
    if len(names) > 1:
        raise TrainSetupError(
            f"DeepSpeed trains one model per optimizer; got {', '.join(names)} (train one at a time)"
        )
    # Without a prepared DataLoader, Accelerate cannot infer DeepSpeed's micro-batch size.
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    if plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
        # DeepSpeed clips inside its step; --max_grad_norm is honoured through its config.
        plugin.deepspeed_config["gradient_clipping"] = float(cfg.max_grad_norm or 0.0)
    return True


def base_learning_rate(cfg: TrainConfig, num_processes: int) -> float:
    """cfg.learning_rate, times the global batch per optimizer step with ``scale_lr``."""
    if cfg.scale_lr:
        return cfg.learning_rate * cfg.gradient_accumulation_steps * cfg.train_batch_size * num_processes
    return cfg.learning_rate


def total_train_steps(cfg: TrainConfig, micro_batches: int) -> int:
    """cfg.max_train_steps, else the optimizer steps of num_train_epochs epochs of ``micro_batches`` each."""
    if cfg.max_train_steps is not None:
        return cfg.max_train_steps
    return math.ceil(cfg.num_train_epochs * micro_batches / cfg.gradient_accumulation_steps)


def build_lr_scheduler(optimizer, cfg: TrainConfig, max_train_steps: int, num_processes: int,
                       schedule: StepSchedule | None = None):
    """The schedule's per-step LR multiplier, else cfg's named diffusers schedule, in the steps it will be
    stepped in: a prepared scheduler steps once per process per optimizer step (Accelerate, split_batches=False)."""
    P = num_processes
    if schedule is not None:
        lr = schedule.lr
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr(s // P))
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps * P,
                         num_training_steps=max_train_steps * P)


def build_ema(params: list[torch.nn.Parameter], cfg: TrainConfig, schedule: StepSchedule | None, foreach: bool):
    """fp32 shadow weights with the schedule's per-step β, else cfg.ema_decay; None without ``use_ema``."""
    if not cfg.use_ema:
        return None
    if schedule is not None and schedule.ema_beta is not None:
        return scheduled_ema(params, schedule.ema_beta, foreach=foreach)
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=cfg.ema_decay, foreach=foreach)
