"""Flux.1: T5's sequence and CLIP's pooled output, latents packed 2×2 into tokens, a transformer predicting the
rectified-flow velocity at timestep/1000. dev is guidance-distilled (a guidance value is an input, the unconditional
branch was never trained; diffusers' ``true_cfg_scale`` with a negative prompt gives real CFG); schnell samples
without guidance."""

from __future__ import annotations

import numpy as np
import torch

from diffmem.common.t2i.pipelines.conditioning import Conditioning
from diffmem.common.t2i.pipelines.family import EncodedPrompts, TextSegment, _truncated
from diffmem.common.t2i.pipelines.flow import FlowFamily

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length
DISTILLED_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: the distilled guidance value dev takes as input


class FluxFamily(FlowFamily):
    key = "flux"
    label = "Flux.1"
    pipeline_classes = ("FluxPipeline",)
    max_shift_default = 1.15
    timestep_weighting = "none"  # diffusers' train_dreambooth_flux.py default: uniform σ, unweighted loss
    trained_unconditional = False

    @property
    def guidance_distilled(self) -> bool:
        """dev (guidance_embeds): the guidance value is an input; schnell: none."""
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def label_variant(self) -> str:
        return "Flux.1-dev (guidance-distilled)" if self.guidance_distilled else "Flux.1-schnell (no guidance)"

    def default_sample_size(self):
        return self.pipe.default_sample_size

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """[C, h, w] before packing: C = in_channels / 4, h = 2·⌊H / (2·vae_scale_factor)⌋ (FluxPipeline's)."""
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels // 4, 2 * (self.height // (f * 2)), 2 * (self.width // (f * 2)))

    def image_seq_len(self) -> int:
        _, h, w = self.latent_shape
        return (h // 2) * (w // 2)

    @torch.no_grad()
    def encode(self, parts, prompts: list[str]) -> EncodedPrompts:
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=parts.device, num_images_per_prompt=1,
                                                    max_sequence_length=MAX_SEQUENCE_LENGTH)
        flags = [_truncated(self.pipe.tokenizer, prompts, self.pipe.tokenizer_max_length),
                 _truncated(self.pipe.tokenizer_2, prompts, MAX_SEQUENCE_LENGTH)]
        return EncodedPrompts(Conditioning(embeds, pooled), [a or b for a, b in zip(*flags)])

    def unconditional(self, parts) -> Conditioning:
        """encode(""): the negative prompt of diffusers' true CFG (dev and schnell were not trained on it)."""
        return self.encode(parts, [""]).embeds

    def text_segments(self) -> list[TextSegment]:
        return [TextSegment("text_encoder_2", "tokenizer_2", (0, MAX_SEQUENCE_LENGTH)),
                TextSegment("text_encoder", "tokenizer", None)]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[1:]
        return self.pipe._pack_latents(x, x.shape[0], c, h, w)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pipe._unpack_latents(tokens, self.height, self.width, self.pipe.vae_scale_factor)

    def predict(self, parts, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        n, (_, h, w) = x.shape[0], self.latent_shape
        dtype = parts.dtype
        image_ids = self.pipe._prepare_latent_image_ids(n, h // 2, w // 2, x.device, dtype)
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=dtype)  # as encode_prompt's
        guidance = (torch.full((n,), DISTILLED_GUIDANCE, device=x.device, dtype=torch.float32)
                    if self.guidance_distilled else None)
        timestep = torch.as_tensor(t, device=x.device).expand(n).to(dtype) / 1000
        out = parts.unet(hidden_states=self.pack(x.to(dtype)), timestep=timestep, guidance=guidance,
                            pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=text_ids,
                            img_ids=image_ids, return_dict=False)[0]
        return self.unpack(out).float()

    def set_timesteps(self, scheduler, num_inference_steps: int) -> None:
        """FluxPipeline's schedule: σ from 1 to 1/n, always shifted by the resolution's μ."""
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps,
                                                                                  num_inference_steps)
        scheduler.set_timesteps(num_inference_steps, device=self.device, sigmas=sigmas, mu=self.shift_mu(scheduler))

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pack(latents)

    def guidance_problem(self, guidance_scale: float) -> str | None:
        """schnell samples without guidance; dev takes real CFG (diffusers' true_cfg_scale) against encode("")."""
        if not self.guidance_distilled and guidance_scale != 1:
            return "Flux.1-schnell is distilled to sample without guidance: pass --guidance_scale 1"
        return None
