"""GUARD (Zhao, Triantafillou & Triantafillou, ICML 2026): attraction to a spike-attenuated prediction, repulsion
from the prompt's own.

Per step, three predictions of each trajectory: ε_u, ε⁻ = ε(x_t, c) the prompt's ordinary prediction, and ε⁺ the
same prompt's prediction with *attention-spike attenuation*: in every cross-attention layer of the UNet's down and
mid blocks (their ``BLOCKS_EARLY``), per row and head, each token's largest logit over the queries is z-scored
against those of the tokens after BOS (mean and unbiased std over positions 1..L−1, std + 1e-6); the logits of
every token with z > τ (BOS never) are multiplied by α for every query. The guided prediction is

    ε̂ = ε_u + s_i·(ε⁺ − ε_u) − r_i·(ε⁻ − ε_u),   s_i = w·f_s(i/S),  r_i = r·f_r(i/S)

with their schedules f (attraction ``none`` = 1, repulsion ``cosine`` = cos(π/2 · i/S) in their CA-in-GUARD call),
after the optional orthogonalisation of v⁺ = ε⁺ − ε_u against v⁻ = ε⁻ − ε_u per trajectory: where cos(v⁺, v⁻) >
0.9, v⁺ ← v⁺ − clip(⟨v⁺, v⁻⟩/‖v⁻‖², ±2)·v⁻ (their ``dual_guidance_call`` defaults, which their script leaves on).
Their basin tracker sets r_i = 0 at a step whose end-token attention mass A_i (the attenuated rows' mean attention
probability on the prompt's end token, over the down and mid layers, heads, queries and the prompt's generations)
is ≤ β·max(A_0..A_4); it is re-evaluated every step, and with their default β = 0 it never fires.

Defaults (their README's CA-in-GUARD command): α 0.3, τ 0.1, r 2.0, w 7.5. Their ε⁺ comes from the prompt itself
(k = 1 "neighbour"). Their neighbour variant takes k paraphrases of the prompt (Pegasus's, in their script) and
ε⁺ − ε_u = Σ w_j(ε_j − ε_u)/max(Σ w_j, 1e-8) over the paraphrases' ordinary predictions, none attenuated, the
orthogonalisation on; their neighbour gating sets w: ``none`` (their default) w = 1, ``hard`` w = [cos_j ≥ τ],
``soft`` w = exp(−(max(0, τ − cos_j)/σ)²), cos_j the cosine of the paraphrase's and the prompt's text embeddings
mean-pooled over the positions whose token is not the pad token (τ 0.9, σ 0.5). Here the paraphrases come from a
file (``--paraphrases``, as prss's), and a caption the file does not list keeps the attenuated prompt. Cost: 2 + k
UNet evaluations per step, k more than CFG.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from functools import partial

import torch

from diffmem.common.t2i.detection import encode_prompts
from diffmem.common.t2i.mitigation.attention_rescale import explicit_attention, ren_key_mask
from diffmem.common.t2i.mitigation.options import GuardSettings, read_paraphrases  # noqa: F401 (torch-free)
from diffmem.common.t2i.pipelines import as_conditioning, cat_conditionings
from diffmem.common.t2i.text_noise import text_noise_norm

# Their BLOCKS_EARLY: the cross-attention layers of the down and mid blocks (where attenuation acts and where the
# basin tracker reads the end token's mass).
GUARD_BLOCKS = ("down_blocks.", "mid_block.")
ORTHO_COS, ORTHO_CLIP, ORTHO_EPS = 0.9, 2.0, 1e-8  # their dual_guidance_call defaults
Z_EPS = 1e-6  # added to the std of the z-score, as theirs
BASIN_REF_STEPS = 5  # the tracker's reference is the largest mass of the first five steps


# --- the math ------------------------------------------------------------------------------------------------

def spike_attenuation(logits: torch.Tensor, threshold: float, scale: float) -> torch.Tensor:
    """Logits [b, h, q, L] with every spiking token's column multiplied by α: per (b, h), z_j = (m_j − μ)/(σ + 1e-6)
    of m_j = max_q logits[q, j], μ and σ (unbiased) over j ≥ 1; spiking: z_j > τ and j ≠ 0 (Zhao et al. 2026)."""
    token_max = logits.amax(dim=2)  # [b, h, L]
    content = token_max[..., 1:]
    z = (token_max - content.mean(dim=-1, keepdim=True)) / (content.std(dim=-1, keepdim=True) + Z_EPS)
    spike = z > threshold
    spike[..., 0] = False
    return torch.where(spike.unsqueeze(2), logits * scale, logits)


def guard_schedule(name: str, progress: float) -> float:
    """f(i/S) of a GUARD weight: none 1, linear 1 − p, cosine cos(πp/2), sine sin(πp/2)."""
    return {"none": 1.0, "linear": 1.0 - progress, "cosine": math.cos(progress * math.pi / 2),
            "sine": math.sin(progress * math.pi / 2)}[name]


def pooled_text_embedding(embeds: torch.Tensor, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[k, H] fp32: each sequence's mean over the positions whose token is not the pad token (Zhao et al.'s pooling
    for neighbour gating; CLIP in SD 1.x pads with its end token, so that drops the end token too)."""
    mask = (input_ids != pad_id).to(torch.float32).unsqueeze(-1)
    return (embeds.float() * mask.to(embeds.device)).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-8).to(embeds.device)


