"""SDXL: two CLIP encoders whose hidden states are concatenated, the second's pooled output, micro-conditioning time
ids, a UNet predicting ε; and ``force_zeros_for_empty_prompt``, under which the unconditional branch is zeros."""

from __future__ import annotations

import torch

from diffmem.common.t2i.pipelines.conditioning import Conditioning
from diffmem.common.t2i.pipelines.family import EncodedPrompts, Family, TextSegment, _truncated


class SDXLFamily(Family):
    key = "sdxl"
    label = "SDXL"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    def _encoders(self):
        return [(n, t) for n, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
                if getattr(self.pipe, n, None) is not None]

    @torch.no_grad()
    def encode(self, parts, prompts: list[str]) -> EncodedPrompts:
        """The pipeline's own ``encode_prompt``: penultimate hidden states of both encoders side by side, pooled."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=parts.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        truncated = [any(flags) for flags in zip(*[
            _truncated(getattr(self.pipe, t), prompts, getattr(self.pipe, t).model_max_length)
            for _, t in self._encoders()])]
        return EncodedPrompts(Conditioning(embeds, pooled), truncated)

    @torch.no_grad()
    def unconditional(self, parts) -> Conditioning:
        """The pipeline's negative branch with no negative prompt: zeros under force_zeros_for_empty_prompt (SDXL
        base's default), else encode("")."""
        _, neg, _, neg_pooled = self.pipe.encode_prompt([""], device=parts.device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=True)
        return Conditioning(neg, neg_pooled)

    def text_segments(self) -> list[TextSegment]:
        segments, col = [], 0
        for name, tok in self._encoders():
            width = getattr(self.pipe, name).config.hidden_size
            segments.append(TextSegment(name, tok, (0, getattr(self.pipe, tok).model_max_length), (col, col + width)))
            col += width
        return segments

    def time_ids(self, parts, n: int) -> torch.Tensor:
        """(original size, crop top-left, target size) = ((H, W), (0, 0), (H, W)), as the pipeline's defaults."""
        proj = self.pipe.text_encoder_2.config.projection_dim if self.pipe.text_encoder_2 is not None else None
        ids = self.pipe._get_add_time_ids((self.height, self.width), (0, 0), (self.height, self.width),
                                          dtype=parts.dtype, text_encoder_projection_dim=proj)
        return ids.to(parts.device).expand(n, -1)

    def predict(self, parts, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        added = {"text_embeds": cond.pooled, "time_ids": self.time_ids(parts, x.shape[0])}
        return parts.unet(x.to(parts.dtype), t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added,
                             return_dict=False)[0].float()
