"""What scoring, sampling and explanation hold of a loaded pipeline: the denoiser, the text side, the scheduler the
run uses, and the family that knows how to call them (:class:`DenoiserParts`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from diffmem.common.t2i.options import SCHEDULERS
from diffmem.common.t2i.pipelines.conditioning import Conditioning, as_conditioning
from diffmem.common.t2i.pipelines.family import EncodedPrompts, Family, FamilyError
from diffmem.common.t2i.pipelines.loader import family_of


@dataclass
class DenoiserParts:
    """The denoiser (``unet``: a UNet or a transformer), the first text encoder and tokenizer, the scheduler of
    the run and the family. The denoiser and encoder are fields so that a test can swap them."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    latent_shape: tuple[int, int, int]
    family: Family

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def prediction_type(self) -> str:
        return self.family.prediction_type(self.scheduler)

    # The family's answers, with this run's modules and scheduler.
    def encode(self, prompts: list[str]) -> EncodedPrompts:
        return self.family.encode(self, prompts)

    def unconditional(self) -> Conditioning:
        """The family's unconditional branch, one row."""
        return self.family.unconditional(self)

    def predict(self, x: torch.Tensor, t, cond: Conditioning | torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output (fp32), latents x [N, C, h, w] already scaled for the model."""
        return self.family.predict(self, x, t, as_conditioning(cond).to(device=self.device, dtype=self.dtype))

    def timesteps_scheduler(self, num_inference_steps: int, scheduler=None):
        """A fresh copy of the run's scheduler with its timesteps set (schedulers keep per-trajectory state)."""
        sched = copy.deepcopy(self.scheduler if scheduler is None else scheduler)
        self.family.set_timesteps(sched, num_inference_steps)
        return sched

    def init_noise_sigma(self, num_inference_steps: int) -> float:
        """What x_T ~ N(0, I) is scaled by before the first step, once the timesteps are set (Euler's depends on them,
        as in its pipeline; FlowMatchEuler has none: 1)."""
        return float(getattr(self.timesteps_scheduler(num_inference_steps), "init_noise_sigma", 1.0))

    def scale_model_input(self, scheduler, x: torch.Tensor, t) -> torch.Tensor:
        return self.family.scale_model_input(scheduler, x, t)

    def metric_output(self, out: torch.Tensor, x_in: torch.Tensor, t, scheduler=None) -> torch.Tensor:
        """ε (the ε/v UNet families) or the velocity (rectified flow): what the text-conditional difference is of."""
        return self.family.metric_output(out, x_in, t, self.scheduler if scheduler is None else scheduler)

    def sharpness_field(self, out: torch.Tensor, x_in: torch.Tensor, t, scheduler=None) -> torch.Tensor:
        return self.family.sharpness_field(out, x_in, t, self.scheduler if scheduler is None else scheduler)

    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        return self.family.decode(latents, batch_size)


def denoiser_parts(pipe, scheduler: str | None = None, height: int | None = None,
                   width: int | None = None) -> DenoiserParts:
    """The parts of a pipeline used for scoring: ``ddim`` swaps its scheduler to DDIM (Wen et al.), ``pipeline``
    keeps its own; None takes the family's default (DDIM for the ε/v UNets, FlowMatchEuler for SD3 and Flux)."""
    from diffusers import DDIMScheduler

    family = family_of(pipe)(pipe, height, width)
    scheduler = family.default_scheduler if scheduler is None else scheduler
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
    family.check_scheduler(scheduler)
    sched = DDIMScheduler.from_config(pipe.scheduler.config) if scheduler == "ddim" else pipe.scheduler
    return DenoiserParts(unet=family.denoiser, text_encoder=getattr(pipe, "text_encoder", None),
                         tokenizer=getattr(pipe, "tokenizer", None), scheduler=sched,
                         latent_shape=family.latent_shape, family=family)


__all__ = ["DenoiserParts", "FamilyError", "denoiser_parts"]
