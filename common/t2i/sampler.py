"""Batched classifier-free-guided DDIM sampling from given text embeddings and starting latents, and decoding.

Mitigation generates from *embeddings* (an optimised conditional embedding, or an augmented prompt's), so the
sampler takes embeddings and the exact starting latents (see :func:`common.t2i.text_noise.initial_latents`) instead of
prompts and a generator: every method then starts row i, generation g from the same noise. The loop is the
one of ``StableDiffusionPipeline.__call__`` (guidance on the raw model output, then ``scheduler.step``), but
keeps the latents in fp32 between steps whatever the UNet's dtype.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from diffmem.common.t2i.pipelines import DenoiserParts, as_conditioning, cat_conditionings
from diffmem.common.t2i.pipelines.family import decode_latents  # noqa: F401  (the samplers' users decode with it)
from diffmem.common.t2i.text_noise import classifier_free_guidance, text_noise_norm


@torch.no_grad()
def sample_latents(
    parts: DenoiserParts,
    cond_embeds: torch.Tensor,
    uncond_embed: torch.Tensor,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    guidance=None,
    observer=None,
    norms_out: list | None = None,
    correction=None,
) -> torch.Tensor:
    """Final latents [B, G, C, H, W] (fp32) of the guided trajectory of B prompts × G generations.

    cond_embeds: [B, L, D] (one per prompt) or [B, G, L, D] (one per generation); uncond_embed: [1, L, D];
    latents: [B, G, C, H, W], already scaled by the scheduler's init_noise_sigma. All steps of the scheduler run
    (DDIM with eta = 0 for ``denoiser_parts``'s default on the UNet families, the family's own otherwise).
    ``guidance(step, t, text_norm) -> [B·G]`` gives a per-trajectory guidance scale from ‖ε_c − ε_u‖ (ε units, or
    velocity units on a rectified-flow family; whole latent; see :mod:`common.t2i.mitigation.guidance_schedule`);
    default
    guidance_scale at every step. ``observer(step, x_before, x_after)`` sees each update; ``norms_out`` (a list)
    receives the per-step text norms [B·G] when given. ``correction(step, t, x, x_next, guided) -> x_next`` may replace
    each scheduler step's result (``guided``: the guided raw output it stepped with; Broken Memories' mitigation,
    :mod:`common.t2i.broken_memories`), before the observer sees it.
    """
    dtype, device = parts.dtype, parts.device
    scheduler = parts.timesteps_scheduler(num_inference_steps)  # per-trajectory state stays out of the shared one
    B, G = latents.shape[:2]
    x = latents.reshape(B * G, *latents.shape[2:]).to(device=device, dtype=torch.float32)
    cond = as_conditioning(cond_embeds).to(device=device, dtype=dtype)
    if cond.dim() == 4:  # one embedding per generation [B, G, L, D], already prompt-major
        cond = cond.replace(embeds=cond.embeds.reshape(B * G, *cond.embeds.shape[2:]))
        # A pooled embedding or mask of one row per prompt serves each of its generations.
        if cond.pooled is not None:
            cond = cond.replace(pooled=cond.pooled.reshape(B * G, -1) if cond.pooled.dim() == 3
                                else cond.pooled.repeat_interleave(G, dim=0))
        if cond.mask is not None:
            cond = cond.replace(mask=cond.mask.reshape(B * G, -1) if cond.mask.dim() == 3
                                else cond.mask.repeat_interleave(G, dim=0))
    else:
        cond = cond.repeat_interleave(G)  # prompt-major, like x
    emb = cat_conditionings([as_conditioning(uncond_embed).to(device=device, dtype=dtype).expand(B * G), cond])
    for step, t in enumerate(scheduler.timesteps):
        x_in = parts.scale_model_input(scheduler, torch.cat([x, x]), t)
        out_u, out_c = parts.predict(x_in, t, emb).chunk(2)
        if guidance is None and norms_out is None:
            guided = classifier_free_guidance(out_u, out_c, guidance_scale)
        else:
            x_half = x_in[:B * G]
            norm = text_noise_norm(parts.metric_output(out_c, x_half, t, scheduler),
                                   parts.metric_output(out_u, x_half, t, scheduler))
            if norms_out is not None:
                norms_out.append(norm.cpu())
            scale = guidance_scale if guidance is None else guidance(step, float(t), norm).view(-1, 1, 1, 1)
            guided = classifier_free_guidance(out_u, out_c, scale)
        x_next = scheduler.step(guided, t, x, return_dict=False)[0].float()
        if correction is not None:
            x_next = correction(step, t, x, x_next, guided)
        if observer is not None:
            observer(step, x, x_next)
        x = x_next
    return x.view(B, G, *x.shape[1:])


def to_pil(images: torch.Tensor) -> list:
    """PIL RGB images from a [N, 3, H, W] tensor in [0, 1], rounded the way diffusers' numpy_to_pil does."""
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def image_grid(images: list, cols: int | None = None):
    """One PIL image with the given equally sized images laid out row by row (cols ≈ √N by default)."""
    from PIL import Image

    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def grid_cell(grid, index: int, count: int):
    """The index-th of the count equally sized images that :func:`image_grid` laid out (default columns) in grid."""
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    w, h = grid.size[0] // cols, grid.size[1] // rows
    x, y = (index % cols) * w, (index // cols) * h
    return grid.crop((x, y, x + w, y + h))


def save_grid(images: list, path: str | Path) -> Path:
    """Write a PNG grid of PIL images to path (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    return path
