"""The denoising math of memorization detection, as short pure functions on tensors.

Notation: x_t is a noisy latent at timestep t, ᾱ_t the cumulative signal fraction of the noise schedule,
c a prompt's text embedding and ∅ the empty prompt's embedding.
"""

from __future__ import annotations

import torch

from diffmem.common.t2i.options import LATENT_MODES


def text_noise_norm(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """‖ε_θ(x_t, c) − ε_θ(x_t, ∅)‖₂ per sample over the whole latent (Wen et al. 2024, Sec. 3)."""
    return (eps_cond.float() - eps_uncond.float()).flatten(1).norm(dim=1)


def noise_norm(eps: torch.Tensor) -> torch.Tensor:
    """‖ε_θ(x_t, ·)‖₂ per sample over the whole latent (Wen et al. 2024, the unconditional reference)."""
    return eps.float().flatten(1).norm(dim=1)


def detection_score(text_norms: torch.Tensor) -> torch.Tensor:
    """Mean over generations (dim -2), then over scored steps (dim -1) (Wen et al. 2024, Sec. 3)."""
    return text_norms.float().mean(dim=-2).mean(dim=-1)


def classifier_free_guidance(out_uncond: torch.Tensor, out_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̃ = ε(x_t, ∅) + s · (ε(x_t, c) − ε(x_t, ∅)) (Ho & Salimans 2022, Eq. 6 with s = 1 + w)."""
    return out_uncond + scale * (out_cond - out_uncond)


def epsilon_from_output(output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor | float,
                        prediction_type: str) -> torch.Tensor:
    """ε from a model output: ε itself, or ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t for v-prediction (Salimans & Ho 2022, App. D)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        a = torch.as_tensor(alpha_bar_t, dtype=torch.float32, device=output.device)
        return a.sqrt() * output.float() + (1 - a).sqrt() * x_t.float()
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected epsilon or v_prediction")


def initial_latents(rows: list[int], num_generations: int, shape: tuple[int, int, int], gen_seed: int,
                    mode: str = "per_prompt", init_noise_sigma: float = 1.0) -> torch.Tensor:
    """[B, G, C, H, W] starting noise: row i draws randn((G, C, H, W)) from a CPU generator seeded gen_seed + i.

    That is the stream of Wen et al.'s ``torch.manual_seed(i + gen_seed)`` on CPU, so a score depends only on
    the row and the seed, never on batch size, device or process count. In ``shared`` mode every row uses
    seed gen_seed, i.e. all prompts start from the same G latents.
    """
    if mode not in LATENT_MODES:
        raise ValueError(f"unknown latents mode {mode!r}; expected one of {', '.join(LATENT_MODES)}")
    out = []
    for row in rows:
        seed = gen_seed + row if mode == "per_prompt" else gen_seed
        g = torch.Generator("cpu").manual_seed(seed)
        out.append(torch.randn((num_generations, *shape), generator=g))
    return torch.stack(out) * init_noise_sigma


def channel_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over latent pixels of cos(a, b) taken over the channel axis, per sample (Asthana & Belagiannis 2026)."""
    a, b = a.float(), b.float()
    dot = (a * b).sum(dim=1)
    return (dot / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)).flatten(1).mean(dim=1)


def anisotropy_score(norm_term: torch.Tensor, cosine_term: torch.Tensor, gamma_norm: float,
                     gamma_cosine: float) -> torch.Tensor:
    """γ_N·mean_g N + γ_C·mean_g C over generations (dim -1) (Asthana & Belagiannis 2026, the detection score)."""
    return gamma_norm * norm_term.float().mean(dim=-1) + gamma_cosine * cosine_term.float().mean(dim=-1)


def score_from_epsilon(eps: torch.Tensor, alpha_bar_t: torch.Tensor | float) -> torch.Tensor:
    """s(x_t) = −ε(x_t)/√(1−ᾱ_t), the score ∇ log p_t(x_t) (Song et al. 2021; Jeon, Kim & No 2025)."""
    a = torch.as_tensor(alpha_bar_t, dtype=eps.dtype, device=eps.device)
    return -eps / (1 - a).sqrt()
