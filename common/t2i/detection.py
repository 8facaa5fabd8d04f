"""Memorization detectors that need no full generation, scored on a batch of prompts at once.

- ``wen``: text-conditional noise magnitude along the classifier-free-guided DDIM trajectory (Wen et al. 2024).
- ``anisotropy``: zero denoising steps, the noise magnitude at t_hi plus a channel-axis cosine at t_lo on the
  same pure-noise x_T (Asthana & Belagiannis, ICLR 2026).
- ``sharpness``: the norm of the difference of the score Jacobians applied to the score difference, one
  forward-mode JVP at the first DDIM timestep (Jeon, Kim & No, ICML 2025).

For ``wen``, unlike the reference implementation, which runs each prompt alone through every step and the VAE
decode, this scores a batch of prompts at once, stops after the last scored step, never decodes, and in
``shared`` latents mode evaluates ε(x_t, ∅) once per batch at the first step (the same for every prompt there).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from diffmem.common.t2i.options import ANISOTROPY_WEIGHTS, DETECTORS
from diffmem.common.t2i.pipeline import DenoiserParts
from diffmem.common.t2i.prompts import PromptRecord
from diffmem.common.t2i.text_noise import (
    anisotropy_score,
    channel_cosine,
    classifier_free_guidance,
    detection_score,
    epsilon_from_output,
    initial_latents,
    noise_norm,
    score_from_epsilon,
    text_noise_norm,
)


@dataclass
class EncodedPrompts:
    """Text-encoder outputs for a batch of prompts and whether each was cut at the tokenizer's length."""

    embeds: torch.Tensor  # [B, L, D]
    truncated: list[bool]


@torch.no_grad()
def encode_prompts(parts: DenoiserParts, prompts: list[str]) -> EncodedPrompts:
    """Stable Diffusion's conditioning: the text encoder's last hidden state of the padded, truncated ids."""
    tok = parts.tokenizer
    max_len = tok.model_max_length
    ids = tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    full_lengths = [len(x) for x in tok(prompts, truncation=False).input_ids]
    device = next(parts.text_encoder.parameters()).device
    mask = None
    if getattr(parts.text_encoder.config, "use_attention_mask", False):
        mask = ids.attention_mask.to(device)
    embeds = parts.text_encoder(ids.input_ids.to(device), attention_mask=mask)[0]
    return EncodedPrompts(embeds=embeds, truncated=[n > max_len for n in full_lengths])


@dataclass
class NoiseTrace:
    """Per prompt, generation and scored step: ‖ε(x_t,c) − ε(x_t,∅)‖₂ and ‖ε(x_t,∅)‖₂."""

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


