"""Per-sample random streams for training: every random draw of sample (epoch, position) comes from its own seed.

Training randomness (crop, flip, caption augmentation, VAE sample, noise, timestep) is a function of
(seed, epoch, position in the epoch's order) and a stream id, never of the global RNG. So a sample gets the
same draws whatever the batch size, number of processes or data-loader workers, and a resumed run draws
exactly what the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_MASK63 = (1 << 63) - 1

# Stream ids: one independent stream per kind of draw.
STREAM_PERMUTATION = 0
STREAM_IMAGE = 1
STREAM_CAPTION = 2
STREAM_VAE = 3
STREAM_NOISE = 4
STREAM_NOISE_OFFSET = 5
STREAM_TIMESTEP = 6
STREAM_LOADER = 7


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys (numpy SeedSequence hashing, stable across platforms)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & _MASK63


def numpy_generator(*keys: int) -> np.random.Generator:
    """numpy Generator seeded from integer keys."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def torch_generator(*keys: int) -> torch.Generator:
    """CPU torch Generator seeded from integer keys."""
    return torch.Generator("cpu").manual_seed(derive_seed(*keys))


def randn_per_sample(sample_seeds: Sequence[int] | torch.Tensor, shape: tuple[int, ...], stream: int) -> torch.Tensor:
    """[B, *shape] standard normal fp32 on CPU; row i drawn from sample_seeds[i]'s stream ``stream``."""
    seeds = [int(s) for s in sample_seeds]
    return torch.stack([torch.randn(shape, generator=torch_generator(s, stream)) for s in seeds])


def randint_per_sample(sample_seeds: Sequence[int] | torch.Tensor, high: int, stream: int) -> torch.Tensor:
    """[B] int64 uniform in [0, high) on CPU; entry i drawn from sample_seeds[i]'s stream ``stream``."""
    seeds = [int(s) for s in sample_seeds]
    return torch.cat([torch.randint(0, high, (1,), generator=torch_generator(s, stream)) for s in seeds])
