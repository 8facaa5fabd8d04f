"""Gaussian noise injection into the text embedding at inference (GNI; Somepalli et al., NeurIPS 2023).

Each generation g of dataset row i is conditioned on c + λ·n_{i,g}, n ~ N(0, I) of the text encoder's output
shape. The noise of row i is drawn as one [G, L, D] tensor from its own CPU generator, seeded
``derive_seed(gen_seed + i, STREAM_GNI)`` (:func:`common.seeding.torch_generator`), so it depends only on the row
and the seed (never on batch size or device) and is independent of the starting noise (seed gen_seed + i).
λ = 0 gives exactly the unmitigated embedding. Somepalli et al.'s inference script uses λ = 0.1.
"""

from __future__ import annotations

import torch

from diffmem.common.seeding import torch_generator
from diffmem.common.t2i.mitigation.options import GniSettings  # noqa: F401 (torch-free; imported back)
from diffmem.common.t2i.pipelines import as_conditioning

STREAM_GNI = 301  # a stream id of its own (the training streams of common.seeding are 0-7)


def gni_noise(rows: list[int], num_generations: int, shape: tuple[int, int], gen_seed: int) -> torch.Tensor:
    """[B, G, L, D] standard normal fp32 on CPU: row i from the generator seeded derive_seed(gen_seed + i,
    STREAM_GNI)."""
    return torch.stack([torch.randn((num_generations, *shape), generator=torch_generator(gen_seed + r, STREAM_GNI))
                        for r in rows])


def gni_embeddings(embeds: torch.Tensor, noise: torch.Tensor, scale: float) -> torch.Tensor:
    """c̃_g = c + λ·n_g per generation: embeds [B, L, D], noise [B, G, L, D] -> [B, G, L, D] (Somepalli et al. 2023,
    GNI)."""
    return embeds.float().unsqueeze(1) + scale * noise.to(embeds.device)


# --- the method's hook (common.t2i.mitigation.methods) -------------------------------------------------------

def gni_setup(batch) -> None:
    """``gni``: the conditioning with seeded Gaussian noise added (one draw per row and generation)."""
    cond = as_conditioning(batch.cond_embeds)  # the noise goes on the token sequence; a pooled embedding stays
    noise = gni_noise(batch.rows, batch.G, tuple(cond.embeds.shape[1:]), batch.settings.gen_seed)
    noisy = gni_embeddings(cond.embeds, noise, batch.settings.gni_scale)
    batch.cond = noisy if isinstance(batch.cond_embeds, torch.Tensor) else cond.replace(embeds=noisy)
