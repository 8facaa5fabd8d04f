"""Guidance schedules that keep a trajectory out of a memorized image's attraction basin (Jain et al., CVPR 2025).

Jain et al. observe that classifier-free guidance applied while a trajectory is still inside a memorized image's
attraction basin steers it onto the training image, and that the basin is left at a *transition point* after
which ordinary guidance is harmless. Three ways of choosing that point:

* ``jain_stp`` (static transition point): guidance scale ``early_scale`` while t > τ, then w. Their settings:
  τ = 500 with scale 0 (ε_u alone), and opposite guidance τ = 650 with scale −2.
* ``jain_dtp`` (dynamic transition point): d_i = ‖ε_c − ε_u‖ per trajectory at step i; the trajectory is
  transitioned from the first step i ≥ 1 with d_i > d_{i−1} on (the step after d's first local minimum), decided
  with step i's own predictions, so no extra UNet call is needed (``--jain_dtp_rule rise``). Their released script
  additionally requires d_{i−2} > d_{i−1}, i.e. a minimum strictly inside the sequence, so a rise right after
  step 0 does not count (``--jain_dtp_rule minimum``).
* ``jain_og`` (opposite guidance, their extra-pass variant): one unmitigated pass with guidance ε_u − w·ẽ records
  the cosine distance of successive latents; its first strict local minimum (the second one when the first is
  at step 1; step 5 when there is none, as in their script) is the transition step; the generating pass uses −w
  before it and +w from it on.

Every rule here is a callable ``rule(step, t, text_norm) -> scale`` giving a per-trajectory guidance scale [N]
for :func:`common.t2i.sampler.sample_latents`; ``text_norm`` is ‖ε_c − ε_u‖ per trajectory over the whole
latent (ε units).
"""

from __future__ import annotations

import torch

from diffmem.common.t2i.mitigation.options import JainSettings  # noqa: F401 (torch-free; imported back)
from diffmem.common.t2i.sampler import sample_latents

# Their opposite-guidance script falls back to step 5 when the cosine distances have no interior minimum.
JAIN_OG_FALLBACK_STEP = 5



# --- the math ------------------------------------------------------------------------------------------------

def jain_static_scale(t: float, tau: float, early_scale: float, guidance_scale: float) -> float:
    """w(t) = early_scale while t > τ, else w (Jain et al. 2025, static transition point)."""
    return early_scale if t > tau else guidance_scale


def jain_transition_step(norms: torch.Tensor, rule: str = "rise") -> torch.Tensor:
    """First step i ≥ 1 with d_i > d_{i−1} (rule minimum: and d_{i−2} > d_{i−1}) of norms [..., S], or S if none
    (Jain et al. 2025, DTP)."""
    S = norms.shape[-1]
    rise = norms[..., 1:] > norms[..., :-1]
    if rule == "minimum":
        fell = torch.zeros_like(rise)
        fell[..., 1:] = norms[..., :-2] > norms[..., 1:-1]
        rise = rise & fell
    first = rise.to(torch.int64).argmax(dim=-1) + 1  # argmax returns the first maximal (True) position
    return torch.where(rise.any(dim=-1), first, torch.full_like(first, S))


