"""Broken Memories (Huang et al., KDD 2026, arXiv 2605.22050): memorized generations leave the "empirical stability
region" of the sampler, the per-step band of latent norms that non-memorized prompts stay in.

Per sampler step k (from x_k to x_{k+1} = the proposal): ‖x_{k+1}‖, ‖Δ_k‖ = ‖x_{k+1} − x_k‖ and ‖x̂₀‖, the clean
estimate the step moved towards (from the step's own guided prediction, so no UNet call beyond ordinary CFG
sampling). Their z-scores against the calibration (:mod:`common.t2i.stability_calibration`) give

- the detection rule: a trajectory is flagged at the first step where |z_Δ| and |z_x̂₀| both exceed τ_mild; it is a
  strong memorization when |z_x̂₀| also exceeds τ_strong there, a mild one otherwise;
- the detection score (a number for ROC curves): max_k min(|z_Δ,k|, |z_x̂₀,k|), the smallest τ_mild at which the
  rule flags the trajectory, so thresholding the score at τ_mild is exactly the rule; a prompt's score is the mean
  over its generations, as for every other detector here;
- the mitigation, at each step where |z_Δ| > τ_mild while a trajectory is flagged strong (or mild, during its
  first k_mild steps): x̂₀ rescaled to its calibrated mean norm and fed back into the proposal with its weight there
  (x_{k+1} += w_k·(x̂₀' − x̂₀), w_k = √ᾱ_{t_{k+1}} for DDIM, 1 − σ_{k+1} for rectified flow), then, for a strong one,
  ‖Δ_k‖ clamped to μ_Δ ± γ·σ_Δ, and ‖x_{k+1}‖ clamped to μ_x ± γ·σ_x.

The defaults at 50 steps, τ_mild 3, τ_strong 14, γ 3, k_mild 10, and the rule above are the paper's as a public
reimplementation states its Algorithms 1–2 (the copy of the paper reachable when this was written stops before its
method section; docs/detection.md says what that leaves open).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.common.t2i.sampler import sample_latents
from diffmem.common.t2i.stability_calibration import STABILITY_NORMS

TAU_MILD, TAU_STRONG, GAMMA, MILD_STEPS = 3.0, 14.0, 3.0, 10
KINDS = (None, "mild", "strong")  # a trajectory's flag: index 0 none, 1 mild, 2 strong
STD_FLOOR = 1e-8  # a step whose calibration std is 0 (identical trajectories) divides by this instead


def flat_norm(v: torch.Tensor) -> torch.Tensor:
    """‖v‖₂ per sample over the whole latent."""
    return v.float().flatten(1).norm(dim=1)


def step_norms(x: torch.Tensor, x_next: torch.Tensor, x0_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """‖x_{k+1}‖, ‖x_{k+1} − x_k‖ and ‖x̂₀‖ of one sampler step, each [N] (Broken Memories: the three norms)."""
    return {"x_norm": flat_norm(x_next), "delta_norm": flat_norm(x_next - x), "x0_norm": flat_norm(x0_hat)}


def calibrate(norms: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Per-step mean and (unbiased) std over N non-memorized trajectories, norms[name] [N, S] (Broken Memories,
    the empirical stability region)."""
    mean = {k: norms[k].double().mean(dim=0) for k in STABILITY_NORMS}
    std = {k: norms[k].double().std(dim=0) for k in STABILITY_NORMS}
    return mean, std


def calibration_from_rows(rows: list[dict]) -> tuple[dict, dict, int]:
    """(mean, std, trajectories) of a broken run's results rows, each row's norms [[per step] per generation]."""
    norms = {k: torch.tensor([g for r in rows for g in r[k]], dtype=torch.float64) for k in STABILITY_NORMS}
    mean, std = calibrate(norms)
    return {k: v.tolist() for k, v in mean.items()}, {k: v.tolist() for k, v in std.items()}, len(norms["x_norm"])


