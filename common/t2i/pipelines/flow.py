"""What the rectified-flow families (SD3, Flux) share: their own FlowMatchEuler scheduler, a velocity output, and
the detectors' metric in velocity space (:mod:`common.t2i.rectified_flow`)."""

from __future__ import annotations

import torch

from diffmem.common.t2i.pipelines.family import Family
from diffmem.common.t2i.rectified_flow import flow_x0


def timestep_sigma(scheduler, t) -> float:
    """σ of a FlowMatchEuler timestep (its timesteps are σ · num_train_timesteps)."""
    return float(t) / scheduler.config.num_train_timesteps


class FlowFamily(Family):
    """A transformer predicting the rectified-flow velocity v = ε − x₀, sampled by its own FlowMatchEuler."""

    flow = True
    # Fine-tuning's σ density / loss weighting (common/t2i/train.py): diffusers' train_dreambooth_sd3.py default,
    # Esser et al. 2024's best (rf/lognorm(0, 1), Sec. 5.1).
    timestep_weighting = "logit_normal"
    default_scheduler = "pipeline"
    schedulers = ("pipeline",)  # DDIM's ᾱ schedule does not describe these models
    cross_attention_unet = False
    clip_padding = False

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def default_sample_size(self):
        return self.denoiser.config.sample_size

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.denoiser.config.patch_size

    def prediction_type(self, scheduler) -> str:
        return "flow"

    def image_seq_len(self) -> int:
        _, h, w = self.latent_shape
        p = self.denoiser.config.patch_size
        return (h // p) * (w // p)

    def shift_mu(self, scheduler) -> float:
        """The resolution-dependent shift of a dynamically shifted schedule (diffusers' calculate_shift)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = scheduler.config
        return calculate_shift(self.image_seq_len(), cfg.get("base_image_seq_len", 256),
                               cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                               cfg.get("max_shift", self.max_shift_default))

    max_shift_default = 1.16

    def set_timesteps(self, scheduler, num_inference_steps: int) -> None:
        mu = self.shift_mu(scheduler) if scheduler.config.get("use_dynamic_shifting") else None
        scheduler.set_timesteps(num_inference_steps, device=self.device, mu=mu)

    def scale_model_input(self, scheduler, x: torch.Tensor, t) -> torch.Tensor:
        return x  # FlowMatchEuler feeds x_σ as it is

    def metric_output(self, out: torch.Tensor, x_in: torch.Tensor, t, scheduler) -> torch.Tensor:
        """The velocity itself: v_c − v_u is the metric (at σ = 1 it is x̂₀_c − x̂₀_u; ε̂_c − ε̂_u is 0 there)."""
        return out

    def sharpness_field(self, out: torch.Tensor, x_in: torch.Tensor, t, scheduler) -> torch.Tensor:
        """The velocity: the score difference is −((1−σ)/σ)(v_c − v_u), zero at the first σ = 1, so Jeon et al.'s
        Jacobian difference is taken on the velocity field."""
        return out

    def clean_estimate(self, out: torch.Tensor, x: torch.Tensor, t, scheduler) -> torch.Tensor:
        """x̂₀ = x_σ − σ·v (:func:`common.t2i.rectified_flow.flow_x0`)."""
        return flow_x0(x.float(), out, timestep_sigma(scheduler, t))

    def clean_weight(self, scheduler, step: int) -> float:
        """1 − σ of the next step: x_σ' = (1−σ')·x̂₀ + σ'·ε̂ (Esser et al. 2024, Eq. 2)."""
        return 1.0 - float(scheduler.sigmas[step + 1])

    def clean_estimate_problem(self, scheduler) -> str | None:
        return None  # FlowMatchEuler, the only scheduler of these families
