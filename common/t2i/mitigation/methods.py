"""Every inference-time mitigation behind one dispatch: what each method reads and how it generates a batch.

A method acts at one (or more) of three places, all from the same starting noise x_T of row i (seed gen_seed + i):

* the conditioning (``ours``: Wen et al.'s optimised embedding; ``rand_*``: augmented prompts; ``gni``: noise on
  the embedding), see :func:`common.t2i.mitigation.run.condition_batch` and :func:`generate_batch` here;
* the starting point x_T itself (``han_batch``, ``han_sample``: :mod:`common.t2i.mitigation.init_noise`);
* the sampler (``jain_stp``, ``jain_dtp``, ``jain_og``, the CFG schedule of ``han_batch``:
  :mod:`common.t2i.mitigation.guidance_schedule`; ``ren_attn``'s attention processor:
  :mod:`common.t2i.mitigation.attention_rescale`).

Cost is reported per image as *extra UNet evaluations*: forward passes of the UNet on one latent (ε_u and ε_c
count one each) beyond the sampler's two per step. Gradient steps (``ours``, ``han_sample``) also cost a backward
pass each, which the seconds per image include.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from diffmem.common.t2i.mitigation.attention_rescale import ren_attn_setup
from diffmem.common.t2i.mitigation.clip_pad import clip_pad_setup
from diffmem.common.t2i.mitigation.embedding_noise import gni_setup
from diffmem.common.t2i.mitigation.guard import guard_setup
from diffmem.common.t2i.mitigation.guidance_schedule import (
    jain_dtp_finish,
    jain_dtp_setup,
    jain_og_setup,
    jain_stp_setup,
)
from diffmem.common.t2i.mitigation.init_noise import han_batch_setup, han_sample_setup

# The registry without its hooks is torch-free (the CLIs check --method with it); imported back for this
# module's users.
from diffmem.common.t2i.mitigation.options import (  # noqa: F401
    BASELINES,
    METHOD_FIELDS,
    METHOD_INFO,
    METHODS,
    MethodInfo,
    settings_unread_by,
)
from diffmem.common.t2i.mitigation.prss import prss_finish, prss_setup
from diffmem.common.t2i.mitigation.stability_region import broken_finish, broken_setup
from diffmem.common.t2i.sampler import sample_latents


@dataclass(frozen=True)
class MethodSpec(MethodInfo):
    """A method of the registry (:class:`MethodInfo`: what it reads, its knob, its paper) with its hooks on a batch
    (:class:`MethodBatch`): ``setup`` before sampling (the conditioning, x_T, the guidance schedule, a context to
    sample in), ``finish`` after it (details read off the sampler). A method at the conditioning only (``none``,
    ``ours``, the baselines) has neither: :func:`condition_batch` did its work."""

    setup: Callable[[MethodBatch], None] | None = None
    finish: Callable[[MethodBatch], None] | None = None


# Each method's (setup, finish) hooks; the rest of its registry line is METHOD_INFO's, written without torch.
METHOD_HOOKS: dict[str, tuple[Callable | None, Callable | None]] = {
    "jain_stp": (jain_stp_setup, None),
    "jain_dtp": (jain_dtp_setup, jain_dtp_finish),
    "jain_og": (jain_og_setup, None),
    "han_batch": (han_batch_setup, None),
    "han_sample": (han_sample_setup, None),
    "ren_attn": (ren_attn_setup, None),
    "gni": (gni_setup, None),
    "guard": (guard_setup, None),
    "prss": (prss_setup, prss_finish),
    "clip_pad": (clip_pad_setup, None),
    "broken": (broken_setup, broken_finish),
}
METHOD_SPECS: dict[str, MethodSpec] = {
    name: MethodSpec(**vars(info), **dict(zip(("setup", "finish"), METHOD_HOOKS.get(name, (None, None)))))
    for name, info in METHOD_INFO.items()}
assert set(METHOD_HOOKS) <= set(METHOD_SPECS), "a hook for a method the registry does not hold"


@dataclass
class BatchGeneration:
    """Final latents [B, G, C, H, W] and, per row, the extra UNet evaluations per generation and method details."""

    latents: torch.Tensor
    extra_unet_calls: list[list[int]]
    first_step_norm: list[float]  # mean over generations of ‖ε_c − ε_u‖ at the first step of the trajectory used
    details: list[dict] = field(default_factory=list)


@dataclass
class MethodBatch:
    """One batch as a method's hooks see it: the inputs (read only) and what the sampler is given (theirs to set)."""

    parts: object
    cond_embeds: torch.Tensor  # [B, L, D]: condition_batch's conditioning
    uncond_embed: torch.Tensor
    latents: torch.Tensor  # [B, G, C, H, W]: x_T of each row, the same for every method
    rows: list[int]
    prompts_used: list[str]
    settings: object
    cond: torch.Tensor | None = None  # what the sampler is conditioned on (default: cond_embeds)
    x_T: torch.Tensor | None = None  # where it starts (default: latents)
    guidance: object | None = None  # a guidance schedule (None: constant CFG at the run's scale)
    sampling_context: object | None = None  # a context manager the sampling runs in (attention processors)
    extra: torch.Tensor | None = None  # extra UNet evaluations per generation [B·G]
    uncond: object | None = None  # the unconditional branch the sampler uses (default: uncond_embed)
    sampler: Callable | None = None  # a method's own sampling loop, called as sample_latents is (default: it)
    details: list[dict] = field(default_factory=list)  # per row, the method's own record

    def __post_init__(self):
        self.cond = self.cond_embeds if self.cond is None else self.cond
        self.x_T = self.latents if self.x_T is None else self.x_T
        self.uncond = self.uncond_embed if self.uncond is None else self.uncond
        self.extra = torch.zeros(self.B * self.G, dtype=torch.int64) if self.extra is None else self.extra
        self.details = self.details or [{} for _ in range(self.B)]

    @property
    def B(self) -> int:
        return self.latents.shape[0]

    @property
    def G(self) -> int:
        return self.latents.shape[1]

    @property
    def steps(self) -> int:
        return self.settings.num_inference_steps

    @property
    def sample(self) -> dict:
        """The sampler's keywords shared by every pass."""
        return dict(num_inference_steps=self.steps, guidance_scale=self.settings.guidance_scale)

    def flat_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) embeddings per generation [B·G, L, D], in the model's dtype."""
        dtype, device = self.parts.dtype, self.parts.device
        c = self.cond_embeds.to(device=device, dtype=dtype).repeat_interleave(self.G, dim=0)
        u = self.uncond_embed.to(device=device, dtype=dtype).expand(self.B * self.G, -1, -1)
        return c, u


