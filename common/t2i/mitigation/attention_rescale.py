"""Cross-attention masking and beginning-token rescaling against memorization (Ren et al., ECCV 2024).

Ren et al. observe that memorized prompts concentrate cross-attention on a few tokens (notably the padding
"summary" tokens) and less on the beginning token. At inference, in every cross-attention layer at every step,
the logits of padding tokens (positions after the prompt's first end token) are masked in both halves of the
classifier-free batch, and the conditional half's beginning-token logit is multiplied by C (1.25 in their
script; MemBench uses 1.1) before the softmax. As in their code, the mask comes from the conditional prompt's
length and applies to both halves. Unlike their processor (8 heads hard-coded, the conditional rows picked as
every other row of the batch), :class:`RenAttnProcessor` works for any head count (SD 1.x and 2.x) and takes the
per-row mask and scale explicitly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from diffmem.common.t2i.mitigation.options import RenSettings  # noqa: F401 (torch-free; imported back)


def ren_attention_logits(logits: torch.Tensor, keep: torch.Tensor, bos_scale: torch.Tensor) -> torch.Tensor:
    """s_{·,0} ← C·s_{·,0}, s_{·,j} ← −∞ for masked keys j; logits [b, h, q, L], keep [b, L], C per row [b] (Ren et
    al. 2024, Sec. 5)."""
    out = logits.clone()
    out[..., 0] = out[..., 0] * bos_scale.view(-1, 1, 1).to(out.dtype)
    return out.masked_fill(~keep.view(keep.shape[0], 1, 1, -1), float("-inf"))


def ren_key_mask(tokenizer, prompts: list[str]) -> torch.Tensor:
    """[B, L] bool: BOS, the prompt's tokens and its first end token are kept; the padding after it is masked."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return ids.attention_mask.bool()


def explicit_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *,
                       logits_fn=None, probs_hook=None) -> torch.Tensor:
    """A diffusers ``Attention`` layer's forward with the softmax written out (fp32 logits), so that
    ``logits_fn(logits [b, h, q, L])`` can change the logits and ``probs_hook(probs)`` can read the probabilities;
    with neither it computes what the default processor does."""
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
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scale  # [b, h, q, L] in fp32
    if attention_mask is not None:
        logits = logits + attn.prepare_attention_mask(attention_mask, k.shape[2], b).view(b, heads, 1, -1).float()
    if logits_fn is not None:
        logits = logits_fn(logits)
    probs = logits.softmax(dim=-1)
    if probs_hook is not None:
        probs_hook(probs)
    out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, -1, heads * v.shape[-1])
    out = attn.to_out[1](attn.to_out[0](out))
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class RenAttnProcessor:
    """A diffusers attention processor for cross-attention with :func:`ren_attention_logits` before the softmax.

    ``keep`` [batch, L] and ``bos_scale`` [batch] describe the rows of the batch the UNet is called with.
    """

    def __init__(self, keep: torch.Tensor, bos_scale: torch.Tensor):
        self.keep, self.bos_scale = keep, bos_scale

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        def rescale(logits):
            return ren_attention_logits(logits, self.keep.to(logits.device), self.bos_scale.to(logits.device))

        return explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                  logits_fn=rescale)


@contextmanager
def ren_attention(unet, keep: torch.Tensor, bos_scale: torch.Tensor):
    """Every cross-attention layer (``attn2``) of the UNet uses a :class:`RenAttnProcessor` inside the block;
    the original processors are restored after it."""
    original = unet.attn_processors
    processor = RenAttnProcessor(keep, bos_scale)
    unet.set_attn_processor({name: processor if ".attn2." in name else proc for name, proc in original.items()})
    try:
        yield processor
    finally:
        unet.set_attn_processor(original)


def ren_batch_rows(keep: torch.Tensor, num_generations: int, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, bos_scale) for the sampler's batch [ε_u rows; ε_c rows] of B prompts × G generations, prompt-major."""
    rows = keep.repeat_interleave(num_generations, dim=0)
    n = rows.shape[0]
    scale = torch.cat([torch.ones(n), torch.full((n,), float(c))])
    return torch.cat([rows, rows]), scale


# --- the method's hook (common.t2i.mitigation.methods) -------------------------------------------------------

def ren_attn_setup(batch) -> None:
    """``ren_attn``: sampling runs with the padding-and-summary keys masked and the beginning token rescaled."""
    keep, scale = ren_batch_rows(ren_key_mask(batch.parts.tokenizer, batch.prompts_used), batch.G, batch.settings.ren_c)
    batch.sampling_context = ren_attention(batch.parts.unet, keep, scale)
