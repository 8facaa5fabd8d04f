"""SD3 / SD3.5: CLIP-L and CLIP-G hidden states side by side, padded to T5's width and followed by T5's sequence;
both CLIPs' pooled outputs; an MMDiT predicting the rectified-flow velocity."""

from __future__ import annotations

import torch

from diffmem.common.t2i.pipelines.conditioning import Conditioning
from diffmem.common.t2i.pipelines.family import EncodedPrompts, TextSegment, _truncated
from diffmem.common.t2i.pipelines.flow import FlowFamily

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length


class SD3Family(FlowFamily):
    key = "sd3"
    label = "SD3/SD3.5"
    pipeline_classes = ("StableDiffusion3Pipeline",)

    def _encoders(self):
        return [(n, t) for n, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
                                    ("text_encoder_3", "tokenizer_3")) if getattr(self.pipe, n, None) is not None]

    @torch.no_grad()
    def encode(self, parts, prompts: list[str]) -> EncodedPrompts:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, None, None, device=parts.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH)
        flags = []
        for name, tok in self._encoders():
            limit = MAX_SEQUENCE_LENGTH if name == "text_encoder_3" else getattr(self.pipe, tok).model_max_length
            flags.append(_truncated(getattr(self.pipe, tok), prompts, limit))
        return EncodedPrompts(Conditioning(embeds, pooled), [any(f) for f in zip(*flags)])

    @torch.no_grad()
    def unconditional(self, parts) -> Conditioning:
        """The pipeline's negative branch with no negative prompt: encode("") by all three encoders."""
        _, neg, _, neg_pooled = self.pipe.encode_prompt(
            [""], None, None, device=parts.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            max_sequence_length=MAX_SEQUENCE_LENGTH)
        return Conditioning(neg, neg_pooled)

    def text_segments(self) -> list[TextSegment]:
        clip_len = self.pipe.tokenizer_max_length
        segments, col = [], 0
        for name, tok in self._encoders():
            if name == "text_encoder_3":
                segments.append(TextSegment(name, tok, (clip_len, clip_len + MAX_SEQUENCE_LENGTH)))
            else:
                width = getattr(self.pipe, name).config.hidden_size
                segments.append(TextSegment(name, tok, (0, clip_len), (col, col + width)))
                col += width
        return segments

    def predict(self, parts, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        timestep = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        return parts.unet(hidden_states=x.to(parts.dtype), timestep=timestep, encoder_hidden_states=cond.embeds,
                             pooled_projections=cond.pooled, return_dict=False)[0].float()