def _alpha_bar(scheduler, t) -> torch.Tensor:
    return scheduler.alphas_cumprod[int(t)].float()


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

    cond_embeds: [B, L, D]; uncond_embed: [1, L, D]; latents: [B, G, C, H, W] fp32, already scaled by the
    scheduler's init_noise_sigma. With shared_latents the caller promises latents[b] is the same for every b,
    so the first unconditional prediction is computed for G latents and reused by all B prompts.
    """
    unet, dtype, device = parts.unet, parts.dtype, parts.device
    # Schedulers keep per-trajectory state (step index, multistep history): one fresh copy per batch.
    scheduler = copy.deepcopy(parts.scheduler)
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps[:score_steps]
    pred_type = scheduler.config.get("prediction_type", "epsilon")

    B, G = latents.shape[:2]
    x = latents.reshape(B * G, *latents.shape[2:]).to(device=device, dtype=torch.float32)
    cond = cond_embeds.to(device=device, dtype=dtype).repeat_interleave(G, dim=0)  # prompt-major, like x
    uncond = uncond_embed.to(device=device, dtype=dtype)
    text_norms, uncond_norms = [], []
    for step, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if shared_latents and step == 0:
            out_u = unet(x_in[:G].to(dtype), t, encoder_hidden_states=uncond.expand(G, -1, -1),
                         return_dict=False)[0].float().repeat(B, 1, 1, 1)
            out_c = unet(x_in.to(dtype), t, encoder_hidden_states=cond, return_dict=False)[0].float()
        else:
            both = torch.cat([x_in, x_in]).to(dtype)
            emb = torch.cat([uncond.expand(B * G, -1, -1), cond])
            out_u, out_c = unet(both, t, encoder_hidden_states=emb, return_dict=False)[0].float().chunk(2)
        a_bar = _alpha_bar(scheduler, t)
        eps_u = epsilon_from_output(out_u, x_in, a_bar, pred_type)
        eps_c = epsilon_from_output(out_c, x_in, a_bar, pred_type)
        text_norms.append(text_noise_norm(eps_c, eps_u).view(B, G).cpu())
        uncond_norms.append(noise_norm(eps_u).view(B, G).cpu())
        if step + 1 < len(timesteps):  # the trajectory ends after the last scored step
            guided = classifier_free_guidance(out_u, out_c, guidance_scale)
            x = scheduler.step(guided, t, x, return_dict=False)[0].float()
    return NoiseTrace(torch.stack(text_norms, dim=-1), torch.stack(uncond_norms, dim=-1))


def _detection_timesteps(parts: DenoiserParts, num_inference_steps: int) -> torch.Tensor:
    scheduler = copy.deepcopy(parts.scheduler)
    scheduler.set_timesteps(num_inference_steps, device=parts.device)
    return scheduler.timesteps


def _epsilons(parts: DenoiserParts, x: torch.Tensor, t, uncond: torch.Tensor, cond: torch.Tensor):
    """(ε(x,t,∅), ε(x,t,c)) from one batched UNet call on [x, x], in ε units whatever the prediction type."""
    pred_type = parts.scheduler.config.get("prediction_type", "epsilon")
    out = parts.unet(torch.cat([x, x]).to(parts.dtype), t, encoder_hidden_states=torch.cat([uncond, cond]),
                     return_dict=False)[0].float()
    a_bar = _alpha_bar(parts.scheduler, t)
    out_u, out_c = out.chunk(2)
    return epsilon_from_output(out_u, x, a_bar, pred_type), epsilon_from_output(out_c, x, a_bar, pred_type)


def _flat_inputs(parts: DenoiserParts, cond_embeds, uncond_embed, latents):
    B, G = latents.shape[:2]
    x = latents.reshape(B * G, *latents.shape[2:]).to(device=parts.device, dtype=torch.float32)
    cond = cond_embeds.to(device=parts.device, dtype=parts.dtype).repeat_interleave(G, dim=0)
    uncond = uncond_embed.to(device=parts.device, dtype=parts.dtype).expand(B * G, -1, -1)
    return B, G, x, cond, uncond


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
    if weights is None:
        weights = ANISOTROPY_WEIGHTS[parts.scheduler.config.get("prediction_type", "epsilon")]
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

    s = −ε/√(1−ᾱ_t), s_Δ = s(x_T,c) − s(x_T,∅), J = ∂s/∂x.

    One forward pass for s_Δ, then one forward-mode JVP (torch.func.jvp) of x ↦ s(x,c) − s(x,∅) with tangent
    s_Δ through the batched [x, x] UNet call. latents as in :func:`anisotropy_terms`.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t = _detection_timesteps(parts, num_inference_steps)[0]
    a_bar = _alpha_bar(parts.scheduler, t)
    B, G, x, cond, uncond = _flat_inputs(parts, cond_embeds, uncond_embed, latents)

    def score_difference(z: torch.Tensor) -> torch.Tensor:
        eps_u, eps_c = _epsilons(parts, z, t, uncond, cond)
        return score_from_epsilon(eps_c, a_bar) - score_from_epsilon(eps_u, a_bar)

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
) -> tuple[NoiseTrace | AnisotropyTerms | SharpnessTerms, list[bool]]:
    """One detector's terms for dataset rows ``rows`` (their positions seed the latents) and truncation flags.

    The same rows draw the same x_T for every detector; ``anisotropy`` and ``sharpness`` feed it to the UNet
    unscaled (zero denoising steps), ``wen`` scales it by init_noise_sigma and follows the guided trajectory.
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; expected one of {', '.join(DETECTORS)}")
    if len(prompts) != len(rows):
        raise ValueError(f"got {len(prompts)} prompts for {len(rows)} rows")
    if not 1 <= score_steps <= num_inference_steps:
        raise ValueError(f"score_steps must be in 1..{num_inference_steps}, got {score_steps}")
    encoded = encode_prompts(parts, prompts)
    if uncond_embed is None:
        uncond_embed = encode_prompts(parts, [""]).embeds
    if detector != "wen":
        latents = initial_latents(rows, num_images_per_prompt, parts.latent_shape, gen_seed, latents_mode)
        if detector == "anisotropy":
            terms = anisotropy_terms(parts, encoded.embeds, uncond_embed, latents,
                                     num_inference_steps=num_inference_steps, weights=anisotropy_weights)
        else:
            terms = sharpness_terms(parts, encoded.embeds, uncond_embed, latents,
                                    num_inference_steps=num_inference_steps)
        return terms, encoded.truncated
    latents = initial_latents(rows, num_images_per_prompt, parts.latent_shape, gen_seed, latents_mode,
                              float(parts.scheduler.init_noise_sigma))
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
    unet, dtype, device = parts.unet, parts.dtype, parts.device
    scheduler = copy.deepcopy(parts.scheduler)
    scheduler.set_timesteps(num_inference_steps, device=device)
    pred_type = scheduler.config.get("prediction_type", "epsilon")
    B, G = latents.shape[:2]
    x = latents.reshape(B * G, *latents.shape[2:]).to(device=device, dtype=torch.float32)
    cond = cond_embeds.to(device=device, dtype=dtype).repeat_interleave(G, dim=0)
    uncond = uncond_embed.to(device=device, dtype=dtype).expand(B * G, -1, -1)
    wanted = sorted(set(target_steps))
    for step, t in enumerate(scheduler.timesteps[: wanted[-1] + 1]):
        x_in = scheduler.scale_model_input(x, t)
        with torch.no_grad():
            out_u = unet(x_in.to(dtype), t, encoder_hidden_states=uncond, return_dict=False)[0].float()
        if step in wanted:
            out_c = unet(x_in.to(dtype), t, encoder_hidden_states=cond, return_dict=False)[0].float()
            a_bar = _alpha_bar(scheduler, t)
            eps_c = epsilon_from_output(out_c, x_in, a_bar, pred_type)
            eps_u = epsilon_from_output(out_u, x_in, a_bar, pred_type)
            if mask is not None:
                weight = mask.reshape(B * G, *mask.shape[2:]).to(device=eps_c.device, dtype=eps_c.dtype)
                eps_c, eps_u = eps_c * weight, eps_u * weight
            yield step, text_noise_norm(eps_c, eps_u).view(B, G)
            out_c = out_c.detach()
        else:
            with torch.no_grad():
                out_c = unet(x_in.to(dtype), t, encoder_hidden_states=cond.detach(), return_dict=False)[0].float()
        if step < wanted[-1]:
            with torch.no_grad():
                guided = classifier_free_guidance(out_u, out_c, guidance_scale)
                x = scheduler.step(guided, t, x, return_dict=False)[0].float()
