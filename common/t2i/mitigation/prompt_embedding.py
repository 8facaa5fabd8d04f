"""Inference-time mitigation of memorization by prompt-embedding optimisation (Wen et al., ICLR 2024, Sec. 5).

Before generating, the conditional text-encoder output c is moved (AdamW) to lower the text-conditional noise
magnitude ‖ε(x_t, c) − ε(x_t, ∅)‖₂ at chosen DDIM steps until it falls to a target loss; images are then
generated from the optimised embedding with the usual classifier-free guidance.

Differences from the reference implementation, all deliberate:

* Prompts are optimised as a batch. Each prompt stops on its own as soon as its loss is ≤ the target (checked
  before each update, as in the reference); a stopped prompt leaves the batch, so the UNet runs only on the
  prompts still moving. AdamW is elementwise and a stopped prompt never resumes, so every prompt gets exactly
  the updates it would get alone: batched equals one-by-one (up to the UNet's batch-size rounding).
* Frozen positions (BOS always; padding optionally) are restored after each step, so AdamW's decoupled weight
  decay cannot move them either (the reference only zeroes BOS's gradient).
* The per-prompt loss is the mean over generations of each generation's norm (``reduction="mean"``). The
  reference takes one L2 norm over all G generations' joint noise (``reduction="joint"`` = √Σ_g‖·‖²,
  ≈ √G × the mean), so its target loss 3 with G = 4 is about 1.5 here.
* ``final_loss`` is the loss of the embedding actually returned: when the iteration budget runs out, the
  embedding after the last update is evaluated once more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffmem.common.t2i.detection import text_noise_objective
from diffmem.common.t2i.mitigation.options import LOSS_REDUCTIONS  # torch-free: the CLIs offer it as choices
from diffmem.common.t2i.pipelines import DenoiserParts, as_conditioning


def mitigation_loss(text_norms: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-prompt loss: mean over generations and target steps of norms [B, G, T] (Wen et al. 2024, Sec. 5).

    ``joint`` reproduces the reference code's single norm over all G generations: √(Σ_g ‖·‖²), then the mean
    over target steps.
    """
    if reduction == "mean":
        return text_norms.float().mean(dim=(1, 2))
    if reduction == "joint":
        return text_norms.float().pow(2).sum(dim=1).sqrt().mean(dim=-1)
    raise ValueError(f"unknown loss reduction {reduction!r}; expected one of {', '.join(LOSS_REDUCTIONS)}")


def learnable_positions(attention_mask: torch.Tensor, freeze_padding: bool = False) -> torch.Tensor:
    """[B, L] bool: embedding positions the optimiser may move; never BOS (Wen et al. 2024, Sec. 5).

    With freeze_padding, positions after the first EOS (attention mask 0) stay fixed too.
    """
    mask = torch.ones_like(attention_mask, dtype=torch.bool) if not freeze_padding else attention_mask.bool().clone()
    mask[:, 0] = False
    return mask


