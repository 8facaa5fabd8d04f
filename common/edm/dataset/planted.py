"""Planted near-duplicates: a uint8 training set where exact answers and fp32 answers part, for tests and benches.

Twin pairs one uint8 level apart in one pixel, and one query between each pair placed so that the float64 log-weights
of Eq. 3 (Karras et al. 2022) of its twins differ by a chosen logit at σ: at σ = 0.002 fp32 squared distances (error
~1e-4 on ‖·‖² ≈ 300, ×1/2σ² = 125 000) get those two weights wrong, while an exact denoiser must give sigmoid(±logit).
"""

from __future__ import annotations

import numpy as np
import torch

from diffmem.common.edm.dataset.edm_zip import DatasetError


def planted_near_duplicates(n: int, batch: int, shape: tuple[int, int, int], sigma: float = 0.002,
                            logit: float = 1.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [n, C, H, W], float64 queries [batch, C, H, W]): images batch..2·batch−1 are twins of the first
    batch ones, one level apart in pixel 0, and query i sits between pair i with log w_twin − log w_i = logit at σ."""
    if n < 2 * batch:
        raise DatasetError(f"expected n >= 2 × batch (each query has its own planted pair), got {n} and {batch}")
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 255, (n, *shape), dtype=np.uint8)  # < 255: a twin's pixel can go one level up
    flat = u.reshape(n, -1)
    flat[batch:2 * batch] = flat[:batch]
    flat[batch:2 * batch, 0] += 1
    y = torch.from_numpy(flat[:2 * batch]).double() / 127.5 - 1
    a, b = y[:batch], y[batch:]
    diff = b - a
    noise = torch.from_numpy(rng.normal(0, 0.3, a.shape))
    noise -= (noise * diff).sum(1, keepdim=True) / (diff * diff).sum(1, keepdim=True) * diff  # ⟂ diff: no bias
    # ‖x − a‖² − ‖x − b‖² = 2 (x − midpoint)·diff: this offset makes log w_b − log w_a = logit at σ.
    x = 0.5 * (a + b) + noise + logit * sigma**2 / (diff * diff).sum(1, keepdim=True) * diff
    return torch.from_numpy(u), x.reshape(batch, *shape)
