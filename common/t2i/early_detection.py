"""The "Early Detection" detectors (ICML 2026, randomnameforicml/icml-2026, src/detect_all_metrics.py): two scores
of the first DDIM step(s) of a prompt.

- ``grad_diff`` (their "metric 2"): ‖∇ₓ ½‖ε(x, c)‖² − ∇ₓ ½‖ε(x, ∅)‖²‖² at the first timestep on x_T. Each gradient is
  Jᵀε, the Jacobian of the prediction applied to the prediction; the paper reads it as a Hessian–score product.
- ``dsm``: how far one classifier-free-guided DDIM step moves the conditional prediction,
  ‖ε(x_{k+1}, t_{k+1}, c) − ε(x_k, t_k, c)‖² with k = ``dsm_step`` (0: their DSM 0→1, 1: DSM 1→2).

Both are squared sums over the whole latent (their ``torch.sum(d ** 2)``), averaged over the generations. ε is the
family's metric output: ε after v → ε conversion (the conversion's √(1−ᾱ)·x term is differentiated too, as in their
code) for the ε / v UNet families and PixArt, the velocity on rectified flow (SD3, Flux). There ε̂ = x + (1−σ)v
equals x_T at the first σ = 1 for every prompt, so ε-space grad_diff would be identically zero; the velocity is the
quantity that depends on the prompt there (docs/families.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.common.t2i.pipelines import DenoiserParts, as_conditioning, cat_conditionings
from diffmem.common.t2i.text_noise import classifier_free_guidance


def squared_sum(v: torch.Tensor) -> torch.Tensor:
    """Σ v² per sample over the whole latent (Early Detection, ICML 2026: every metric of detect_all_metrics.py)."""
    return v.float().flatten(1).pow(2).sum(dim=1)


def half_energy(eps: torch.Tensor) -> torch.Tensor:
    """½ Σ ε² per sample, the energy whose x-gradient metric 2 differences (Early Detection, ICML 2026, metric 2)."""
    return 0.5 * squared_sum(eps)


def gradient_difference(grad_cond: torch.Tensor, grad_uncond: torch.Tensor) -> torch.Tensor:
    """‖∇ₓE_c − ∇ₓE_u‖² per sample (Early Detection, ICML 2026, metric 2 = grad_diff)."""
    return squared_sum(grad_cond - grad_uncond)


def prediction_shift(eps_next: torch.Tensor, eps_now: torch.Tensor) -> torch.Tensor:
    """‖ε(x_{k+1}, t_{k+1}, c) − ε(x_k, t_k, c)‖² per sample (Early Detection, ICML 2026, DSM k→k+1)."""
    return squared_sum(eps_next - eps_now)


@dataclass
class EarlyTerms:
    """Per prompt and generation: one Early Detection metric (``name``) and the timesteps it reads."""

    name: str  # the row key: grad_diff or dsm
    values: torch.Tensor  # [B, G] fp32, CPU
    timesteps: tuple[int, ...]

    @property
    def score(self) -> torch.Tensor:
        return self.values.mean(dim=-1)

    def row_terms(self, b: int) -> dict:
        return {self.name: self.values[b].tolist(), "timesteps": list(self.timesteps)}


def _flat(parts: DenoiserParts, cond_embeds, uncond_embed, latents):
    B, G = latents.shape[:2]
    x = latents.reshape(B * G, *latents.shape[2:]).to(device=parts.device, dtype=torch.float32)
    cond = as_conditioning(cond_embeds).to(device=parts.device, dtype=parts.dtype).repeat_interleave(G)
    uncond = as_conditioning(uncond_embed).to(device=parts.device, dtype=parts.dtype).expand(B * G)
    return B, G, x, cond, cat_conditionings([uncond, cond])


def grad_diff_terms(parts: DenoiserParts, cond_embeds, uncond_embed, latents: torch.Tensor, *,
                    num_inference_steps: int) -> EarlyTerms:
    """grad_diff of B prompts × G generations at t₀ = timesteps[0] on x_T.

    latents: [B, G, C, H, W] x_T as drawn (unit variance, unscaled, as the anisotropy and sharpness detectors and
    their code feed it). One batched forward on [x, x] and two backward passes (one per branch; the samples are
    independent, so one backward of the summed energies gives every sample its own gradient).
    """
    scheduler = parts.timesteps_scheduler(num_inference_steps)
    t = scheduler.timesteps[0]
    B, G, x, _, emb = _flat(parts, cond_embeds, uncond_embed, latents)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out_u, out_c = parts.predict(torch.cat([x, x]), t, emb).chunk(2)
        energy_c = half_energy(parts.metric_output(out_c, x, t, scheduler)).sum()
        energy_u = half_energy(parts.metric_output(out_u, x, t, scheduler)).sum()
        (grad_c,) = torch.autograd.grad(energy_c, x, retain_graph=True)
        (grad_u,) = torch.autograd.grad(energy_u, x)
    return EarlyTerms("grad_diff", gradient_difference(grad_c, grad_u).view(B, G).cpu(), (int(t),))


@torch.no_grad()
def dsm_terms(parts: DenoiserParts, cond_embeds, uncond_embed, latents: torch.Tensor, *, num_inference_steps: int,
              guidance_scale: float, dsm_step: int = 0) -> EarlyTerms:
    """DSM k→k+1 (k = dsm_step) along the guided trajectory from x_T.

    latents: [B, G, C, H, W], already scaled by init_noise_sigma (1 for DDIM and FlowMatchEuler). (k + 1) guided
    steps at ``guidance_scale`` (2·G evaluations each) and one conditional evaluation at step k + 1.
    """
    if not 0 <= dsm_step < num_inference_steps - 1:
        raise ValueError(f"dsm_step must be in 0..{num_inference_steps - 2}, got {dsm_step}")
    scheduler = parts.timesteps_scheduler(num_inference_steps)
    timesteps = scheduler.timesteps[: dsm_step + 2]
    B, G, x, cond, emb = _flat(parts, cond_embeds, uncond_embed, latents)
    eps_now = None
    for t in timesteps[:-1]:
        x_in = parts.scale_model_input(scheduler, x, t)
        out_u, out_c = parts.predict(torch.cat([x_in, x_in]), t, emb).chunk(2)
        eps_now = parts.metric_output(out_c, x_in, t, scheduler)
        x = scheduler.step(classifier_free_guidance(out_u, out_c, guidance_scale), t, x, return_dict=False)[0].float()
    t_next = timesteps[-1]
    x_in = parts.scale_model_input(scheduler, x, t_next)
    out_next = parts.predict(x_in, t_next, cond)
    eps_next = parts.metric_output(out_next, x_in, t_next, scheduler)
    return EarlyTerms("dsm", prediction_shift(eps_next, eps_now).view(B, G).cpu(),
                      (int(timesteps[-2]), int(t_next)))
