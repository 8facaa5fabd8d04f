"""Memorization detectors that need no full generation, scored on a batch of prompts at once.

- ``wen``: text-conditional noise magnitude along the classifier-free-guided DDIM trajectory (Wen et al. 2024).
- ``anisotropy``: zero denoising steps, the noise magnitude at t_hi plus a channel-axis cosine at t_lo on the
  same pure-noise x_T (Asthana & Belagiannis, ICLR 2026).
- ``sharpness``: the norm of the difference of the score Jacobians applied to the score difference, one
  forward-mode JVP at the first DDIM timestep (Jeon, Kim & No, ICML 2025).
- ``grad_diff`` and ``dsm``: the Early Detection paper's (ICML 2026) gradient difference at the first timestep and
  prediction shift over one guided step (:mod:`common.t2i.early_detection`).
- ``broken``: Broken Memories' (KDD 2026) z-scores of the latent norms along the full guided trajectory against a
  calibration on non-memorized prompts (:mod:`common.t2i.broken_memories`).

For ``wen``, unlike the reference implementation, which runs each prompt alone through every step and the VAE
decode, this scores a batch of prompts at once, stops after the last scored step, never decodes, and in
``shared`` latents mode evaluates ε(x_t, ∅) once per batch at the first step (the same for every prompt there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.common.t2i.broken_memories import BrokenTerms, StabilityRegion, broken_terms
from diffmem.common.t2i.early_detection import EarlyTerms, dsm_terms, grad_diff_terms
from diffmem.common.t2i.options import ALL_DETECTORS, ANISOTROPY_WEIGHTS
from diffmem.common.t2i.pipelines import (
    Conditioning,
    DenoiserParts,
    EncodedPrompts,
    FamilyError,
    as_conditioning,
    cat_conditionings,
)
from diffmem.common.t2i.prompts import PromptRecord
from diffmem.common.t2i.text_noise import (
    anisotropy_score,
    channel_cosine,
    classifier_free_guidance,
    detection_score,
    initial_latents,
    noise_norm,
    text_noise_norm,
)


def encode_prompts(parts: DenoiserParts, prompts: list[str]) -> EncodedPrompts:
    """The family's conditioning of a batch of prompts (every encoder, pooled embeddings, masks) and truncation."""
    return parts.encode(prompts)


@dataclass
class NoiseTrace:
    """Per prompt, generation and scored step: ‖ε(x_t,c) − ε(x_t,∅)‖₂ and ‖ε(x_t,∅)‖₂ (velocities on a flow model)."""

    text_noise_norm: torch.Tensor  # [B, G, S] fp32, CPU
    uncond_noise_norm: torch.Tensor  # [B, G, S] fp32, CPU

    @property
    def score(self) -> torch.Tensor:
        return detection_score(self.text_noise_norm)

    def row_terms(self, b: int) -> dict:
        """Prompt b's terms for a results row: [[per step] per generation] norms."""
        return {"text_noise_norm": self.text_noise_norm[b].tolist(),
                "uncond_noise_norm": self.uncond_noise_norm[b].tolist()}


@dataclass
class AnisotropyTerms:
    """Per prompt and generation: N = ‖ε(x_T,t_hi,c) − ε(x_T,t_hi,∅)‖₂ and C, the channel cosine at t_lo."""

    norm: torch.Tensor  # [B, G] fp32, CPU
    cosine: torch.Tensor  # [B, G] fp32, CPU
    weights: tuple[float, float]  # (γ_N, γ_C)
    timesteps: tuple[int, int]  # (t_hi, t_lo)

    @property
    def score(self) -> torch.Tensor:
        return anisotropy_score(self.norm, self.cosine, *self.weights)

    def row_terms(self, b: int) -> dict:
        """N as a one-step text_noise_norm (it is Wen et al.'s first-step norm), C per generation, (γ_N, γ_C)."""
        return {"text_noise_norm": [[v] for v in self.norm[b].tolist()], "channel_cosine": self.cosine[b].tolist(),
                "weights": list(self.weights), "timesteps": list(self.timesteps)}