def latent_step_distance(x_prev: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
    """1 − cos(x_{k+1}, x_k) per trajectory over the whole latent (Jain et al. 2025, opposite-guidance pass)."""
    return 1 - torch.nn.functional.cosine_similarity(x_next.flatten(1).double(), x_prev.flatten(1).double(), dim=1)


def jain_og_transition(distances: torch.Tensor, fallback: int = JAIN_OG_FALLBACK_STEP) -> torch.Tensor:
    """Per row of distances [N, S]: the first strict interior local minimum, the second one if the first is step 1,
    else min(fallback, S) (Jain et al. 2025, opposite guidance's transition step)."""
    N, S = distances.shape
    out = torch.full((N,), min(fallback, S), dtype=torch.int64)
    for n in range(N):
        d = distances[n].tolist()
        minima = [k for k in range(1, S - 1) if d[k - 1] > d[k] < d[k + 1]]
        if minima:
            out[n] = minima[1] if minima[0] == 1 and len(minima) >= 2 else minima[0]
    return out


# --- rules for the sampler -----------------------------------------------------------------------------------

class ConstantGuidance:
    """Scale w at every step (plain classifier-free guidance)."""

    def __init__(self, guidance_scale: float):
        self.guidance_scale = guidance_scale

    def __call__(self, step: int, t: float, text_norm: torch.Tensor) -> torch.Tensor:
        return torch.full_like(text_norm, self.guidance_scale)


class StaticTransition:
    """``early_scale`` while t > τ, then w, for every trajectory (Jain's jain_stp; Han's batch-wise schedule with 0)."""

    def __init__(self, tau: float, early_scale: float, guidance_scale: float):
        self.tau, self.early_scale, self.guidance_scale = tau, early_scale, guidance_scale

    def __call__(self, step: int, t: float, text_norm: torch.Tensor) -> torch.Tensor:
        return torch.full_like(text_norm, jain_static_scale(t, self.tau, self.early_scale, self.guidance_scale))


class DynamicTransition:
    """Per trajectory: ``early_scale`` until the first step whose norm rises above the previous one, w from it on."""

    def __init__(self, early_scale: float, guidance_scale: float, rule: str = "rise"):
        self.early_scale, self.guidance_scale, self.rule = early_scale, guidance_scale, rule
        self.previous: torch.Tensor | None = None
        self.fell: torch.Tensor | None = None  # d_{i−1} < d_{i−2}
        self.transition_step: torch.Tensor | None = None  # [N] int64, -1 while not transitioned

    def __call__(self, step: int, t: float, text_norm: torch.Tensor) -> torch.Tensor:
        norm = text_norm.detach().float().cpu()
        if self.previous is None:
            self.transition_step = torch.full(norm.shape, -1, dtype=torch.int64)
            self.fell = torch.zeros(norm.shape, dtype=torch.bool)
        else:
            new = (self.transition_step < 0) & (norm > self.previous)
            if self.rule == "minimum":
                new &= self.fell
            self.transition_step[new] = step
            self.fell = norm < self.previous
        self.previous = norm
        on = (self.transition_step >= 0).to(text_norm.device)
        return torch.where(on, torch.full_like(text_norm, self.guidance_scale),
                           torch.full_like(text_norm, self.early_scale))


class StepSwitch:
    """Per trajectory n: scale ``before`` at steps < switch_step[n], ``after`` from it on (Jain's jain_og)."""

    def __init__(self, switch_step: torch.Tensor, before: float, after: float):
        self.switch_step, self.before, self.after = switch_step, before, after

    def __call__(self, step: int, t: float, text_norm: torch.Tensor) -> torch.Tensor:
        on = (step >= self.switch_step).to(text_norm.device)
        return torch.where(on, torch.full_like(text_norm, self.after), torch.full_like(text_norm, self.before))


class StepDistanceRecorder:
    """Observer of a sampler pass: 1 − cos of successive latents per trajectory, per step ([N, S] once done)."""

    def __init__(self):
        self.distances: list[torch.Tensor] = []

    def __call__(self, step: int, x_prev: torch.Tensor, x_next: torch.Tensor) -> None:
        self.distances.append(latent_step_distance(x_prev, x_next).cpu())

    def as_tensor(self) -> torch.Tensor:
        return torch.stack(self.distances, dim=-1)


# --- the methods' hooks (common.t2i.mitigation.methods) ------------------------------------------------------

def jain_stp_setup(batch) -> None:
    """``jain_stp``: the early scale while t > τ, the run's scale after."""
    s = batch.settings
    batch.guidance = StaticTransition(s.jain_tau, s.jain_early(s.method), s.guidance_scale)


def jain_dtp_setup(batch) -> None:
    """``jain_dtp``: the early scale until the step whose noise magnitude rises (or reaches its minimum)."""
    s = batch.settings
    batch.guidance = DynamicTransition(s.jain_early(s.method), s.guidance_scale, s.jain_dtp_rule)


def jain_dtp_finish(batch) -> None:
    """Each generation's transition step (None where it never came)."""
    for b, v in enumerate(batch.guidance.transition_step.view(batch.B, batch.G).tolist()):
        batch.details[b]["transition_step"] = [s if s >= 0 else None for s in v]


def jain_og_setup(batch) -> None:
    """``jain_og``: an opposite-guidance pass finds each generation's transition; then −w before it, w after."""
    w = batch.settings.guidance_scale
    recorder = StepDistanceRecorder()
    sample_latents(batch.parts, batch.cond_embeds, batch.uncond_embed, batch.latents, observer=recorder,
                   guidance=ConstantGuidance(-w), **batch.sample)
    switch = jain_og_transition(recorder.as_tensor())
    batch.guidance = StepSwitch(switch, -w, w)
    batch.extra += 2 * batch.steps
    for b, v in enumerate(switch.view(batch.B, batch.G).tolist()):
        batch.details[b]["transition_step"] = v
