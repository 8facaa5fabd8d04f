"""The bright-ending (BE) mask: where a generation's end token attends at the last step (Chen et al., ICLR 2025).

Chen et al. find that for memorized prompts the end token's cross-attention map at the final denoising step is
bright exactly on the memorized region ("bright ending"), and use it as a mask that localises Wen et al.'s
mitigation loss: ‖M ⊙ (ε(x_t, c) − ε(x_t, ∅))‖ instead of ‖ε(x_t, c) − ε(x_t, ∅)‖. Here M is, per generation, the
conditional half's attention probability of the prompt's first end token, averaged over heads and over every
cross-attention layer (each upsampled bilinearly to the latent's size), at the last step of an unmitigated
generation from the same starting noise, divided by its maximum so that it lies in [0, 1]. The unmitigated
generation costs 2 × steps UNet evaluations per image.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from diffmem.common.t2i.mitigation.attention_rescale import explicit_attention
from diffmem.common.t2i.sampler import sample_latents


def be_mask(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """M = mean over layers of the end token's attention maps [N, q_l] upsampled to size, ÷ max per sample (Chen et
    al. 2025, BE mask)."""
    H, W = size
    up = []
    for m in maps:
        scale = math.sqrt(H * W / m.shape[1])
        h, w = round(H / scale), round(W / scale)
        up.append(F.interpolate(m.float().view(-1, 1, h, w), size=(H, W), mode="bilinear", align_corners=False))
    mean = torch.stack(up).mean(dim=0)
    return mean / mean.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def end_token_positions(tokenizer, prompts: list[str]) -> torch.Tensor:
    """[B] index of each prompt's first end token (BOS + its tokens, truncated to the tokenizer's length)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return ids.attention_mask.sum(dim=1) - 1


class EndTokenAttentionRecorder:
    """A diffusers cross-attention processor (plain softmax attention) that records, per call, the attention
    probability of key ``eos[b]`` for each row b of the batch, averaged over heads: [batch, queries]."""

    def __init__(self, eos: torch.Tensor):
        self.eos = eos
        self.maps: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        def record(probs):  # [b, h, q, L]
            b, heads, q = probs.shape[:3]
            idx = self.eos.to(probs.device).view(-1, 1, 1, 1).expand(b, heads, q, 1)
            self.maps.append(probs.gather(-1, idx)[..., 0].mean(dim=1).detach().cpu())  # [b, q]

        return explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                  probs_hook=record)


@contextmanager
def record_end_token_attention(unet, eos: torch.Tensor):
    """Every cross-attention layer (``attn2``) records the end token's attention inside the block; the original
    processors are restored after it. Yields (recorder, number of cross-attention layers)."""
    original = unet.attn_processors
    recorder = EndTokenAttentionRecorder(eos)
    layers = sum(".attn2." in name for name in original)
    unet.set_attn_processor({name: recorder if ".attn2." in name else proc for name, proc in original.items()})
    try:
        yield recorder, layers
    finally:
        unet.set_attn_processor(original)


@torch.no_grad()
def bright_ending_masks(parts, cond_embeds: torch.Tensor, uncond_embed: torch.Tensor, latents: torch.Tensor,
                        prompts: list[str], *, num_inference_steps: int, guidance_scale: float) -> torch.Tensor:
    """[B, G, 1, H, W] BE masks: the unmitigated generation of latents [B, G, C, H, W] (CFG, all steps), recording
    the end token's cross-attention in the conditional half at its last step."""

    B, G = latents.shape[:2]
    eos = end_token_positions(parts.tokenizer, prompts).repeat_interleave(G)
    with record_end_token_attention(parts.unet, torch.cat([eos, eos])) as (recorder, layers):
        sample_latents(parts, cond_embeds, uncond_embed, latents, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale)
    last = [m[B * G:] for m in recorder.maps[-layers:]]  # the last UNet call, conditional half
    return be_mask(last, tuple(latents.shape[-2:])).view(B, G, 1, *latents.shape[-2:])
