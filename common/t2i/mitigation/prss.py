"""PRSS (Chen, Liu, Shah & Xu, CVPR 2025): semantic prompt search at the first step, then prompt re-anchoring.

*Semantic search* (step 0, on x_T): the candidates are the prompt, then its paraphrases in the file's order; the
first whose magnitude m = ‖ε(x_T, c) − ε(x_T, ∅)‖ is ≤ l_ss is used (ε_mod), else the one with the smallest m.
Re-anchoring is on for a trajectory when the *prompt's own* m exceeded l_ss (their ``m_trigger``).

*Re-anchoring* (every step, when on and m_t = ‖ε_mod − ε_u‖ > l_pr):

    ε̂ = ε_orig + s·(ε_mod − ε_orig) + (w − s)·(ε_mod − ε_u),   s = min((m_t − a)/(thr − a)·w, w),
    a = (w·l_pr − thr)/(w − 1),

so s rises from 1 at m_t = l_pr to w at m_t = thr; elsewhere plain CFG on ε_mod. Without paraphrases ε_mod = ε_orig
and this is CFG at the lower scale 1 + w − s on the steps above l_pr. Defaults: their README's command (l_pr 3,
thr 5, l_ss 1, w 7.5). Their repository ships paraphrases (25 each) for 4 of the 500 memorized prompts only.

Their code computes each magnitude as one norm over all the prompt's generations; they run one generation per
prompt, so here each generation has its own (x_T, search, switch), which equals theirs at G = 1; m is the family's
metric (ε here, the velocity on rectified flow). Cost per generation: 1 + (candidates tried) at step 0, and one
ε_orig per re-anchored step when a paraphrase was chosen (with the prompt itself ε_orig = ε_mod, no call).
"""

from __future__ import annotations

from functools import partial

import torch

from diffmem.common.t2i.detection import encode_prompts
from diffmem.common.t2i.mitigation.options import PrssSettings, read_paraphrases  # noqa: F401 (torch-free)
from diffmem.common.t2i.pipelines import as_conditioning, cat_conditionings
from diffmem.common.t2i.text_noise import classifier_free_guidance, text_noise_norm

# --- the math ------------------------------------------------------------------------------------------------


def prss_scale(magnitude: torch.Tensor, w: float, l_pr: float, thr: float) -> torch.Tensor:
    """s = min((m − a)/(thr − a)·w, w) with a = (w·l_pr − thr)/(w − 1) (their re-anchoring weight)."""
    a = (w * l_pr - thr) / (w - 1)
    return torch.clamp((magnitude - a) / (thr - a) * w, max=w)


def prss_guidance(out_u, out_mod, out_orig, s: torch.Tensor, w: float) -> torch.Tensor:
    """ε_orig + s·(ε_mod − ε_orig) + (w − s)·(ε_mod − ε_u), s per trajectory [N]."""
    s = s.view(-1, *([1] * (out_u.dim() - 1))).to(out_u)
    return out_orig + s * (out_mod - out_orig) + (w - s) * (out_mod - out_u)


