"""Batched detection against an independent step-by-step computation on the tiny pipeline."""

from __future__ import annotations

import copy

import pytest
import torch

from diffmem.common.t2i.detection import (
    encode_prompts,
    score_prompts,
    text_noise_objective,
    trace_noise_norms,
)

PROMPTS = ["a cat", "a dog on a mat", "The No Limits Business Woman Podcast", "a cat", "mountains at dawn"]


def hand_norms(pipe, prompt: str, row: int, G: int, steps: int, gen_seed: int = 0, scale: float = 7.5):
    """Wen et al.'s loop for one prompt, written out with the pipeline's own parts: [G, steps] norms."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    ids = pipe.tokenizer([prompt, ""], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        torch.manual_seed(row + gen_seed)
        x = torch.randn((G, 4, 8, 8)) * sched.init_noise_sigma
        out = []
        for t in sched.timesteps[:steps]:
            e_c = pipe.unet(x, t, encoder_hidden_states=emb[0:1].expand(G, -1, -1)).sample
            e_u = pipe.unet(x, t, encoder_hidden_states=emb[1:2].expand(G, -1, -1)).sample
            out.append(torch.stack([(e_c[g] - e_u[g]).norm() for g in range(G)]))
            x = sched.step(e_u + scale * (e_c - e_u), t, x).prev_sample
    return torch.stack(out, dim=1)


def test_first_step_scores_equal_hand_computation(tiny_pipe, tiny_parts):
    trace, truncated = score_prompts(tiny_parts, PROMPTS[:3], [0, 1, 2], num_images_per_prompt=3, score_steps=1)
    assert truncated == [False] * 3
    for b in range(3):
        ref = hand_norms(tiny_pipe, PROMPTS[b], b, G=3, steps=1)
        torch.testing.assert_close(trace.text_noise_norm[b], ref, rtol=1e-5, atol=1e-7)
        assert trace.score[b].item() == pytest.approx(ref.mean().item(), rel=1e-5)


def test_guided_trajectory_equals_hand_computation(tiny_pipe, tiny_parts):
    trace, _ = score_prompts(tiny_parts, PROMPTS[1:3], [7, 8], num_images_per_prompt=2, score_steps=4,
                             gen_seed=3, guidance_scale=5.0)
    for b, row in enumerate([7, 8]):
        ref = hand_norms(tiny_pipe, PROMPTS[1 + b], row, G=2, steps=4, gen_seed=3, scale=5.0)
        torch.testing.assert_close(trace.text_noise_norm[b], ref, rtol=1e-4, atol=1e-6)


def test_scores_do_not_depend_on_batch_composition(tiny_parts):
    rows = list(range(len(PROMPTS)))
    full, _ = score_prompts(tiny_parts, PROMPTS, rows, num_images_per_prompt=2, score_steps=2)
    for b in rows:
        alone, _ = score_prompts(tiny_parts, [PROMPTS[b]], [b], num_images_per_prompt=2, score_steps=2)
        torch.testing.assert_close(alone.text_noise_norm[0], full.text_noise_norm[b], rtol=1e-5, atol=1e-7)


def test_per_prompt_and_shared_latents(tiny_parts):
    rows = [0, 1, 2, 3]
    per, _ = score_prompts(tiny_parts, PROMPTS[:4], rows, num_images_per_prompt=2, latents_mode="per_prompt")
    shared, _ = score_prompts(tiny_parts, PROMPTS[:4], rows, num_images_per_prompt=2, latents_mode="shared")
    # Rows 0 and 3 hold the same prompt: different latents per row, identical latents when shared.
    assert abs(per.score[0] - per.score[3]) > 1e-4
    torch.testing.assert_close(shared.score[0], shared.score[3])
    # Shared mode is per-prompt mode with every row seeded like row 0 (gen_seed + 0).
    for b in rows:
        as_row0, _ = score_prompts(tiny_parts, [PROMPTS[b]], [0], num_images_per_prompt=2)
        torch.testing.assert_close(shared.text_noise_norm[b], as_row0.text_noise_norm[0], rtol=1e-5, atol=1e-7)
    # Beyond the first step the trajectories differ per prompt; shared latents must still be exact there.
    shared3, _ = score_prompts(tiny_parts, PROMPTS[:2], [0, 1], num_images_per_prompt=2, score_steps=3,
                               latents_mode="shared")
    alone3, _ = score_prompts(tiny_parts, [PROMPTS[1]], [0], num_images_per_prompt=2, score_steps=3)
    torch.testing.assert_close(shared3.text_noise_norm[1], alone3.text_noise_norm[0], rtol=1e-5, atol=1e-7)


def test_shared_latents_evaluate_the_unconditional_branch_once(tiny_parts):
    calls = []
    parts = copy.copy(tiny_parts)
    unet = tiny_parts.unet

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = unet

        def forward(self, x, t, **kw):
            calls.append(x.shape[0])
            return self.inner(x, t, **kw)

    parts.unet = Counting()
    score_prompts(parts, PROMPTS, list(range(5)), num_images_per_prompt=2, latents_mode="shared")
    assert sum(calls) == 5 * 2 + 2  # B·G conditional + G unconditional
    calls.clear()
    score_prompts(parts, PROMPTS, list(range(5)), num_images_per_prompt=2, latents_mode="per_prompt")
    assert sum(calls) == 2 * 5 * 2


def test_truncation_is_reported(tiny_parts):
    enc = encode_prompts(tiny_parts, ["short", " ".join(["word"] * 100)])
    assert enc.truncated == [False, True] and enc.embeds.shape[:2] == (2, 77)


def test_v_prediction_norms_are_epsilon_norms(tiny_parts):
    """For a v-prediction model, ε_c − ε_u = √ᾱ_t (v_c − v_u): the score is measured in ε units."""
    from diffusers import DDIMScheduler

    parts = copy.copy(tiny_parts)
    parts.scheduler = DDIMScheduler.from_config(tiny_parts.scheduler.config, prediction_type="v_prediction")
    emb = encode_prompts(parts, ["a cat", ""]).embeds.embeds
    lat = torch.randn((1, 2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    v_trace = trace_noise_norms(parts, emb[:1], emb[1:], lat, num_inference_steps=50, score_steps=1,
                                guidance_scale=7.5)
    eps_trace = trace_noise_norms(tiny_parts, emb[:1], emb[1:], lat, num_inference_steps=50, score_steps=1,
                                  guidance_scale=7.5)
    sched = copy.deepcopy(parts.scheduler)
    sched.set_timesteps(50)
    a_bar = sched.alphas_cumprod[int(sched.timesteps[0])]
    torch.testing.assert_close(v_trace.text_noise_norm, eps_trace.text_noise_norm * a_bar.sqrt(), rtol=1e-5, atol=1e-7)


def test_objective_matches_trace_and_has_gradient_only_through_cond(tiny_parts):
    emb = encode_prompts(tiny_parts, PROMPTS[:2]).embeds.embeds
    unc = encode_prompts(tiny_parts, [""]).embeds.embeds
    from diffmem.common.t2i.text_noise import initial_latents

    lat = initial_latents([0, 1], 2, tiny_parts.latent_shape, 0)
    trace = trace_noise_norms(tiny_parts, emb, unc, lat, num_inference_steps=50, score_steps=3, guidance_scale=7.5)
    cond = emb.clone().requires_grad_(True)
    uncond = unc.clone().requires_grad_(True)
    obj = text_noise_objective(tiny_parts, cond, uncond, lat, num_inference_steps=50, target_steps=[0, 2],
                               guidance_scale=7.5)
    torch.testing.assert_close(obj.detach(), trace.text_noise_norm[..., [0, 2]], rtol=1e-5, atol=1e-7)
    obj.sum().backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    assert uncond.grad is None


def _embeds_and_noise(pipe, prompt: str, row: int, G: int, gen_seed: int = 0):
    """The prompt's and ∅'s embeddings and row's pure-noise x_T, drawn as Wen et al. draw it."""
    ids = pipe.tokenizer([prompt, ""], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
    torch.manual_seed(row + gen_seed)
    return emb[0:1], emb[1:2], torch.randn((G, 4, 8, 8))


def hand_anisotropy(pipe, prompt: str, row: int, G: int, weights=(1.0, 2.0)):
    """Asthana & Belagiannis's score written out: separate UNet calls, per-pixel channel cosines in float64."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    t_hi, t_lo = sched.timesteps[0], sched.timesteps[-3]
    c, u, x = _embeds_and_noise(pipe, prompt, row, G)
    norms, cosines = [], []
    with torch.no_grad():
        for g in range(G):
            xg = x[g : g + 1]
            d_hi = (pipe.unet(xg, t_hi, encoder_hidden_states=c).sample
                    - pipe.unet(xg, t_hi, encoder_hidden_states=u).sample)
            norms.append(d_hi.double().pow(2).sum().sqrt().item())
            e_u = pipe.unet(xg, t_lo, encoder_hidden_states=u).sample[0].double()
            d_lo = pipe.unet(xg, t_lo, encoder_hidden_states=c).sample[0].double() - e_u
            cos = [(e_u[:, h, w] @ d_lo[:, h, w] / (e_u[:, h, w].norm() * d_lo[:, h, w].norm())).item()
                   for h in range(8) for w in range(8)]
            cosines.append(sum(cos) / len(cos))
    score = weights[0] * sum(norms) / G + weights[1] * sum(cosines) / G
    return torch.tensor(norms), torch.tensor(cosines), score, (int(t_hi), int(t_lo))


def test_anisotropy_equals_hand_computation(tiny_pipe, tiny_parts):
    terms, _ = score_prompts(tiny_parts, PROMPTS[:2], [3, 4], num_images_per_prompt=2, detector="anisotropy")
    for b, row in enumerate([3, 4]):
        n, c, score, ts = hand_anisotropy(tiny_pipe, PROMPTS[b], row, G=2)
        assert ts == terms.timesteps == (981, 41)  # SD's leading spacing: timesteps[0] and timesteps[-3]
        torch.testing.assert_close(terms.norm[b], n, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(terms.cosine[b], c, rtol=1e-4, atol=1e-5)
        assert terms.score[b].item() == pytest.approx(score, rel=1e-4, abs=1e-5)
    assert terms.weights == (1.0, 2.0)
    reweighted, _ = score_prompts(tiny_parts, PROMPTS[:1], [3], num_images_per_prompt=2, detector="anisotropy",
                                  anisotropy_weights=(0.5, -3.0))
    assert reweighted.score[0].item() == pytest.approx(hand_anisotropy(tiny_pipe, PROMPTS[0], 3, 2, (0.5, -3.0))[2],
                                                       rel=1e-4, abs=1e-5)


def test_anisotropy_norm_is_wen_first_step_norm(tiny_parts):
    """Under DDIM (init_noise_sigma 1) the zero-step N is Wen et al.'s first-step norm of the same row."""
    wen, _ = score_prompts(tiny_parts, PROMPTS, list(range(5)), num_images_per_prompt=3)
    ani, _ = score_prompts(tiny_parts, PROMPTS, list(range(5)), num_images_per_prompt=3, detector="anisotropy")
    torch.testing.assert_close(ani.norm, wen.text_noise_norm[..., 0])


def test_anisotropy_defaults_to_v_prediction_weights(tiny_parts):
    from diffusers import DDIMScheduler

    parts = copy.copy(tiny_parts)
    parts.scheduler = DDIMScheduler.from_config(tiny_parts.scheduler.config, prediction_type="v_prediction")
    terms, _ = score_prompts(parts, PROMPTS[:1], [0], num_images_per_prompt=1, detector="anisotropy")
    assert terms.weights == (1.0, 0.1)


def _score_difference_fn(pipe, c, u, t, a_bar):
    """x ↦ s(x,c) − s(x,∅) with s = −ε/√(1−ᾱ_t), written with two separate UNet calls."""
    def f(x):
        return -(pipe.unet(x, t, encoder_hidden_states=c).sample
                 - pipe.unet(x, t, encoder_hidden_states=u).sample) / (1 - a_bar).sqrt()
    return f


def test_sharpness_equals_finite_difference_and_explicit_jacobian(tiny_pipe, tiny_parts):
    from diffusers import DDIMScheduler
    from torch.nn.attention import SDPBackend, sdpa_kernel

    terms, _ = score_prompts(tiny_parts, PROMPTS[1:2], [5], num_images_per_prompt=2, detector="sharpness")
    assert terms.timestep == 981
    sched = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(50)
    t = sched.timesteps[0]
    c, u, x = _embeds_and_noise(tiny_pipe, PROMPTS[1], 5, G=2)
    pipe64 = copy.copy(tiny_pipe)
    pipe64.unet = copy.deepcopy(tiny_pipe.unet).double()
    f = _score_difference_fn(pipe64, c.double(), u.double(), t, sched.alphas_cumprod[int(t)].double())
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        for g in range(2):
            xg = x[g : g + 1].double()
            s_delta = f(xg)
            h = 1e-4  # central difference of f along s_Δ: (J_c − J_u) s_Δ up to O(h²)
            fd = (f(xg + h * s_delta) - f(xg - h * s_delta)) / (2 * h)
            assert terms.jvp_norm[0, g].item() == pytest.approx(fd.norm().item(), rel=1e-4)
    # The explicit Jacobian (reverse mode, one row per output entry) times s_Δ, for generation 0 in float64.
    xg = x[0:1].double()
    with sdpa_kernel(SDPBackend.MATH):
        jac = torch.autograd.functional.jacobian(f, xg).reshape(xg.numel(), xg.numel())
        with torch.no_grad():
            s_delta = f(xg).reshape(-1)
    explicit = jac @ s_delta
    assert terms.jvp_norm[0, 0].item() == pytest.approx(explicit.norm().item(), rel=1e-4)
    assert terms.score[0].item() == pytest.approx(terms.jvp_norm[0].mean().item())


@pytest.mark.parametrize("detector", ["anisotropy", "sharpness"])
def test_zero_step_detectors_do_not_depend_on_batch_composition(tiny_parts, detector):
    rows = list(range(len(PROMPTS)))
    full, _ = score_prompts(tiny_parts, PROMPTS, rows, num_images_per_prompt=2, detector=detector)
    for b in (0, 2, 4):
        alone, _ = score_prompts(tiny_parts, [PROMPTS[b]], [b], num_images_per_prompt=2, detector=detector)
        # fp32 batched convolutions round differently per batch shape; a cosine near 0 shows it in absolute terms.
        torch.testing.assert_close(alone.score[0], full.score[b], rtol=1e-4, atol=1e-5)
        assert alone.row_terms(0).keys() == full.row_terms(b).keys()


def test_unknown_detector_is_refused(tiny_parts):
    with pytest.raises(ValueError, match="unknown detector"):
        score_prompts(tiny_parts, PROMPTS[:1], [0], detector="oracle")
