"""Rectified flow (SD3, Flux) as short pure functions: x_σ = (1−σ)x₀ + σε and the model predicts v = ε − x₀.

Esser et al. 2024 (SD3), Eq. 2–3 and Sec. 2; Lipman et al. 2023 (flow matching). What Wen et al.'s metric becomes
on these models: ε̂_c − ε̂_u = (1−σ)(v_c − v_u), zero at σ = 1, so the detectors difference velocities instead.
"""

from __future__ import annotations

import torch


def flow_sample(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x_σ = (1−σ)·x₀ + σ·ε (Esser et al. 2024, Eq. 2 with the rectified-flow a_t = 1 − t, b_t = t)."""
    return (1 - sigma) * x0 + sigma * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = dx_σ/dσ = ε − x₀, the velocity a rectified-flow model regresses (Esser et al. 2024, Eq. 3)."""
    return noise - x0


def flow_x0(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x̂₀ = x_σ − σ·v (solving x_σ = (1−σ)x₀ + σε with v = ε − x₀ for x₀)."""
    return x - sigma * v


def flow_epsilon(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """ε̂ = x_σ + (1−σ)·v (the same system solved for ε)."""
    return x + (1 - sigma) * v


def flow_score(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """s(x_σ) = −ε̂/σ = −(x_σ + (1−σ)v)/σ, the score of x_σ's marginal (p(x_σ|x₀) = N((1−σ)x₀, σ²I))."""
    return -flow_epsilon(x, v, sigma) / sigma


def flow_score_difference(v_cond: torch.Tensor, v_uncond: torch.Tensor, sigma) -> torch.Tensor:
    """s_c − s_u = −((1−σ)/σ)·(v_c − v_u): the conditional score difference from the velocity difference."""
    return -((1 - sigma) / sigma) * (v_cond - v_uncond)