@torch.no_grad()
def prss_search(parts, candidates: list, uncond_embed, latents: torch.Tensor, num_inference_steps: int,
                l_ss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per generation of latents [B, G, …] (x_T, scaled): (chosen candidate [B·G], the prompt's own magnitude
    [B·G], UNet evaluations [B·G]); candidates[b] is a Conditioning of prompt b's candidates, the prompt first."""
    scheduler = parts.timesteps_scheduler(num_inference_steps)
    t = scheduler.timesteps[0]
    B, G = latents.shape[:2]
    N = B * G
    x = parts.scale_model_input(scheduler, latents.reshape(N, *latents.shape[2:]).to(parts.device, torch.float32), t)
    u = as_conditioning(uncond_embed).expand(N)
    out_u = parts.predict(x, t, u)
    metric_u = parts.metric_output(out_u, x, t, scheduler)
    count = torch.tensor([len(candidates[n // G]) for n in range(N)])
    chosen = torch.full((N,), -1, dtype=torch.int64)
    magnitudes = torch.full((N, int(count.max())), float("inf"))
    evals = torch.ones(N, dtype=torch.int64)
    for j in range(int(count.max())):
        rows = ((chosen < 0) & (j < count)).nonzero().squeeze(1)
        if not len(rows):
            break
        c = cat_conditionings([candidates[int(n) // G][j] for n in rows])
        out = parts.predict(x[rows], t, c)
        m = text_noise_norm(parts.metric_output(out, x[rows], t, scheduler), metric_u[rows]).cpu()
        magnitudes[rows, j] = m
        evals[rows] += 1
        chosen[rows[m <= l_ss]] = j
    chosen = torch.where(chosen < 0, magnitudes.argmin(dim=1), chosen)
    return chosen, magnitudes[:, 0], evals


@torch.no_grad()
def prss_sample(parts, cond, uncond_embed, latents: torch.Tensor, *, num_inference_steps: int, guidance_scale: float,
                original, anchored: torch.Tensor, needs_original: torch.Tensor, settings, extra: torch.Tensor,
                reanchored: torch.Tensor, guidance=None, observer=None, norms_out: list | None = None) -> torch.Tensor:
    """Final latents [B, G, C, H, W]: CFG on ``cond`` (ε_mod, one row per generation) with re-anchoring to
    ``original`` (the prompt, one row per generation) on the ``anchored`` trajectories at steps with m_t > l_pr.
    ε_orig is evaluated for the rows of ``needs_original`` only (the others' ε_mod is the prompt's); each such call
    is added to ``extra`` [B·G] and each re-anchored step to ``reanchored`` [B·G]."""
    dtype, device = parts.dtype, parts.device
    scheduler = parts.timesteps_scheduler(num_inference_steps)
    B, G = latents.shape[:2]
    N = B * G
    w = guidance_scale
    x = latents.reshape(N, *latents.shape[2:]).to(device=device, dtype=torch.float32)
    mod = as_conditioning(cond).to(device=device, dtype=dtype)
    orig = as_conditioning(original).to(device=device, dtype=dtype)
    emb = cat_conditionings([as_conditioning(uncond_embed).to(device=device, dtype=dtype).expand(N), mod])
    for step, t in enumerate(scheduler.timesteps):
        x_in = parts.scale_model_input(scheduler, torch.cat([x, x]), t)
        out_u, out_mod = parts.predict(x_in, t, emb).chunk(2)
        x_half = x_in[:N]
        m = text_noise_norm(parts.metric_output(out_mod, x_half, t, scheduler),
                            parts.metric_output(out_u, x_half, t, scheduler)).cpu()
        if norms_out is not None:
            norms_out.append(m)
        guided = classifier_free_guidance(out_u, out_mod, w)
        on = anchored & (m > settings.prss_l_pr)
        if on.any():
            out_orig = out_mod.clone()
            call = (on & needs_original).nonzero().squeeze(1)
            if len(call):
                out_orig[call.to(device)] = parts.predict(x_half[call.to(device)], t, orig[call])
                extra[call] += 1
            s = prss_scale(m, w, settings.prss_l_pr, settings.prss_thr)
            rows = on.nonzero().squeeze(1).to(device)
            guided[rows] = prss_guidance(out_u[rows], out_mod[rows], out_orig[rows], s[on], w)
            reanchored += on.long()
        x_next = scheduler.step(guided, t, x, return_dict=False)[0].float()
        if observer is not None:
            observer(step, x, x_next)
        x = x_next
    return x.view(B, G, *x.shape[1:])


# --- the method's hook (common.t2i.mitigation.methods) -------------------------------------------------------

def prss_setup(batch) -> None:
    """``prss``: the step-0 search over each prompt and its paraphrases, then PRSS's own loop."""
    s = batch.settings
    table = read_paraphrases(s.paraphrases) if s.paraphrases is not None else {}
    prompts = as_conditioning(batch.cond_embeds)
    candidates = []
    for b, prompt in enumerate(batch.prompts_used):
        listed = table.get(prompt.strip(), [])
        own = prompts[b].to(device=batch.parts.device, dtype=batch.parts.dtype)
        candidates.append(cat_conditionings([own, encode_prompts(batch.parts, listed).embeds.to(
            device=batch.parts.device, dtype=batch.parts.dtype)]) if listed else own)
        batch.details[b]["prss_paraphrases"] = len(listed)
    chosen, own_magnitude, search_evals = prss_search(batch.parts, candidates, batch.uncond, batch.latents,
                                                     batch.steps, s.prss_l_ss)
    cond = cat_conditionings([candidates[n // batch.G][int(j)] for n, j in enumerate(chosen)])
    batch.extra += search_evals
    reanchored = torch.zeros(batch.B * batch.G, dtype=torch.int64)
    batch.cond = cond
    batch.sampler = partial(prss_sample, original=prompts.repeat_interleave(batch.G),
                            anchored=own_magnitude > s.prss_l_ss, needs_original=chosen > 0, settings=s,
                            extra=batch.extra, reanchored=reanchored)
    for b in range(batch.B):
        rows = slice(b * batch.G, (b + 1) * batch.G)
        batch.details[b]["prss_choice"] = chosen[rows].tolist()  # 0: the prompt itself, j: its j-th paraphrase
        batch.details[b]["prss_reanchored_steps"] = reanchored[rows]  # filled in while sampling


def prss_finish(batch) -> None:
    """Each generation's count of re-anchored steps, as a list."""
    for d in batch.details:
        d["prss_reanchored_steps"] = d["prss_reanchored_steps"].tolist()