@dataclass
class SharpnessTerms:
    """Per prompt and generation: ‖(J_c − J_u) s_Δ‖₂ at the first DDIM timestep."""

    jvp_norm: torch.Tensor  # [B, G] fp32, CPU
    timestep: int

    @property
    def score(self) -> torch.Tensor:
        return self.jvp_norm.mean(dim=-1)

    def row_terms(self, b: int) -> dict:
        return {"sharpness": self.jvp_norm[b].tolist(), "timestep": self.timestep}


@torch.no_grad()
def trace_noise_norms(
    parts: DenoiserParts,
    cond_embeds: torch.Tensor,
    uncond_embed: torch.Tensor,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    score_steps: int,
    guidance_scale: float,
    shared_latents: bool = False,
) -> NoiseTrace:
    """Run the guided trajectory of B prompts × G generations for ``score_steps`` steps and record norms.

    cond_embeds: [B, L, D] or a Conditioning of B rows; uncond_embed: one row; latents: [B, G, C, H, W] fp32,
    already scaled by the scheduler's init_noise_sigma. With shared_latents the caller promises latents[b] is the
    same for every b, so the first unconditional prediction is computed for G latents and reused by all B prompts.
    The norms are of ε differences, or of velocity differences on a rectified-flow family (``parts.metric_output``).
    """
    dtype, device = parts.dtype, parts.device
    # Schedulers keep per-trajectory state (step index, multistep history): one fresh copy per batch.
    scheduler = parts.timesteps_scheduler(num_inference_steps)
    timesteps = scheduler.timesteps[:score_steps]

    B, G = latents.shape[:2]
    x = latents.reshape(B * G, *latents.shape[2:]).to(device=device, dtype=torch.float32)
    cond = as_conditioning(cond_embeds).to(device=device, dtype=dtype).repeat_interleave(G)  # prompt-major, like x
    uncond = as_conditioning(uncond_embed).to(device=device, dtype=dtype)
    text_norms, uncond_norms = [], []
    for step, t in enumerate(timesteps):
        x_in = parts.scale_model_input(scheduler, x, t)
        if shared_latents and step == 0:
            out_u = parts.predict(x_in[:G], t, uncond.expand(G)).repeat(B, 1, 1, 1)
            out_c = parts.predict(x_in, t, cond)
        else:
            emb = cat_conditionings([uncond.expand(B * G), cond])
            out_u, out_c = parts.predict(torch.cat([x_in, x_in]), t, emb).chunk(2)
        eps_u = parts.metric_output(out_u, x_in, t, scheduler)
        eps_c = parts.metric_output(out_c, x_in, t, scheduler)
        text_norms.append(text_noise_norm(eps_c, eps_u).view(B, G).cpu())
        uncond_norms.append(noise_norm(eps_u).view(B, G).cpu())
        if step + 1 < len(timesteps):  # the trajectory ends after the last scored step
            guided = classifier_free_guidance(out_u, out_c, guidance_scale)
            x = scheduler.step(guided, t, x, return_dict=False)[0].float()
    return NoiseTrace(torch.stack(text_norms, dim=-1), torch.stack(uncond_norms, dim=-1))


def _detection_timesteps(parts: DenoiserParts, num_inference_steps: int) -> torch.Tensor:
    return parts.timesteps_scheduler(num_inference_steps).timesteps


def _raw_pair(parts: DenoiserParts, x: torch.Tensor, t, uncond: Conditioning, cond: Conditioning):
    """(out(x,t,∅), out(x,t,c)): the denoiser's raw outputs from one batched call on [x, x]."""
    return parts.predict(torch.cat([x, x]), t, cat_conditionings([uncond, cond])).chunk(2)