def prompt_attention_mask(tokenizer, prompts: list[str]) -> torch.Tensor:
    """[B, L] attention mask of prompts padded to the tokenizer's length, as Stable Diffusion tokenizes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return ids.attention_mask


@dataclass
class OptimisationResult:
    """Optimised embeddings and, per prompt, the losses, the number of updates and whether it reached the target."""

    embeds: torch.Tensor  # [B, L, D] fp32, on the UNet's device
    initial_loss: list[float]
    final_loss: list[float]
    iterations: list[int]
    reached_target: list[bool]
    loss_history: list[list[float]] = field(default_factory=list)  # losses checked before each update, + final


def optimise_prompt_embeds(
    parts: DenoiserParts,
    cond_embeds: torch.Tensor,
    uncond_embed: torch.Tensor,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    target_steps: list[int],
    guidance_scale: float,
    target_loss: float | None,
    iters: int = 10,
    lr: float = 0.05,
    weight_decay: float = 0.01,
    learnable: torch.Tensor | None = None,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> OptimisationResult:
    """Lower each prompt's text-conditional noise magnitude to target_loss by AdamW on its embedding.

    cond_embeds [B, L, D]; uncond_embed [1, L, D]; latents [B, G, C, H, W] (scaled by init_noise_sigma, as
    for :func:`common.t2i.detection.text_noise_objective`); learnable [B, L] bool (default: all but BOS); mask
    [B, G, 1, H, W] localises the loss (the bright-ending mask, Chen et al. 2025).
    At most ``iters`` updates per prompt; target_loss None runs all of them.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    device = parts.device
    given_tensor = isinstance(cond_embeds, torch.Tensor)
    template = as_conditioning(cond_embeds)  # pooled embeddings and masks ride along, unchanged
    cond_embeds = template.embeds
    B = cond_embeds.shape[0]
    if latents.shape[0] != B:
        raise ValueError(f"got {latents.shape[0]} latent rows for {B} prompts")
    if learnable is None:
        learnable = torch.ones(cond_embeds.shape[:2], dtype=torch.bool)
        learnable[:, 0] = False
    learnable = learnable.to(device)
    param = cond_embeds.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    # The default AdamW of the reference (torch's defaults, weight decay 0.01).
    optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay)
    active = torch.ones(B, dtype=torch.bool)
    history: list[list[float]] = [[] for _ in range(B)]
    final = [float("nan")] * B
    n_updates = [0] * B
    reached = [False] * B
    objective = dict(num_inference_steps=num_inference_steps, target_steps=list(target_steps),
                     guidance_scale=guidance_scale)

    for it in range(iters + 1):
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        last = it == iters
        with torch.set_grad_enabled(not last):
            sub = template[idx].replace(embeds=param[idx.to(device)])
            loss = mitigation_loss(text_noise_objective(parts, sub, uncond_embed, latents[idx], **objective,
                                                        mask=None if mask is None else mask[idx]), reduction)
        values = loss.detach().cpu().tolist()
        stop = []
        for k, b in enumerate(idx.tolist()):
            history[b].append(values[k])
            hit = target_loss is not None and values[k] <= target_loss
            if hit or last:
                final[b], reached[b] = values[k], hit
                stop.append(k)
        if stop:
            active[idx[stop]] = False
        if last or not active.any():
            break
        keep = torch.ones(len(values), dtype=torch.bool)
        keep[stop] = False
        # Summing per-prompt losses keeps each prompt's gradient exactly what it would be alone.
        (grad_sub,) = torch.autograd.grad(loss[keep.to(loss.device)].sum(), [sub.embeds])
        moving = learnable & active.to(device)[:, None]  # [B, L]
        grad = torch.zeros_like(param)
        grad[idx.to(device)] = grad_sub
        param.grad = grad * moving[..., None]
        before = param.detach().clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            param.copy_(torch.where(moving[..., None], param, before))
        for b in active.nonzero().flatten().tolist():
            n_updates[b] += 1
    initial = [h[0] for h in history]
    embeds = param.detach() if given_tensor else template.replace(embeds=param.detach())
    return OptimisationResult(embeds, initial, final, n_updates, reached, history)


@torch.no_grad()
def prompt_losses(parts: DenoiserParts, cond_embeds: torch.Tensor, uncond_embed: torch.Tensor,
                  latents: torch.Tensor, *, num_inference_steps: int, target_steps: list[int],
                  guidance_scale: float, reduction: str = "mean", mask: torch.Tensor | None = None) -> list[float]:
    """The mitigation loss of unoptimised embeddings (what the baselines and ``none`` are reported with)."""
    norms = text_noise_objective(parts, cond_embeds, uncond_embed, latents, num_inference_steps=num_inference_steps,
                                 target_steps=list(target_steps), guidance_scale=guidance_scale, mask=mask)
    return mitigation_loss(norms, reduction).cpu().tolist()
