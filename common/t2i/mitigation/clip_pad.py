"""The CLIP padding fix ("Memorization in Stable Diffusion Is Unexpectedly Driven by CLIP Embeddings", CVPR 2026
Findings): memorization rides on the end token and the padding embeddings CLIP writes after it, so change them.

* ``eot`` (their main method, ``--pad_token_fix_and_eot_masked``): the prompt is re-tokenised with "!" as the pad
  token (SD 1.x pads with the end token itself) and the text encoder's output at the end token is set to zero.
  Their unconditional branch is the pipeline's encode("") with the tokenizer still set to "!", so it is re-encoded
  the same way here (and not zeroed).
* ``ratio`` (``--pad_masked_by_ratio R``): the model's own padding is kept and the first ⌊min(P, R·P)⌋ of the P
  padding embeddings after the end token are set to zero; the unconditional branch is unchanged.

"Mask" in their code is zeroing the encoder's output rows (``embeds[:, pos, :] = 0``), neither an attention mask nor
a replacement. On SDXL each CLIP encoder's columns are treated with its own tokenizer's positions. No extra UNet
evaluation. Families whose conditioning is not CLIP's BOS/end/padding layout (SD3, Flux, PixArt) are refused.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from diffmem.common.t2i.detection import encode_prompts
from diffmem.common.t2i.mitigation.options import ClipPadSettings  # noqa: F401 (torch-free; imported back)
from diffmem.common.t2i.pipelines import as_conditioning

CLIP_PAD_TOKEN = "!"  # their replacement pad token (id 0 of CLIP's BPE; SD 2.x's own pad token)


def clip_tokenizers(parts) -> list:
    """Every distinct tokenizer of the conditioning's sequence segments (and the parts' own)."""
    family = parts.family
    found = [parts.tokenizer] + [getattr(family.pipe, s.tokenizer) for s in family.text_segments() if s.rows]
    return list({id(t): t for t in found if t is not None}.values())


@contextmanager
def clip_pad_token(parts, token: str = CLIP_PAD_TOKEN):
    """The CLIP tokenizers pad with ``token`` inside the block; their own pad tokens are restored after."""
    saved = [(tok, tok.pad_token) for tok in clip_tokenizers(parts)]
    try:
        for tok, _ in saved:
            tok.pad_token = token
        yield
    finally:
        for tok, pad in saved:
            tok.pad_token = pad


def end_positions(parts, prompts: list[str]) -> list[tuple[object, torch.Tensor]]:
    """(segment, first end-token position [B]) per sequence segment, padded as the family encodes prompts now."""
    family = parts.family
    return [(seg, family.segment_ids(seg, prompts)[1].sum(dim=1) - 1) for seg in family.text_segments() if seg.rows]


def zero_positions(embeds: torch.Tensor, segments, positions_of) -> torch.Tensor:
    """embeds [B, L, D] with, per segment, the rows ``positions_of(end [B], length)`` -> [B, length] bool zeroed in
    the segment's columns."""
    out = embeds.clone()
    for seg, end in segments:
        start, stop = seg.rows
        cols = slice(*seg.cols) if seg.cols else slice(None)
        where = positions_of(end, stop - start).to(out.device)  # [B, length]
        block = out[:, start:stop, cols]
        out[:, start:stop, cols] = block.masked_fill(where.unsqueeze(-1), 0.0)
    return out


def end_token_rows(end: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length]: the end token only (``eot``)."""
    return torch.arange(length).unsqueeze(0) == end.unsqueeze(1)


def padding_ratio_rows(ratio: float):
    """[B, length]: the first int(min(P, ratio·P)) padding positions after the end token, P = length − end − 1."""
    def rows(end: torch.Tensor, length: int) -> torch.Tensor:
        pads = length - (end + 1)
        count = torch.minimum(pads.double(), pads.double() * ratio).long()  # int() of a non-negative number
        pos = torch.arange(length).unsqueeze(0)
        return (pos > end.unsqueeze(1)) & (pos <= (end + count).unsqueeze(1))
    return rows


# --- the method's hook (common.t2i.mitigation.methods) -------------------------------------------------------

def clip_pad_setup(batch) -> None:
    """``clip_pad``: the conditioning (eot: and the unconditional branch) with CLIP's padding fixed."""
    s, parts = batch.settings, batch.parts
    if s.clip_pad_mode == "eot":
        with clip_pad_token(parts):
            cond = encode_prompts(parts, batch.prompts_used).embeds
            batch.uncond = parts.unconditional()
            segments = end_positions(parts, batch.prompts_used)
        rows = end_token_rows
    else:
        cond, segments = as_conditioning(batch.cond_embeds), end_positions(parts, batch.prompts_used)
        rows = padding_ratio_rows(s.clip_pad_ratio)
    fixed = cond.replace(embeds=zero_positions(cond.embeds, segments, rows))
    batch.cond = fixed if not isinstance(batch.cond_embeds, torch.Tensor) else fixed.embeds