def neighbour_weights(cosines: torch.Tensor, gating: str, threshold: float, sigma: float) -> torch.Tensor:
    """w_j of each paraphrase from its cosine to the prompt: none 1, hard [cos ≥ τ], soft exp(−(max(0, τ − cos)/σ)²)."""
    if gating == "none":
        return torch.ones_like(cosines)
    if gating == "hard":
        return (cosines >= threshold).to(cosines.dtype)
    return torch.exp(-((threshold - cosines).clamp_min(0) / sigma) ** 2)


def guard_orthogonalize(v_pos: torch.Tensor, v_neg: torch.Tensor) -> torch.Tensor:
    """v⁺ − clip(⟨v⁺, v⁻⟩/(‖v⁻‖² + ε), ±2)·v⁻ per trajectory where cos(v⁺, v⁻) > 0.9, else v⁺ (fp32)."""
    p, n = v_pos.float().flatten(1), v_neg.float().flatten(1)
    dot = (p * n).sum(dim=1, keepdim=True)
    coef = (dot / ((n * n).sum(dim=1, keepdim=True) + ORTHO_EPS)).clamp(-ORTHO_CLIP, ORTHO_CLIP)
    cos = (dot / (((p * p).sum(dim=1, keepdim=True) + ORTHO_EPS).sqrt()
                  * ((n * n).sum(dim=1, keepdim=True) + ORTHO_EPS).sqrt())).clamp(-1.0, 1.0)
    return (p - (cos > ORTHO_COS).float() * coef * n).view_as(v_pos)


def guard_prediction(out_u, out_pos, out_neg, s: float, r: torch.Tensor, orthogonalize: bool) -> torch.Tensor:
    """ε̂ = ε_u + s·v⁺ − r·v⁻, v⁺ optionally orthogonalised; r per trajectory [N]."""
    v_pos, v_neg = out_pos - out_u, out_neg - out_u
    if orthogonalize:
        v_pos = guard_orthogonalize(v_pos, v_neg)
    return out_u + s * v_pos - r.view(-1, *([1] * (out_u.dim() - 1))).to(out_u) * v_neg


class EndTokenMass:
    """Their basin tracker, per prompt: A_i, the mean attention probability on the end token over the attenuated
    rows of its generations, the heads, queries and the down/mid cross-attention layers; in the basin while
    A_i > β·max(A_0 … A_4)."""

    def __init__(self, rows: torch.Tensor, end_token: torch.Tensor, num_generations: int, beta: float):
        self.rows, self.end_token, self.G, self.beta = rows, end_token, num_generations, beta
        self.total = torch.zeros(len(rows), dtype=torch.float64)
        self.layers = 0
        self.reference = torch.zeros(len(rows) // num_generations, dtype=torch.float64)
        self.history: list[torch.Tensor] = []

    def record(self, probs: torch.Tensor) -> None:
        """One layer's probabilities [b, h, q, L] of the whole batch."""
        p = probs[self.rows.to(probs.device)]  # [N, h, q, L]
        idx = self.end_token.to(probs.device).view(-1, 1, 1, 1).expand(-1, p.shape[1], p.shape[2], 1)
        self.total += p.gather(-1, idx).mean(dim=(1, 2, 3)).double().cpu()
        self.layers += 1

    def end_step(self, step: int) -> torch.Tensor:
        """Whether each prompt is still in the basin after this step's UNet call, [B] bool."""
        mass = (self.total / max(self.layers, 1)).view(-1, self.G).mean(dim=1)
        self.total.zero_()
        self.layers = 0
        self.history.append(mass)
        if step < BASIN_REF_STEPS:
            self.reference = torch.maximum(self.reference, mass)
        return mass / self.reference.clamp_min(1e-6) > self.beta


class GuardAttnProcessor:
    """A down/mid cross-attention layer: spike attenuation on the rows ``attenuate`` [b] and the end-token mass of
    those rows handed to the tracker."""

    def __init__(self, attenuate: torch.Tensor, threshold: float, scale: float, tracker: EndTokenMass | None):
        self.attenuate, self.threshold, self.scale, self.tracker = attenuate, threshold, scale, tracker

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        def attenuated(logits):
            rows = self.attenuate.to(logits.device)
            out = logits.clone()
            out[rows] = spike_attenuation(logits[rows], self.threshold, self.scale)
            return out

        return explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                  logits_fn=attenuated, probs_hook=self.tracker.record if self.tracker else None)


