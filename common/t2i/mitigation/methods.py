"""Every inference-time mitigation behind one dispatch: what each method reads and how it generates a batch.

A method acts at one (or more) of three places, all from the same starting noise x_T of row i (seed gen_seed + i):

* the conditioning (``ours``: Wen et al.'s optimised embedding; ``rand_*``: augmented prompts; ``gni``: noise on
  the embedding), see :func:`common.t2i.mitigation.run.condition_batch` and :func:`generate_batch` here;
* the starting point x_T itself (``han_batch``, ``han_sample``: :mod:`common.t2i.mitigation.init_noise`);
* the sampler (``jain_stp``, ``jain_dtp``, ``jain_og``, the CFG schedule of ``han_batch``:
  :mod:`common.t2i.mitigation.guidance_schedule`; ``ren_attn``'s attention processor: :mod:`common.t2i.mitigation.attention_rescale`).

Cost is reported per image as *extra UNet evaluations*: forward passes of the UNet on one latent (ε_u and ε_c
count one each) beyond the sampler's two per step. Gradient steps (``ours``, ``han_sample``) also cost a backward
pass each, which the seconds per image include.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BASELINES = ("rand_word_add", "rand_numb_add", "rand_word_repeat")


@dataclass(frozen=True)
class MethodSpec:
    """A method: the settings fields it reads (they bind a resumed run) and the one its trade-off sweeps."""

    name: str
    reads: tuple[str, ...] = ()
    knob: str | None = None
    paper: str = ""


METHOD_SPECS: dict[str, MethodSpec] = {s.name: s for s in [
    MethodSpec("none", paper="classifier-free guidance, no mitigation"),
    MethodSpec("ours", ("optim_target_loss", "optim_iters", "optim_lr", "freeze_padding", "be_mask"),
               "optim_target_loss", "Wen et al., ICLR 2024: prompt-embedding optimisation (with --be_mask: Chen et "
               "al., ICLR 2025's bright-ending mask on its loss)"),
    *[MethodSpec(b, ("repeat_num",), "repeat_num", "Somepalli et al. 2023 / Wen et al. 2024: prompt augmentation")
      for b in BASELINES],
    MethodSpec("jain_stp", ("jain_tau", "jain_early_scale"), "jain_tau",
               "Jain et al., CVPR 2025: static transition point"),
    MethodSpec("jain_dtp", ("jain_early_scale", "jain_dtp_rule"), "jain_early_scale",
               "Jain et al., CVPR 2025: dynamic transition point"),
    MethodSpec("jain_og", (), None, "Jain et al., CVPR 2025: opposite guidance, transition from an extra pass"),
    MethodSpec("han_batch", ("han_rho", "han_gamma", "han_m", "han_tau"), "han_tau",
               "Han et al., NeurIPS 2025: batch-wise initial-noise adjustment"),
    MethodSpec("han_sample", ("han_lr", "han_target_loss", "han_iters"), "han_target_loss",
               "Han et al., NeurIPS 2025: per-sample initial-noise optimisation"),
    MethodSpec("ren_attn", ("ren_c",), "ren_c", "Ren et al., ECCV 2024: cross-attention masking and BOS rescaling"),
    MethodSpec("gni", ("gni_scale",), "gni_scale", "Somepalli et al., NeurIPS 2023: Gaussian noise on the embedding"),
]}
METHODS = tuple(METHOD_SPECS)
METHOD_FIELDS = tuple(sorted({f for s in METHOD_SPECS.values() for f in s.reads}))


@dataclass
class BatchGeneration:
    """Final latents [B, G, C, H, W] and, per row, the extra UNet evaluations per generation and method details."""

    latents: torch.Tensor
    extra_unet_calls: list[list[int]]
    first_step_norm: list[float]  # mean over generations of ‖ε_c − ε_u‖ at the first step of the trajectory used
    details: list[dict] = field(default_factory=list)


def _per_row(values: torch.Tensor, B: int, G: int) -> list[list]:
    return values.view(B, G).tolist()


def generate_batch(parts, cond_embeds: torch.Tensor, uncond_embed: torch.Tensor, latents: torch.Tensor,
                   rows: list[int], prompts_used: list[str], settings) -> BatchGeneration:
    """Generate B prompts × G generations with ``settings.method`` from latents [B, G, C, H, W] (x_T of each row).

    cond_embeds [B, L, D]: the conditioning chosen by :func:`common.t2i.mitigation.run.condition_batch` (the
    optimised embedding for ``ours``, the augmented prompt's for the baselines, the prompt's otherwise).
    """
    from diffmem.common.t2i.sampler import sample_latents
    from diffmem.common.t2i.mitigation.guidance_schedule import (ConstantGuidance, DynamicTransition, StaticTransition, StepDistanceRecorder, StepSwitch,
                                              jain_og_transition)

    method, w = settings.method, settings.guidance_scale
    B, G = latents.shape[:2]
    steps = settings.num_inference_steps
    extra = torch.zeros(B * G, dtype=torch.int64)
    details: list[dict] = [{} for _ in range(B)]
    x_T = latents
    cond = cond_embeds
    guidance = None
    norms: list = []
    sample = dict(num_inference_steps=steps, guidance_scale=w)

    def flat_embeds():
        dtype, device = parts.dtype, parts.device
        c = cond_embeds.to(device=device, dtype=dtype).repeat_interleave(G, dim=0)
        u = uncond_embed.to(device=device, dtype=dtype).expand(B * G, -1, -1)
        return c, u

    if method == "gni":
        from diffmem.common.t2i.mitigation.embedding_noise import gni_embeddings, gni_noise

        noise = gni_noise(rows, G, tuple(cond_embeds.shape[1:]), settings.gen_seed)
        cond = gni_embeddings(cond_embeds, noise, settings.gni_scale)
    elif method == "jain_stp":
        guidance = StaticTransition(settings.jain_tau, settings.jain_early(method), w)
    elif method == "jain_dtp":
        guidance = DynamicTransition(settings.jain_early(method), w, settings.jain_dtp_rule)
    elif method == "jain_og":
        recorder = StepDistanceRecorder()
        sample_latents(parts, cond_embeds, uncond_embed, latents, observer=recorder,
                       guidance=ConstantGuidance(-w), **sample)
        switch = jain_og_transition(recorder.as_tensor())
        guidance = StepSwitch(switch, -w, w)
        extra += 2 * steps
        for b, v in enumerate(_per_row(switch, B, G)):
            details[b]["transition_step"] = v
    elif method == "han_batch":
        from diffmem.common.t2i.mitigation.init_noise import han_batch_adjust

        c, u = flat_embeds()
        flat = han_batch_adjust(parts, c, u, latents.flatten(0, 1), num_inference_steps=steps, rho=settings.han_rho,
                                gamma=settings.han_gamma, steps=settings.han_m)
        x_T = flat.view(latents.shape)
        extra += 4 * settings.han_m
        guidance = StaticTransition(settings.han_tau, 0.0, w)
    elif method == "han_sample":
        from diffmem.common.t2i.mitigation.init_noise import han_sample_optimise

        c, u = flat_embeds()
        res = han_sample_optimise(parts, c, u, latents.flatten(0, 1), num_inference_steps=steps, lr=settings.han_lr,
                                  target_loss=settings.han_target_loss, iters=settings.han_iters)
        x_T = res.latents.view(latents.shape)
        evals = torch.tensor(res.evaluations)
        extra += 2 * evals
        for b in range(B):
            sl = slice(b * G, (b + 1) * G)
            details[b].update(han_iterations=res.iterations[sl], han_loss_initial=res.initial_loss[sl],
                              han_loss_final=res.final_loss[sl], han_reached_target=res.reached_target[sl])

    if method == "ren_attn":
        from diffmem.common.t2i.mitigation.attention_rescale import ren_attention, ren_batch_rows, ren_key_mask

        keep, scale = ren_batch_rows(ren_key_mask(parts.tokenizer, prompts_used), G, settings.ren_c)
        with ren_attention(parts.unet, keep, scale):
            final = sample_latents(parts, cond, uncond_embed, x_T, norms_out=norms, **sample)
    else:
        final = sample_latents(parts, cond, uncond_embed, x_T, guidance=guidance, norms_out=norms, **sample)
    if method == "jain_dtp":
        for b, v in enumerate(_per_row(guidance.transition_step, B, G)):
            details[b]["transition_step"] = [s if s >= 0 else None for s in v]
    first = norms[0].view(B, G).mean(dim=1).tolist()
    return BatchGeneration(final, _per_row(extra, B, G), first, details)