def _epsilons(parts: DenoiserParts, x: torch.Tensor, t, uncond: Conditioning, cond: Conditioning):
    """(ε(x,t,∅), ε(x,t,c)) from one batched call on [x, x], in ε units whatever the prediction type (velocities
    on a rectified-flow family: its metric space)."""
    out_u, out_c = _raw_pair(parts, x, t, uncond, cond)
    return parts.metric_output(out_u, x, t), parts.metric_output(out_c, x, t)


def _flat_inputs(parts: DenoiserParts, cond_embeds, uncond_embed, latents):
    B, G = latents.shape[:2]
    x = latents.reshape(B * G, *latents.shape[2:]).to(device=parts.device, dtype=torch.float32)
    cond = as_conditioning(cond_embeds).to(device=parts.device, dtype=parts.dtype).repeat_interleave(G)
    uncond = as_conditioning(uncond_embed).to(device=parts.device, dtype=parts.dtype).expand(B * G)
    return B, G, x, cond, uncond


def anisotropy_weights_for(parts: DenoiserParts, weights: tuple[float, float] | None) -> tuple[float, float]:
    """The given (γ_N, γ_C), or the published ones of the model's prediction type; one line where none exist."""
    if weights is not None:
        return weights
    kind = parts.prediction_type
    if kind not in ANISOTROPY_WEIGHTS:
        raise FamilyError(f"the anisotropy detector's weights are published for {' and '.join(ANISOTROPY_WEIGHTS)} "
                          f"models only, not for {parts.family.label} ({kind}): pass --anisotropy_weights")
    return ANISOTROPY_WEIGHTS[kind]


@torch.no_grad()
def anisotropy_terms(
    parts: DenoiserParts,
    cond_embeds: torch.Tensor,
    uncond_embed: torch.Tensor,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    weights: tuple[float, float] | None = None,
) -> AnisotropyTerms:
    """N at t_hi = timesteps[0] and C at t_lo = timesteps[-3], both on the pure-noise x_T (no denoising step).

    latents: [B, G, C, H, W] x_T as drawn (unit variance, not scaled by init_noise_sigma); 4·B·G UNet
    evaluations in two batched calls. weights None: ANISOTROPY_WEIGHTS of the scheduler's prediction type.
    """
    timesteps = _detection_timesteps(parts, num_inference_steps)
    if len(timesteps) < 3:
        raise ValueError(f"the anisotropy detector needs at least 3 inference steps, got {len(timesteps)}")
    weights = anisotropy_weights_for(parts, weights)
    t_hi, t_lo = timesteps[0], timesteps[-3]
    B, G, x, cond, uncond = _flat_inputs(parts, cond_embeds, uncond_embed, latents)
    eps_u, eps_c = _epsilons(parts, x, t_hi, uncond, cond)
    norm = text_noise_norm(eps_c, eps_u).view(B, G).cpu()
    eps_u, eps_c = _epsilons(parts, x, t_lo, uncond, cond)
    cosine = channel_cosine(eps_u, eps_c - eps_u).view(B, G).cpu()
    return AnisotropyTerms(norm, cosine, (float(weights[0]), float(weights[1])), (int(t_hi), int(t_lo)))


