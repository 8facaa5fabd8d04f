"""grad_diff and dsm (Early Detection, ICML 2026) against computations written out with the tiny pipeline's own UNet
in float64: torch.autograd on each branch by hand, and DDIM steps by their formula."""

from __future__ import annotations

import copy

import pytest
import torch

from diffmem.common.t2i.detection import score_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")  # small models on shared cores
PROMPTS = ["a cat", "The No Limits Business Woman Podcast"]


@pytest.fixture(scope="module")
def hand(tiny_pipe):
    """(UNet in float64, the prompts' and the empty prompt's CLIP embeddings in float64, DDIM with 50 steps)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(50)
    ids = tiny_pipe.tokenizer([*PROMPTS, ""], padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        emb = tiny_pipe.text_encoder(ids)[0].double()
    return copy.deepcopy(tiny_pipe.unet).double(), emb, sched


def _x_T(row: int, G: int) -> torch.Tensor:
    return torch.randn((G, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(row)).double()


def _eps(unet, x, t, e):
    return unet(x, t, encoder_hidden_states=e).sample


def _ddim(sched, eps, t, x):
    """One DDIM step (η = 0) by its formula: x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε."""
    a = sched.alphas_cumprod[int(t)].double()
    prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
    a_prev = sched.alphas_cumprod[prev].double() if prev >= 0 else sched.final_alpha_cumprod.double()
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def test_grad_diff_equals_autograd_on_each_branch(tiny_parts, hand):
    unet, emb, sched = hand
    terms, _ = score_prompts(tiny_parts, PROMPTS, [0, 1], num_images_per_prompt=2, detector="grad_diff")
    t0 = sched.timesteps[0]
    for b in range(2):
        x = _x_T(b, 2)
        ref = []
        for g in range(2):
            grads = []
            for e in (emb[b:b + 1], emb[2:3]):  # c, then ∅: two backward passes
                xg = x[g:g + 1].clone().requires_grad_(True)
                energy = 0.5 * (_eps(unet, xg, t0, e) ** 2).sum()
                grads.append(torch.autograd.grad(energy, xg)[0])
            ref.append(((grads[0] - grads[1]) ** 2).sum())
        ref = torch.stack(ref).float()
        torch.testing.assert_close(terms.values[b], ref, rtol=1e-4, atol=1e-8)
        assert terms.score[b].item() == pytest.approx(ref.mean().item(), rel=1e-4)
        assert terms.row_terms(b)["timesteps"] == [int(t0)]
    assert terms.values.min() > 0


@pytest.mark.parametrize("dsm_step", [0, 1])
def test_dsm_equals_manual_ddim_steps(tiny_parts, hand, dsm_step):
    unet, emb, sched = hand
    scale = 7.5
    terms, _ = score_prompts(tiny_parts, PROMPTS, [3, 4], num_images_per_prompt=2, detector="dsm",
                             guidance_scale=scale, dsm_step=dsm_step, gen_seed=2)
    ts = sched.timesteps
    with torch.no_grad():
        for b in range(2):
            x = _x_T(3 + b + 2, 2)  # row + gen_seed
            c, u = emb[b:b + 1].expand(2, -1, -1), emb[2:3].expand(2, -1, -1)
            for k in range(dsm_step + 1):
                e_c, e_u = _eps(unet, x, ts[k], c), _eps(unet, x, ts[k], u)
                x = _ddim(sched, e_u + scale * (e_c - e_u), ts[k], x)
            e_next = _eps(unet, x, ts[dsm_step + 1], c)
            ref = ((e_next - e_c) ** 2).flatten(1).sum(dim=1).float()
            torch.testing.assert_close(terms.values[b], ref, rtol=1e-4, atol=1e-8)
            assert terms.row_terms(b)["timesteps"] == [int(ts[dsm_step]), int(ts[dsm_step + 1])]