def z_score(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """|n − μ_k| / σ_k per step (Broken Memories: the distance from the stability region in calibrated stds)."""
    return (value.double() - mean.double()).abs() / std.double().clamp_min(STD_FLOOR)


def detection_score(z_delta: torch.Tensor, z_x0: torch.Tensor) -> torch.Tensor:
    """max_k min(|z_Δ,k|, |z_x̂₀,k|) over the steps (last dim): the smallest τ_mild at which the rule flags."""
    return torch.minimum(z_delta, z_x0).amax(dim=-1)


def flag(z_delta: torch.Tensor, z_x0: torch.Tensor, tau_mild: float = TAU_MILD,
         tau_strong: float = TAU_STRONG) -> tuple[torch.Tensor, torch.Tensor]:
    """(first flagged step or −1, kind 0/1/2) per trajectory from z-scores [N, S] (Broken Memories, Algorithm 1)."""
    hit = (z_delta > tau_mild) & (z_x0 > tau_mild)
    any_hit = hit.any(dim=-1)
    first = torch.where(any_hit, hit.double().argmax(dim=-1), torch.full_like(any_hit, -1, dtype=torch.long))
    at_first = z_x0.gather(-1, first.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    kind = torch.where(any_hit, torch.where(at_first > tau_strong, 2, 1), 0)
    return first, kind


def rescale_norm(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """v · target/‖v‖ per sample: v with norm target (the rescaled x̂₀)."""
    norm = flat_norm(v).clamp_min(1e-12)
    return v * (target.to(norm) / norm).to(v.dtype).view(-1, *([1] * (v.dim() - 1)))


def clamp_norm(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """v with its norm clamped into [max(lo, 0), hi] per sample, direction kept (the stability-region clamps)."""
    norm = flat_norm(v).clamp_min(1e-12)
    lo, hi = lo.to(norm).clamp_min(0).expand_as(norm), hi.to(norm).expand_as(norm)
    return v * (torch.minimum(torch.maximum(norm, lo), hi) / norm).to(v.dtype).view(-1, *([1] * (v.dim() - 1)))


def mitigated_proposal(x: torch.Tensor, x_next: torch.Tensor, x0_hat: torch.Tensor, weight: float,
                       x0_target: torch.Tensor, delta_band: tuple, x_band: tuple, strong: torch.Tensor) -> torch.Tensor:
    """The proposal after Broken Memories' adaptive mitigation (Algorithm 2): x̂₀ rescaled to x0_target and fed back
    with its weight, ‖Δ‖ clamped into delta_band where ``strong`` [N], then ‖x_{k+1}‖ clamped into x_band."""
    out = x_next + weight * (rescale_norm(x0_hat, x0_target) - x0_hat)
    clamped = x + clamp_norm(out - x, *delta_band)
    out = torch.where(strong.view(-1, *([1] * (x.dim() - 1))), clamped, out)
    return clamp_norm(out, *x_band)


@dataclass
class StabilityRegion:
    """A calibration's per-step statistics as tensors: mean[name], std[name] [S] (float64)."""

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]

    @classmethod
    def from_record(cls, record: dict) -> StabilityRegion:
        return cls({k: torch.tensor(record["mean"][k], dtype=torch.float64) for k in STABILITY_NORMS},
                   {k: torch.tensor(record["std"][k], dtype=torch.float64) for k in STABILITY_NORMS})

    def z(self, name: str, values: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """z-scores of values [N, S] (all steps) or [N] (one step)."""
        if step is None:
            return z_score(values, self.mean[name], self.std[name])
        return z_score(values, self.mean[name][step], self.std[name][step])

    def band(self, name: str, step: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        mu, sd = self.mean[name][step], self.std[name][step]
        return mu - gamma * sd, mu + gamma * sd


class StabilityMonitor:
    """The sampler's ``correction`` hook: records the three norms of every step of N trajectories and, given a
    region and ``mitigate``, applies the mitigation rule as it goes (per-trajectory flag state)."""

    def __init__(self, parts, num_inference_steps: int, n: int, region: StabilityRegion | None = None, *,
                 mitigate: bool = False, tau_mild: float = TAU_MILD, tau_strong: float = TAU_STRONG,
                 gamma: float = GAMMA, mild_steps: int = MILD_STEPS):
        self.family = parts.family
        # A copy of the run's schedule (the sampler steps its own): the same ᾱ / σ for x̂₀ and its weight.
        self.scheduler = parts.timesteps_scheduler(num_inference_steps)
        problem = self.family.clean_estimate_problem(self.scheduler)
        if problem is not None:
            raise ValueError(problem)
        if mitigate and region is None:
            raise ValueError("the Broken Memories mitigation needs a calibration")
        self.region, self.mitigate = region, mitigate
        self.tau_mild, self.tau_strong, self.gamma, self.mild_steps = tau_mild, tau_strong, gamma, mild_steps
        self.kind = torch.zeros(n, dtype=torch.long)
        self.first = torch.full((n,), -1, dtype=torch.long)
        self.active_steps = torch.zeros(n, dtype=torch.long)
        self.norms: dict[str, list] = {k: [] for k in STABILITY_NORMS}

    def __call__(self, step: int, t, x: torch.Tensor, x_next: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
        x0_hat = self.family.clean_estimate(guided, x, t, self.scheduler)
        norms = step_norms(x, x_next, x0_hat)
        if self.mitigate:
            x_next = self._mitigate(step, x, x_next, x0_hat, norms)
            norms = step_norms(x, x_next, x0_hat)  # what the trajectory now holds
        for k in STABILITY_NORMS:
            self.norms[k].append(norms[k].cpu())
        return x_next

    def _mitigate(self, step, x, x_next, x0_hat, norms) -> torch.Tensor:
        r = self.region
        z_delta = r.z("delta_norm", norms["delta_norm"].cpu(), step)
        z_x0 = r.z("x0_norm", norms["x0_norm"].cpu(), step)
        new = (self.kind == 0) & (z_delta > self.tau_mild) & (z_x0 > self.tau_mild)
        self.kind[new] = torch.where(z_x0[new] > self.tau_strong, 2, 1)
        self.first[new] = step
        active = (z_delta > self.tau_mild) & ((self.kind == 2) | ((self.kind == 1) & (step < self.mild_steps)))
        if not active.any():
            return x_next
        self.active_steps += active.long()
        target = r.mean["x0_norm"][step].expand(len(x))
        out = mitigated_proposal(x, x_next, x0_hat, self.family.clean_weight(self.scheduler, step), target,
                                 r.band("delta_norm", step, self.gamma), r.band("x_norm", step, self.gamma),
                                 (self.kind == 2).to(x.device))
        return torch.where(active.to(x.device).view(-1, *([1] * (x.dim() - 1))), out, x_next)

    def traces(self) -> dict[str, torch.Tensor]:
        """norms[name] [N, S] (float32, CPU) of the steps run so far."""
        return {k: torch.stack(v, dim=-1) for k, v in self.norms.items()}


@dataclass
class BrokenTerms:
    """Per prompt, generation and step: the three norms and, with a calibration, their z-scores and the flags."""

    norms: dict[str, torch.Tensor]  # name -> [B, G, S]
    z: dict[str, torch.Tensor] | None = None  # name -> [B, G, S]
    first: torch.Tensor | None = None  # [B, G]: first flagged step at τ_mild, −1 if none
    kind: torch.Tensor | None = None  # [B, G]: 0 none, 1 mild, 2 strong

    @property
    def score(self) -> torch.Tensor:
        """mean over generations of max_k min(|z_Δ|, |z_x̂₀|); NaN without a calibration (a calibration run)."""
        if self.z is None:
            return torch.full(self.norms["x_norm"].shape[:1], float("nan"))
        return detection_score(self.z["delta_norm"], self.z["x0_norm"]).mean(dim=-1).float()

    def row_terms(self, b: int) -> dict:
        row = {k: self.norms[k][b].tolist() for k in STABILITY_NORMS}
        if self.z is not None:
            row.update({f"z_{k}": self.z[k][b].float().tolist() for k in STABILITY_NORMS})
            row["flag_step"] = [int(s) if s >= 0 else None for s in self.first[b].tolist()]
            row["flag_kind"] = [KINDS[k] for k in self.kind[b].tolist()]
        return row


def broken_terms(parts, cond_embeds, uncond_embed, latents: torch.Tensor, *, num_inference_steps: int,
                 guidance_scale: float, region: StabilityRegion | None = None) -> BrokenTerms:
    """The norms (and, given a region, z-scores, flags) of the full guided trajectories of B prompts × G
    generations: ordinary CFG sampling (2 evaluations per step and generation), nothing decoded.

    latents: [B, G, C, H, W], already scaled by init_noise_sigma.
    """
    B, G = latents.shape[:2]
    monitor = StabilityMonitor(parts, num_inference_steps, B * G)
    sample_latents(parts, cond_embeds, uncond_embed, latents, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, correction=monitor)
    norms = {k: v.view(B, G, -1) for k, v in monitor.traces().items()}
    if region is None:
        return BrokenTerms(norms)
    z = {k: region.z(k, norms[k]) for k in STABILITY_NORMS}
    first, kind = flag(z["delta_norm"], z["x0_norm"])
    return BrokenTerms(norms, z, first, kind)