def sharpness_terms(
    parts: DenoiserParts,
    cond_embeds: torch.Tensor,
    uncond_embed: torch.Tensor,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
) -> SharpnessTerms:
    """‖(J_c − J_u) s_Δ‖₂ at t = timesteps[0] on x_T (Jeon, Kim & No 2025).

    s = −ε/√(1−ᾱ_t), s_Δ = s(x_T,c) − s(x_T,∅), J = ∂s/∂x. On a rectified-flow family s is the velocity v: the
    score difference −((1−σ)/σ)(v_c − v_u) vanishes at the first σ = 1 (docs/families.md).

    One forward pass for s_Δ, then one forward-mode JVP (torch.func.jvp) of x ↦ s(x,c) − s(x,∅) with tangent
    s_Δ through the batched [x, x] UNet call. latents as in :func:`anisotropy_terms`.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t = _detection_timesteps(parts, num_inference_steps)[0]
    B, G, x, cond, uncond = _flat_inputs(parts, cond_embeds, uncond_embed, latents)

    def score_difference(z: torch.Tensor) -> torch.Tensor:
        out_u, out_c = _raw_pair(parts, z, t, uncond, cond)
        return parts.sharpness_field(out_c, z, t) - parts.sharpness_field(out_u, z, t)

    # The fused (flash / memory-efficient) SDPA kernels have no forward-mode AD; the math kernel does, at the
    # price of materialising every attention matrix. Only this detector pays it.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        s_delta = score_difference(x)
        _, jv = torch.func.jvp(score_difference, (x,), (s_delta,))
    return SharpnessTerms(jv.flatten(1).norm(dim=1).view(B, G).cpu(), int(t))


@torch.no_grad()
def score_prompts(
    parts: DenoiserParts,
    prompts: list[str],
    rows: list[int],
    *,
    num_images_per_prompt: int = 4,
    gen_seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    score_steps: int = 1,
    latents_mode: str = "per_prompt",
    uncond_embed: torch.Tensor | None = None,
    detector: str = "wen",
    anisotropy_weights: tuple[float, float] | None = None,
    dsm_step: int = 0,
    region: StabilityRegion | None = None,
) -> tuple[NoiseTrace | AnisotropyTerms | SharpnessTerms | EarlyTerms | BrokenTerms, list[bool]]:
    """One detector's terms for dataset rows ``rows`` (their positions seed the latents) and truncation flags.

    The same rows draw the same x_T for every detector; ``anisotropy``, ``sharpness`` and ``grad_diff`` feed it
    to the UNet unscaled (zero denoising steps), ``wen``, ``dsm`` and ``broken`` scale it by init_noise_sigma and
    follow the guided trajectory (``broken`` to its end; without a ``region`` its terms are the norms alone, which
    a calibration is made of).
    """
    if detector not in ALL_DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; expected one of {', '.join(ALL_DETECTORS)}")
    if len(prompts) != len(rows):
        raise ValueError(f"got {len(prompts)} prompts for {len(rows)} rows")
    if not 1 <= score_steps <= num_inference_steps:
        raise ValueError(f"score_steps must be in 1..{num_inference_steps}, got {score_steps}")
    encoded = encode_prompts(parts, prompts)
    if uncond_embed is None:
        uncond_embed = parts.unconditional()
    if detector in ("anisotropy", "sharpness", "grad_diff"):
        latents = initial_latents(rows, num_images_per_prompt, parts.latent_shape, gen_seed, latents_mode)
        if detector == "anisotropy":
            terms = anisotropy_terms(parts, encoded.embeds, uncond_embed, latents,
                                     num_inference_steps=num_inference_steps, weights=anisotropy_weights)
        elif detector == "sharpness":
            terms = sharpness_terms(parts, encoded.embeds, uncond_embed, latents,
                                    num_inference_steps=num_inference_steps)
        else:
            terms = grad_diff_terms(parts, encoded.embeds, uncond_embed, latents,
                                    num_inference_steps=num_inference_steps)
        return terms, encoded.truncated
    latents = initial_latents(rows, num_images_per_prompt, parts.latent_shape, gen_seed, latents_mode,
                              parts.init_noise_sigma(num_inference_steps))
    if detector == "dsm":
        return dsm_terms(parts, encoded.embeds, uncond_embed, latents, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, dsm_step=dsm_step), encoded.truncated
    if detector == "broken":
        return broken_terms(parts, encoded.embeds, uncond_embed, latents, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, region=region), encoded.truncated
    trace = trace_noise_norms(
        parts, encoded.embeds, uncond_embed, latents,
        num_inference_steps=num_inference_steps, score_steps=score_steps, guidance_scale=guidance_scale,
        shared_latents=latents_mode == "shared",
    )
    return trace, encoded.truncated


def result_row(rec: PromptRecord, detector: str, terms: dict, score: float, truncated: bool) -> dict:
    """A results row of ``detect/detect_mem.py`` (and ``common.api.score_prompts``): the prompt, its score and the
    detector's terms (so a notebook can re-weight them)."""
    row = {"row": rec.row, "index": rec.index if rec.index is not None else rec.row, "prompt": rec.prompt}
    if rec.label is not None:
        row["label"] = rec.label
    if rec.type is not None:
        row["type"] = rec.type
    row.update(score=score, detector=detector, **terms, truncated=truncated)
    return row


