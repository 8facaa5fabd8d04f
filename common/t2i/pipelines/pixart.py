"""PixArt-α/Σ: one T5 encoder with its attention mask, a DiT predicting ε and, with learned σ, a variance in a second
block of channels that the pipeline drops; captions go in as given (``clean_caption`` off)."""

from __future__ import annotations

import inspect

import torch

from diffmem.common.t2i.pipelines.conditioning import Conditioning
from diffmem.common.t2i.pipelines.family import EncodedPrompts, Family, TextSegment, _truncated


class PixArtFamily(Family):
    key = "pixart"
    label = "PixArt-α/Σ"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    cross_attention_unet = False
    clip_padding = False

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def max_sequence_length(self) -> int:
        """The pipeline's own T5 length (α: 120, Σ: 300)."""
        return inspect.signature(self.pipe.encode_prompt).parameters["max_sequence_length"].default

    @torch.no_grad()
    def encode(self, parts, prompts: list[str]) -> EncodedPrompts:
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=parts.device,
                                                     clean_caption=False, max_sequence_length=self.max_sequence_length)
        return EncodedPrompts(Conditioning(embeds, None, mask),
                              _truncated(self.pipe.tokenizer, prompts, self.max_sequence_length))

    @torch.no_grad()
    def unconditional(self, parts) -> Conditioning:
        _, _, neg, neg_mask = self.pipe.encode_prompt([""], do_classifier_free_guidance=True, negative_prompt="",
                                                      device=parts.device, clean_caption=False,
                                                      max_sequence_length=self.max_sequence_length)
        return Conditioning(neg, None, neg_mask)

    def text_segments(self) -> list[TextSegment]:
        return [TextSegment("text_encoder", "tokenizer", (0, self.max_sequence_length))]

    def predict(self, parts, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        n = x.shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(parts.unet, "use_additional_conditions", False):  # PixArt-α at 1024: size conditioning
            added = {"resolution": torch.tensor([[self.height, self.width]], device=x.device).repeat(n, 1),
                     "aspect_ratio": torch.tensor([[self.height / self.width]], device=x.device).repeat(n, 1)}
        timestep = torch.as_tensor(t, device=x.device).expand(n)
        out = parts.unet(x.to(parts.dtype), encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask,
                            timestep=timestep, added_cond_kwargs=added, return_dict=False)[0].float()
        if parts.unet.config.out_channels // 2 == x.shape[1]:
            out = out.chunk(2, dim=1)[0]  # learned σ: the variance channels are not part of ε
        return out

    def pipeline_kwargs(self) -> dict:
        return dict(height=self.height, width=self.width, use_resolution_binning=False, clean_caption=False)
