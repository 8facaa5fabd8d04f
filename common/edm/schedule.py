"""Training schedules of EDM (Karras et al. 2022, training_loop.py) and DiffMemorize (Gu et al. 2023, train.py):
duration, LR ramp-up and the EMA β per optimizer step, as short pure functions.

Both loops update with the images seen *before* the step, cur_nimg = k · batch at step k (0-based): the first
step runs at LR 0 and sets the EMA to the weights (β = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("edm", "diffmemorize")
EMA_MODES = ("halflife", "diffmemorize", "constant")
EMA_RAMPUP_RATIO = 0.05  # EDM's ema_rampup_ratio: the half-life is at most 5 % of the images seen
DIFFMEMORIZE_REFERENCE_SIZE = 50000  # |D| of full CIFAR-10, to which DiffMemorize rescales


def lr_multiplier(step: int, batch: int, rampup_kimg: float) -> float:
    """min(cur_nimg / (rampup_kimg · 1000), 1) with cur_nimg = step · batch (EDM training_loop, LR ramp-up)."""
    return min(step * batch / max(rampup_kimg * 1000, 1e-8), 1.0)


def ema_halflife_nimg(step: int, batch: int, halflife_kimg: float,
                      rampup_ratio: float | None = EMA_RAMPUP_RATIO) -> float:
    """min(halflife_kimg · 1000, cur_nimg · rampup_ratio) (EDM training_loop, EMA ramp-up)."""
    h = halflife_kimg * 1000
    return min(h, step * batch * rampup_ratio) if rampup_ratio is not None else h


def ema_beta_halflife(step: int, batch: int, halflife_kimg: float,
                      rampup_ratio: float | None = EMA_RAMPUP_RATIO) -> float:
    """β = 0.5^(batch / max(h, 1e-8)) (EDM training_loop; DiffMemorize's ``mode1``)."""
    return 0.5 ** (batch / max(ema_halflife_nimg(step, batch, halflife_kimg, rampup_ratio), 1e-8))


def ema_beta_diffmemorize(step: int, batch: int, halflife_kimg: float, data_ratio: float,
                          rampup_ratio: float | None = EMA_RAMPUP_RATIO) -> float:
    """β = 0.5^(512 / max(h, 1e-8) / data_ratio), 512 fixed whatever the batch (DiffMemorize ``mode2``)."""
    return 0.5 ** (512 / max(ema_halflife_nimg(step, batch, halflife_kimg, rampup_ratio), 1e-8) / data_ratio)


@dataclass(frozen=True)
class Schedule:
    """The resolved schedule of one run, in images and kimg."""

    total_kimg: float
    lr_rampup_kimg: float
    ema_halflife_kimg: float
    ema_mode: str
    ema_beta: float | None  # constant mode
    data_ratio: float
    batch: int

    @property
    def total_steps(self) -> int:
        """Optimizer steps until cur_nimg ≥ total_kimg · 1000 (EDM's stopping rule)."""
        return max(1, math.ceil(self.total_kimg * 1000 / self.batch - 1e-9))

    def lr(self, step: int) -> float:
        """The LR multiplier of optimizer step ``step`` (0-based)."""
        return lr_multiplier(step, self.batch, self.lr_rampup_kimg)

    def ema(self, step: int) -> float:
        """The EMA β of optimizer step ``step`` (0-based)."""
        if self.ema_mode == "constant":
            return float(self.ema_beta)
        if self.ema_mode == "diffmemorize":
            return ema_beta_diffmemorize(step, self.batch, self.ema_halflife_kimg, self.data_ratio)
        return ema_beta_halflife(step, self.batch, self.ema_halflife_kimg)


def resolve_schedule(schedule: str, *, duration_mimg: float, ema_mimg: float, dataset_size: int, batch: int,
                     lr_rampup_kimg: float | None = None, ema_mode: str | None = None,
                     ema_beta: float | None = None) -> Schedule:
    """EDM's schedule (duration and EMA half-life in Mimg, LR ramp-up 10 Mimg by default), or DiffMemorize's
    rescaling by |D|: total_kimg = max(int(duration·|D|/50), 1), ema_halflife_kimg = int(ema·|D|/50),
    lr_rampup_kimg = int(|D|/5), data_ratio = 50000/|D|, mode2 EMA (DiffMemorize train.py)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if schedule == "diffmemorize":
        total = max(int(duration_mimg * dataset_size / 50), 1)
        halflife = int(ema_mimg * dataset_size / 50)
        rampup = int(dataset_size / 5) if lr_rampup_kimg is None else lr_rampup_kimg
        mode = ema_mode or "diffmemorize"
    else:
        total, halflife = duration_mimg * 1000, ema_mimg * 1000
        rampup = 10000 if lr_rampup_kimg is None else lr_rampup_kimg
        mode = ema_mode or "halflife"
    if mode not in EMA_MODES:
        raise ValueError(f"unknown EMA mode {mode!r}; expected one of {', '.join(EMA_MODES)}")
    return Schedule(total_kimg=total, lr_rampup_kimg=rampup, ema_halflife_kimg=halflife, ema_mode=mode,
                    ema_beta=ema_beta, data_ratio=DIFFMEMORIZE_REFERENCE_SIZE / dataset_size, batch=batch)