@contextmanager
def guard_attention(unet, processor: GuardAttnProcessor):
    """The down and mid blocks' cross-attention layers use ``processor`` inside the block; restored after."""
    original = unet.attn_processors
    unet.set_attn_processor({name: processor if ".attn2." in name and name.startswith(GUARD_BLOCKS) else proc
                             for name, proc in original.items()})
    try:
        yield processor
    finally:
        unet.set_attn_processor(original)


# --- the sampling loop ---------------------------------------------------------------------------------------

def guard_positives(cond_embeds, neighbours: list | None, G: int, weights: list | None = None):
    """ε⁺'s UNet rows: per prompt b its k_b paraphrases' conditionings (``neighbours[b]``, weighted by
    ``weights[b]`` [k_b], else 1 each), or without any the prompt itself (attenuated), each repeated for the G
    generations; with the trajectory [P] each row belongs to, its weight [P] and whether it is attenuated [P]."""
    prompts = as_conditioning(cond_embeds)
    rows, owner, row_weights, attenuated = [], [], [], []
    for b in range(len(prompts)):
        listed = neighbours[b] if neighbours is not None else None
        own = listed if listed is not None else prompts[b:b + 1]
        w = weights[b] if weights is not None and weights[b] is not None else torch.ones(len(own))
        rows.append(own.repeat_interleave(G))
        owner += [b * G + g for _ in range(len(own)) for g in range(G)]
        row_weights.append(w.float().repeat_interleave(G))
        attenuated += [listed is None] * (len(own) * G)
    return (cat_conditionings(rows), torch.tensor(owner, dtype=torch.int64), torch.cat(row_weights),
            torch.tensor(attenuated, dtype=torch.bool))


@torch.no_grad()
def guard_sample(parts, cond_embeds, uncond_embed, latents: torch.Tensor, *, num_inference_steps: int,
                 guidance_scale: float, settings, end_token: torch.Tensor, details: list[dict], guidance=None,
                 observer=None, norms_out: list | None = None, neighbours: list | None = None,
                 weights: list | None = None) -> torch.Tensor:
    """Final latents [B, G, C, H, W] of GUARD's trajectories from x_T ``latents`` (scaled), one prompt per row of
    cond_embeds [B, …]; one UNet batch [ε_u; ε⁺ rows; ε⁻] per step. ``end_token`` [B]: each prompt's end-token
    position (the tracker's); ``norms_out`` receives ‖ε⁻ − ε_u‖ per step (the prompt's own text noise);
    ``neighbours``, ``weights``: per prompt its paraphrases' conditionings and weights, or None (guard_positives)."""
    dtype, device = parts.dtype, parts.device
    scheduler = parts.timesteps_scheduler(num_inference_steps)
    B, G = latents.shape[:2]
    N = B * G
    x = latents.reshape(N, *latents.shape[2:]).to(device=device, dtype=torch.float32)
    c = as_conditioning(cond_embeds).to(device=device, dtype=dtype).repeat_interleave(G)
    u = as_conditioning(uncond_embed).to(device=device, dtype=dtype).expand(N)
    positives, owner, row_weights, attenuated = guard_positives(cond_embeds, neighbours, G, weights)
    P = len(owner)
    emb = cat_conditionings([u, positives.to(device=device, dtype=dtype), c])  # rows [ε_u; ε⁺ rows; ε⁻]
    attenuate = torch.cat([torch.zeros(N, dtype=torch.bool), attenuated, torch.zeros(N, dtype=torch.bool)])
    owner, row_weights = owner.to(device), row_weights.to(device)
    # Σ_j w_j per trajectory, clamped as theirs: a trajectory with no row (hard gating kept none) is not attracted.
    weight_sums = torch.zeros(N, device=device).index_add_(0, owner, row_weights).clamp_min(1e-8)
    # The tracker reads the attenuated rows, one per trajectory; the neighbour variant runs with β = 0 (validated).
    tracker = EndTokenMass(attenuate.nonzero().squeeze(1), end_token.repeat_interleave(G), G,
                           settings.guard_basin_beta) if neighbours is None else None
    processor = GuardAttnProcessor(attenuate, settings.guard_spike_threshold, settings.guard_spike_scale, tracker)
    out_of_basin = torch.zeros(B, dtype=torch.int64)
    with guard_attention(parts.unet, processor) if bool(attenuate.any()) else nullcontext():
        for step, t in enumerate(scheduler.timesteps):
            x_in = parts.scale_model_input(scheduler, torch.cat([x, x[owner], x]), t)
            out_u, out_rows, out_neg = parts.predict(x_in, t, emb).split([N, P, N])
            # v⁺ of a trajectory: Σ_j w_j(ε_j − ε_u)/Σ_j w_j over its rows (one row, itself, without paraphrases).
            shape = (-1, *([1] * (out_u.dim() - 1)))
            v_rows = (out_rows - out_u[owner]) * row_weights.view(shape).to(out_u)
            out_pos = out_u + torch.zeros_like(out_u).index_add_(0, owner, v_rows) / weight_sums.view(shape).to(out_u)
            if norms_out is not None:
                x_half = x_in[:N]
                norms_out.append(text_noise_norm(parts.metric_output(out_neg, x_half, t, scheduler),
                                                 parts.metric_output(out_u, x_half, t, scheduler)).cpu())
            in_basin = tracker.end_step(step) if tracker is not None else torch.ones(B, dtype=torch.bool)
            out_of_basin += (~in_basin).long()
            progress = step / len(scheduler.timesteps)
            s = guidance_scale * guard_schedule(settings.guard_attraction_schedule, progress)
            r = settings.guard_repulsion_scale * guard_schedule(settings.guard_repulsion_schedule, progress)
            r_rows = (in_basin.float() * r).repeat_interleave(G)
            guided = guard_prediction(out_u, out_pos, out_neg, s, r_rows, settings.guard_orthogonalize == "on")
            x_next = scheduler.step(guided, t, x, return_dict=False)[0].float()
            if observer is not None:
                observer(step, x, x_next)
            x = x_next
    for b in range(B):
        details[b]["guard_steps_out_of_basin"] = int(out_of_basin[b])
    return x.view(B, G, *x.shape[1:])


