"""Adjusting the initial noise x_T so a trajectory leaves the memorization basin early (Han et al., NeurIPS 2025).

Han et al. find that starting points with a small conditional guidance ẽ = ε(x_T, T, c) − ε(x_T, T, ∅) escape a
memorized image's attraction basin sooner, so classifier-free guidance can start earlier. Two ways to get there:

* ``han_batch`` (batch-wise): M sharpness-aware steps on x_T, x_T ← x_T − γ·[ẽ(x_T + ρ·ẽ/‖ẽ‖) − ẽ(x_T)] (ẽ at
  t = T, norm per trajectory over the whole latent), then ε_u alone while t > τ and CFG after. 4 UNet
  evaluations per step per image (ẽ at two points, each ε_u and ε_c).
* ``han_sample`` (per-sample): AdamW on x_T minimising ‖ẽ(x_T, T)‖ until it is ≤ a target (checked before each
  update; at most ``iters`` updates), then CFG from step 0. Trajectories are optimised as one batch: each stops on
  its own and a stopped one never moves again, and AdamW is elementwise, so batched equals one by one (up to the
  UNet's batch-size rounding).

Their code evaluates the UNet on x_T as is; here it gets ``scheduler.scale_model_input(x_T, T)``, the same for
DDIM (the identity) and right for schedulers that scale their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.common.t2i.mitigation.guidance_schedule import StaticTransition
from diffmem.common.t2i.mitigation.options import HanSettings  # noqa: F401 (torch-free; imported back)
from diffmem.common.t2i.pipelines import DenoiserParts, cat_conditionings


def first_timestep(parts: DenoiserParts, num_inference_steps: int):
    """T: the first timestep of the sampler's schedule."""
    scheduler = parts.timesteps_scheduler(num_inference_steps)
    return scheduler, scheduler.timesteps[0]


def guidance_direction(parts: DenoiserParts, scheduler, x: torch.Tensor, t, cond: torch.Tensor,
                       uncond: torch.Tensor) -> torch.Tensor:
    """ẽ = ε(x, t, c) − ε(x, t, ∅) per trajectory, fp32 in ε units (velocity units on a rectified-flow family),
    from one batched call on [x, x]."""
    x_in = parts.scale_model_input(scheduler, x, t)
    out_u, out_c = parts.predict(torch.cat([x_in, x_in]), t, cat_conditionings([uncond, cond])).chunk(2)
    return parts.metric_output(out_c, x_in, t, scheduler) - parts.metric_output(out_u, x_in, t, scheduler)


def han_batch_step(x: torch.Tensor, eps_tilde: torch.Tensor, eps_tilde_perturbed: torch.Tensor,
                   gamma: float) -> torch.Tensor:
    """x_T − γ·[ẽ(x_T + ρ·ẽ/‖ẽ‖) − ẽ(x_T)] (Han et al. 2025, batch-wise adjustment, sharpness-aware step)."""
    return x - gamma * (eps_tilde_perturbed - eps_tilde)


def han_perturbation(eps_tilde: torch.Tensor, rho: float) -> torch.Tensor:
    """ρ·ẽ/‖ẽ‖ with the norm per trajectory over the whole latent (Han et al. 2025, batch-wise adjustment)."""
    norm = eps_tilde.flatten(1).norm(dim=1).view(-1, *([1] * (eps_tilde.dim() - 1)))
    return rho * eps_tilde / norm


@torch.no_grad()
def han_batch_adjust(parts: DenoiserParts, cond: torch.Tensor, uncond: torch.Tensor, x: torch.Tensor, *,
                     num_inference_steps: int, rho: float, gamma: float, steps: int) -> torch.Tensor:
    """x_T [N, C, H, W] after ``steps`` batch-wise adjustments; cond/uncond [N, L, D] in the UNet's dtype."""
    scheduler, T = first_timestep(parts, num_inference_steps)
    x = x.to(device=parts.device, dtype=torch.float32)
    for _ in range(steps):
        e = guidance_direction(parts, scheduler, x, T, cond, uncond)
        e_pert = guidance_direction(parts, scheduler, x + han_perturbation(e, rho), T, cond, uncond)
        x = han_batch_step(x, e, e_pert, gamma)
    return x