def text_noise_objective(
    parts: DenoiserParts,
    cond_embeds: torch.Tensor,
    uncond_embed: torch.Tensor,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    target_steps: list[int],
    guidance_scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable ‖ε(x_t, c) − ε(x_t, ∅)‖₂ at each target step, shape [B, G, len(target_steps)].

    The gradient flows only through the conditional prediction ε(x_t, c) at the target steps: the
    trajectory leading there (x_t) and the unconditional prediction are computed without grad, and the
    unconditional embedding is a constant. This is the objective of Wen et al.'s token-wise significance
    (Sec. 4) and inference-time mitigation (Sec. 5). ``cond_embeds`` [B, L, D] may require grad; latents as
    in :func:`trace_noise_norms`. ``mask`` [B, G, 1, H, W] weights the difference elementwise before the norm
    (Chen et al. 2025's bright-ending mask, :mod:`common.t2i.mitigation.bright_ending`).
    """
    norms = dict(iter_text_noise_objective(
        parts, cond_embeds, uncond_embed, latents, num_inference_steps=num_inference_steps,
        target_steps=target_steps, guidance_scale=guidance_scale, mask=mask))
    return torch.stack([norms[s] for s in target_steps], dim=-1)


def iter_text_noise_objective(
    parts: DenoiserParts,
    cond_embeds: torch.Tensor,
    uncond_embed: torch.Tensor,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    target_steps: list[int],
    guidance_scale: float,
    mask: torch.Tensor | None = None,
):
    """:func:`text_noise_objective` one target step at a time: yields (step, [B, G] norms) in step order.

    Same trajectory and gradient rule; a caller that backpropagates each step's norms before asking for the
    next holds one step's graph in memory instead of all of them (``--target_steps all`` on Stable Diffusion).
    """
    if not target_steps or min(target_steps) < 0 or max(target_steps) >= num_inference_steps:
        raise ValueError(f"target steps must lie in 0..{num_inference_steps - 1}, got {target_steps}")
    dtype, device = parts.dtype, parts.device
    scheduler = parts.timesteps_scheduler(num_inference_steps)
    B, G = latents.shape[:2]
    x = latents.reshape(B * G, *latents.shape[2:]).to(device=device, dtype=torch.float32)
    cond = as_conditioning(cond_embeds).to(device=device, dtype=dtype).repeat_interleave(G)
    uncond = as_conditioning(uncond_embed).to(device=device, dtype=dtype).expand(B * G)
    wanted = sorted(set(target_steps))
    for step, t in enumerate(scheduler.timesteps[: wanted[-1] + 1]):
        x_in = parts.scale_model_input(scheduler, x, t)
        with torch.no_grad():
            out_u = parts.predict(x_in, t, uncond)
        if step in wanted:
            out_c = parts.predict(x_in, t, cond)
            eps_c = parts.metric_output(out_c, x_in, t, scheduler)
            eps_u = parts.metric_output(out_u, x_in, t, scheduler)
            if mask is not None:
                weight = mask.reshape(B * G, *mask.shape[2:]).to(device=eps_c.device, dtype=eps_c.dtype)
                eps_c, eps_u = eps_c * weight, eps_u * weight
            yield step, text_noise_norm(eps_c, eps_u).view(B, G)
            out_c = out_c.detach()
        else:
            with torch.no_grad():
                out_c = parts.predict(x_in, t, cond.detach())
        if step < wanted[-1]:
            with torch.no_grad():
                guided = classifier_free_guidance(out_u, out_c, guidance_scale)
                x = scheduler.step(guided, t, x, return_dict=False)[0].float()
