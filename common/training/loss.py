"""Per-sample loss math of diffusion training: Min-SNR weights and Wen et al.'s thresholded loss.

All functions are pure and act on per-sample tensors ([B]); the trainer reduces them to a scalar.
"""

from __future__ import annotations

import torch


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) per sample, in fp32 (Kingma et al. 2021, Eq. 2; Hang et al. 2023, Sec. 3)."""
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return a / (1.0 - a)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight: min(SNR, γ)/SNR for ε-, min(SNR, γ)/(SNR+1) for v-prediction (Hang et al. 2023, Sec.
    3.4, 4.2)."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"Min-SNR weighting supports epsilon and v_prediction, not {prediction_type!r}")


def hard_threshold_keep(text_noise_norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep a sample iff ‖ε(x_t, c) − ε(x_t, ∅)‖₂ < T; samples at or above T leave the loss (Wen et al. 2024, Sec.
    5)."""
    return text_noise_norms < threshold


def masked_mean(values: torch.Tensor, keep: torch.Tensor, total_kept: torch.Tensor | float | None = None,
                num_processes: int = 1) -> torch.Tensor:
    """Σ_kept values · P / max(K, 1), K = kept samples over all P processes (Wen et al. 2024, Sec. 5 masked loss).

    Averaging this over the P processes (as DDP averages gradients) gives the mean over every kept sample of
    the global batch. Dropped entries are selected away (not multiplied by 0) so a non-finite dropped loss
    cannot leak into the sum; with nothing kept the result is an exact 0 that still carries the graph, so
    every process runs the same backward and collectives.
    """
    if total_kept is None:
        total_kept = keep.sum()
    total = torch.as_tensor(total_kept, dtype=torch.float32, device=values.device)
    kept_sum = torch.where(keep, values.float(), torch.zeros_like(values, dtype=torch.float32)).sum()
    return kept_sum * num_processes / total.clamp(min=1.0)