@dataclass
class NoiseOptimisation:
    """Per trajectory: adjusted x_T, AdamW updates, losses checked first and last, target reached, evaluations."""

    latents: torch.Tensor  # [N, C, H, W] fp32
    iterations: list[int]
    initial_loss: list[float]
    final_loss: list[float]  # the last loss checked (before the last update when the budget ran out)
    reached_target: list[bool]
    evaluations: list[int]  # loss evaluations (each one ε_u and one ε_c)


def han_sample_loss(eps_tilde: torch.Tensor) -> torch.Tensor:
    """‖ẽ(x_T, T)‖₂ per trajectory over the whole latent (Han et al. 2025, per-sample objective)."""
    return eps_tilde.flatten(1).norm(dim=1)


def han_sample_optimise(parts: DenoiserParts, cond: torch.Tensor, uncond: torch.Tensor, x: torch.Tensor, *,
                        num_inference_steps: int, lr: float, target_loss: float, iters: int) -> NoiseOptimisation:
    """AdamW (torch defaults but lr) on each trajectory's x_T until ‖ẽ(x_T, T)‖ ≤ target_loss (checked before
    each update), at most ``iters`` updates; cond/uncond [N, L, D] in the UNet's dtype."""
    scheduler, T = first_timestep(parts, num_inference_steps)
    device = parts.device
    N = x.shape[0]
    param = x.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([param], lr=lr)
    active = torch.ones(N, dtype=torch.bool)
    initial, final = [float("nan")] * N, [float("nan")] * N
    updates, evaluations, reached = [0] * N, [0] * N, [False] * N
    for it in range(iters):
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        sub = param[idx.to(device)]
        loss = han_sample_loss(guidance_direction(parts, scheduler, sub, T, cond[idx.to(device)],
                                                  uncond[idx.to(device)]))
        values = loss.detach().cpu().tolist()
        keep = []
        for k, n in enumerate(idx.tolist()):
            evaluations[n] += 1
            if it == 0:
                initial[n] = values[k]
            final[n] = values[k]
            if values[k] <= target_loss:
                reached[n] = True
                active[n] = False
            else:
                keep.append(k)
        if not keep:
            break
        # Summing per-trajectory losses keeps each trajectory's gradient what it would be alone.
        (grad_sub,) = torch.autograd.grad(loss[keep].sum(), [sub])
        moving = active.to(device)
        grad = torch.zeros_like(param)
        grad[idx.to(device)] = grad_sub
        param.grad = grad * moving.view(-1, 1, 1, 1)
        before = param.detach().clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # stopped trajectories stay put (weight decay included)
            param.copy_(torch.where(moving.view(-1, 1, 1, 1), param, before))
        for n in active.nonzero().flatten().tolist():
            updates[n] += 1
    return NoiseOptimisation(param.detach(), updates, initial, final, reached, evaluations)


# --- the methods' hooks (common.t2i.mitigation.methods) ------------------------------------------------------

def han_batch_setup(batch) -> None:
    """``han_batch``: x_T adjusted batch-wise, then the unconditional prediction alone while t > τ."""
    s = batch.settings
    c, u = batch.flat_embeds()
    flat = han_batch_adjust(batch.parts, c, u, batch.latents.flatten(0, 1), num_inference_steps=batch.steps,
                            rho=s.han_rho, gamma=s.han_gamma, steps=s.han_m)
    batch.x_T = flat.view(batch.latents.shape)
    batch.extra += 4 * s.han_m
    batch.guidance = StaticTransition(s.han_tau, 0.0, s.guidance_scale)


def han_sample_setup(batch) -> None:
    """``han_sample``: each generation's x_T optimised until its noise magnitude at T reaches the target."""
    s, B, G = batch.settings, batch.B, batch.G
    c, u = batch.flat_embeds()
    res = han_sample_optimise(batch.parts, c, u, batch.latents.flatten(0, 1), num_inference_steps=batch.steps,
                              lr=s.han_lr, target_loss=s.han_target_loss, iters=s.han_iters)
    batch.x_T = res.latents.view(batch.latents.shape)
    batch.extra += 2 * torch.tensor(res.evaluations)
    for b in range(B):
        sl = slice(b * G, (b + 1) * G)
        batch.details[b].update(han_iterations=res.iterations[sl], han_loss_initial=res.initial_loss[sl],
                                han_loss_final=res.final_loss[sl], han_reached_target=res.reached_target[sl])
