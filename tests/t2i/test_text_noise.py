"""The detection math against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from diffmem.common.t2i.text_noise import (
    anisotropy_score,
    channel_cosine,
    classifier_free_guidance,
    detection_score,
    epsilon_from_output,
    initial_latents,
    noise_norm,
    score_from_epsilon,
    text_noise_norm,
)


def test_text_noise_norm_is_l2_over_the_whole_latent():
    eps_c = torch.zeros(2, 1, 2, 2)
    eps_u = torch.zeros(2, 1, 2, 2)
    eps_c[0, 0, 0, 0], eps_c[0, 0, 1, 1] = 3.0, 4.0  # ‖(3, 4)‖ = 5
    eps_c[1] = 1.0
    eps_u[1] = 0.5  # four entries of 0.5: sqrt(4 · 0.25) = 1
    assert text_noise_norm(eps_c, eps_u).tolist() == [5.0, 1.0]
    assert noise_norm(eps_u).tolist() == [0.0, 1.0]


def test_text_noise_norm_is_fp32_for_half_inputs():
    a = torch.full((1, 4, 8, 8), 300.0, dtype=torch.float16)
    out = text_noise_norm(a, torch.zeros_like(a))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(300.0 * 16)  # fp16 would overflow


def test_detection_score_means_generations_then_steps():
    # [B=1, G=2, S=3]: generation means per step are (2, 3, 4), their mean is 3.
    norms = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]])
    assert detection_score(norms).tolist() == [3.0]


def test_classifier_free_guidance():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert classifier_free_guidance(u, c, 7.5).tolist() == [16.0, 13.0]
    assert classifier_free_guidance(u, c, 1.0).tolist() == c.tolist()


def test_epsilon_from_v_prediction_recovers_the_noise():
    x0, eps = torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0])
    a_bar = 0.64  # √ᾱ = 0.8, √(1−ᾱ) = 0.6
    x_t = 0.8 * x0 + 0.6 * eps
    v = 0.8 * eps - 0.6 * x0
    assert torch.allclose(epsilon_from_output(v, x_t, a_bar, "v_prediction"), eps)
    assert epsilon_from_output(eps, x_t, a_bar, "epsilon") is eps
    with pytest.raises(ValueError):
        epsilon_from_output(v, x_t, a_bar, "sample")


def test_initial_latents_follow_wen_et_al_seeding():
    shape = (4, 3, 3)
    lat = initial_latents([0, 5], 2, shape, gen_seed=10)
    assert lat.shape == (2, 2, *shape)
    torch.manual_seed(15)  # the reference's torch.manual_seed(i + gen_seed) for row 5
    assert torch.equal(lat[1], torch.randn((2, *shape)))
    # Row i's latents do not depend on which other rows are in the batch.
    assert torch.equal(initial_latents([5], 2, shape, gen_seed=10)[0], lat[1])
    shared = initial_latents([0, 5], 2, shape, gen_seed=10, mode="shared", init_noise_sigma=2.0)
    torch.manual_seed(10)
    ref = torch.randn((2, *shape)) * 2.0
    assert torch.equal(shared[0], ref) and torch.equal(shared[1], ref)
    assert not math.isclose(float(lat[0].sum()), float(lat[1].sum()))


def test_channel_cosine_is_over_channels_then_mean_over_pixels():
    # [1 sample, 2 channels, 1×2 pixels]: pixel 0 a=(1,0), b=(2,0) -> cos 1; pixel 1 a=(1,0), b=(0,3) -> cos 0.
    a = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])
    b = torch.tensor([[[[2.0, 0.0]], [[0.0, 3.0]]]])
    assert channel_cosine(a, b).tolist() == [0.5]
    # Against float64 per-pixel cosines; a cosine over the whole latent would be another number.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 2, 5, generator=g), torch.randn(3, 4, 2, 5, generator=g)
    ref = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).flatten(1).mean(dim=1)
    torch.testing.assert_close(channel_cosine(a, b).double(), ref, rtol=1e-6, atol=1e-7)
    flat = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    assert not torch.allclose(channel_cosine(a, b), flat, atol=1e-3)


def test_anisotropy_score_weights_generation_means():
    # N over G=2: mean 3; C: mean 0.25 -> 1·3 + 2·0.25 = 3.5; with (1, 0.1): 3.025.
    n, c = torch.tensor([[2.0, 4.0]]), torch.tensor([[0.5, 0.0]])
    assert anisotropy_score(n, c, 1.0, 2.0).tolist() == [3.5]
    assert anisotropy_score(n, c, 1.0, 0.1).item() == pytest.approx(3.025)


def test_score_from_epsilon():
    # ᾱ = 0.64: √(1−ᾱ) = 0.6, s = −ε/0.6.
    eps = torch.tensor([0.6, -1.2])
    torch.testing.assert_close(score_from_epsilon(eps, 0.64), torch.tensor([-1.0, 2.0]))