def generate_batch(parts, cond_embeds: torch.Tensor, uncond_embed: torch.Tensor, latents: torch.Tensor,
                   rows: list[int], prompts_used: list[str], settings) -> BatchGeneration:
    """Generate B prompts × G generations with ``settings.method`` from latents [B, G, C, H, W] (x_T of each row):
    the method's hooks (its :class:`MethodSpec`), then classifier-free-guided sampling.

    cond_embeds [B, L, D]: the conditioning chosen by :func:`common.t2i.mitigation.run.condition_batch` (the
    optimised embedding for ``ours``, the augmented prompt's for the baselines, the prompt's otherwise).
    """
    spec = METHOD_SPECS[settings.method]
    batch = MethodBatch(parts, cond_embeds, uncond_embed, latents, rows, prompts_used, settings)
    if spec.setup is not None:
        spec.setup(batch)
    norms: list = []
    with batch.sampling_context or nullcontext():
        final = (batch.sampler or sample_latents)(parts, batch.cond, batch.uncond, batch.x_T, guidance=batch.guidance,
                                                  norms_out=norms, **batch.sample)
    if spec.finish is not None:
        spec.finish(batch)
    first = norms[0].view(batch.B, batch.G).mean(dim=1).tolist()
    return BatchGeneration(final, batch.extra.view(batch.B, batch.G).tolist(), first, batch.details)