# --- the method's hook (common.t2i.mitigation.methods) -------------------------------------------------------

def neighbour_cosines(tokenizer, listed: list[str], listed_embeds: torch.Tensor, prompt: str,
                      prompt_embeds: torch.Tensor) -> torch.Tensor:
    """[k] cosines of the paraphrases' pooled text embeddings [k, L, H] with the prompt's [1, L, H]
    (pooled_text_embedding over the tokenizer's pad token; the family's first tokenizer)."""
    ids = tokenizer(listed + [prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    pooled = pooled_text_embedding(torch.cat([listed_embeds, prompt_embeds.to(listed_embeds)]), ids,
                                   tokenizer.pad_token_id)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return (pooled[:-1] @ pooled[-1]).clamp(-1.0, 1.0)


def guard_setup(batch) -> None:
    """``guard``: GUARD's own loop, 2 + k UNet evaluations per step (k more than CFG; k = 1 without paraphrases)."""
    s = batch.settings
    end_token = ren_key_mask(batch.parts.tokenizer, batch.prompts_used).sum(dim=1) - 1  # the first end token
    neighbours = weights = None
    rows = [1] * batch.B  # ε⁺ rows per prompt: the attenuated prompt itself without paraphrases
    if s.paraphrases is not None:
        table = read_paraphrases(s.paraphrases)
        neighbours, weights = [], []
        prompts = as_conditioning(batch.cond_embeds)
        for b, prompt in enumerate(batch.prompts_used):
            listed = table.get(prompt.strip(), [])
            encoded = encode_prompts(batch.parts, listed).embeds if listed else None
            w = None
            if listed and s.guard_neighbour_gating != "none":
                cos = neighbour_cosines(batch.parts.tokenizer, listed, as_conditioning(encoded).embeds, prompt,
                                        prompts[b:b + 1].embeds)
                w = neighbour_weights(cos, s.guard_neighbour_gating, s.guard_gating_threshold, s.guard_gating_sigma)
                batch.details[b]["guard_neighbour_cosines"] = cos.tolist()
                if s.guard_neighbour_gating == "hard":  # the others are not evaluated at all
                    keep = w > 0
                    encoded, w = as_conditioning(encoded)[keep], w[keep]
            neighbours.append(encoded)
            weights.append(w)
            if encoded is not None:
                rows[b] = len(as_conditioning(encoded))  # 0 where hard gating kept no paraphrase
            # 0: the attenuated prompt itself (or, hard-gated, no paraphrase kept)
            batch.details[b]["guard_neighbours"] = 0 if encoded is None else rows[b]
    batch.sampler = partial(guard_sample, settings=s, end_token=end_token, details=batch.details,
                            neighbours=neighbours, weights=weights)
    for b, k in enumerate(rows):
        batch.extra[b * batch.G:(b + 1) * batch.G] += k * batch.steps
