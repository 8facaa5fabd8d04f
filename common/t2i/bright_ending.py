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


def be_mask(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """M = mean over layers of the end token's attention maps [N, q_l] upsampled to size, ÷ max per sample (Chen et al. 2025, BE mask)."""
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
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        b, heads = query.shape[0], attn.heads
        q = query.view(b, -1, heads, query.shape[-1] // heads).transpose(1, 2)
        k = key.view(b, -1, heads, key.shape[-1] // heads).transpose(1, 2)
        v = value.view(b, -1, heads, value.shape[-1] // heads).transpose(1, 2)
        logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            logits = logits + attn.prepare_attention_mask(attention_mask, k.shape[2], b).view(b, heads, 1, -1).float()
        probs = logits.softmax(dim=-1)  # [b, h, q, L]
        idx = self.eos.to(probs.device).view(-1, 1, 1, 1).expand(b, heads, probs.shape[2], 1)
        self.maps.append(probs.gather(-1, idx)[..., 0].mean(dim=1).detach().cpu())  # [b, q]
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, -1, heads * v.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


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
    from common.t2i.generation import sample_latents

    B, G = latents.shape[:2]
    eos = end_token_positions(parts.tokenizer, prompts).repeat_interleave(G)
    with record_end_token_attention(parts.unet, torch.cat([eos, eos])) as (recorder, layers):
        sample_latents(parts, cond_embeds, uncond_embed, latents, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale)
    last = [m[B * G:] for m in recorder.maps[-layers:]]  # the last UNet call, conditional half
    return be_mask(last, tuple(latents.shape[-2:])).view(B, G, 1, *latents.shape[-2:])
