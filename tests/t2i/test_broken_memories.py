"""Broken Memories (KDD 2026): the statistics, the detector's norms and the mitigation against hand-written loops on
the tiny pipeline (DDIM by its formula, the rule one trajectory at a time), and the calibration's binding."""

from __future__ import annotations

import math

import pytest
import torch

from diffmem.common.errors import ConfigError
from diffmem.common.t2i.broken_memories import (
    StabilityMonitor,
    StabilityRegion,
    calibrate,
    detection_score,
    flag,
    z_score,
)
from diffmem.common.t2i.detection import score_prompts
from diffmem.common.t2i.sampler import sample_latents
from diffmem.common.t2i.stability_calibration import STABILITY_NORMS, calibration_record, check_calibration

STEPS, SCALE = 6, 7.5
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")  # small models on shared cores
PROMPTS = ["a cat", "The No Limits Business Woman Podcast"]


def test_statistics_equal_loops_in_float64():
    g = torch.Generator().manual_seed(0)
    norms = {k: torch.rand(5, 4, generator=g, dtype=torch.float64) + 1 for k in STABILITY_NORMS}
    mean, std = calibrate(norms)
    for k in STABILITY_NORMS:
        for s in range(4):
            col = [norms[k][n, s].item() for n in range(5)]
            mu = sum(col) / 5
            assert mean[k][s].item() == pytest.approx(mu, rel=1e-12)
            assert std[k][s].item() == pytest.approx(math.sqrt(sum((v - mu) ** 2 for v in col) / 4), rel=1e-12)
    z_d = torch.tensor([[0.5, 4.0, 2.0, 20.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    z_0 = torch.tensor([[9.0, 3.5, 5.0, 2.0], [0.2, 0.1, 0.3, 0.4]], dtype=torch.float64)
    # max over steps of min(z_Δ, z_x̂₀): row 0 min = 0.5, 3.5, 2, 2 -> 3.5; row 1 -> 0.4
    assert detection_score(z_d, z_0).tolist() == [3.5, 0.4]
    first, kind = flag(z_d, z_0, tau_mild=3.0, tau_strong=14.0)
    assert first.tolist() == [1, -1] and kind.tolist() == [1, 0]
    first, kind = flag(z_d, z_0 * 5, tau_mild=3.0, tau_strong=14.0)  # z_x̂₀ 17.5 at the first flag: strong
    assert first.tolist() == [1, -1] and kind.tolist() == [2, 0]
    value, mu, sd = torch.tensor([3.0, -1.0]), torch.tensor(1.0), torch.tensor(0.5)
    assert z_score(value, mu, sd).tolist() == [4.0, 4.0]


def _hand_embeds(pipe):
    ids = pipe.tokenizer([*PROMPTS, ""], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _alphas(sched, t):
    a = sched.alphas_cumprod[int(t)]
    prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
    return a, (sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod)


def _hand_loop(pipe, x, cond, uncond, region=None, tau_mild=3.0, tau_strong=14.0, gamma=3.0, mild_steps=10):
    """The guided DDIM loop by its formula, recording ‖x_{k+1}‖, ‖x_{k+1} − x_k‖, ‖x̂₀‖ per trajectory and, given a
    region, applying the mitigation rule one trajectory at a time."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    N = x.shape[0]
    kind = [0] * N
    rec = {k: [[] for _ in range(N)] for k in STABILITY_NORMS}
    with torch.no_grad():
        for step, t in enumerate(sched.timesteps):
            e_c = pipe.unet(x, t, encoder_hidden_states=cond).sample
            e_u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
            eps = e_u + SCALE * (e_c - e_u)
            a, a_prev = _alphas(sched, t)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            new = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            for n in range(N):
                if region is not None:
                    mu = {k: region.mean[k][step].item() for k in STABILITY_NORMS}
                    sd = {k: region.std[k][step].item() for k in STABILITY_NORMS}
                    zd = abs((new[n] - x[n]).norm().item() - mu["delta_norm"]) / sd["delta_norm"]
                    z0 = abs(x0[n].norm().item() - mu["x0_norm"]) / sd["x0_norm"]
                    if kind[n] == 0 and zd > tau_mild and z0 > tau_mild:
                        kind[n] = 2 if z0 > tau_strong else 1
                    if zd > tau_mild and (kind[n] == 2 or (kind[n] == 1 and step < mild_steps)):
                        y = new[n] + a_prev.sqrt() * (x0[n] * (mu["x0_norm"] / x0[n].norm()) - x0[n])
                        if kind[n] == 2:
                            d = y - x[n]
                            lo = max(mu["delta_norm"] - gamma * sd["delta_norm"], 0.0)
                            d = d * (min(max(d.norm().item(), lo), mu["delta_norm"] + gamma * sd["delta_norm"])
                                     / d.norm())
                            y = x[n] + d
                        lo = max(mu["x_norm"] - gamma * sd["x_norm"], 0.0)
                        y = y * (min(max(y.norm().item(), lo), mu["x_norm"] + gamma * sd["x_norm"]) / y.norm())
                        new[n] = y
                rec["x_norm"][n].append(new[n].norm().item())
                rec["delta_norm"][n].append((new[n] - x[n]).norm().item())
                rec["x0_norm"][n].append(x0[n].norm().item())
            x = new
    return x, {k: torch.tensor(v) for k, v in rec.items()}, kind


def test_the_detector_norms_equal_a_hand_ddim_loop(tiny_pipe, tiny_parts):
    emb = _hand_embeds(tiny_pipe)
    terms, _ = score_prompts(tiny_parts, PROMPTS, [0, 1], num_images_per_prompt=2, num_inference_steps=STEPS,
                             detector="broken")
    assert torch.isnan(terms.score).all()  # no calibration: the norms alone (a calibration run's rows)
    for b in range(2):
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(b))
        _, ref, _ = _hand_loop(tiny_pipe, x, emb[b:b + 1].expand(2, -1, -1), emb[2:3].expand(2, -1, -1))
        for k in STABILITY_NORMS:
            torch.testing.assert_close(terms.norms[k][b], ref[k], rtol=1e-4, atol=1e-5)
    # With a region: z-scores of these norms, the score max_k min(z_Δ, z_x̂₀) averaged over generations.
    flat = {k: terms.norms[k].reshape(4, STEPS) for k in STABILITY_NORMS}
    mean, std = calibrate(flat)
    region = StabilityRegion({k: v for k, v in mean.items()}, {k: v * 0.01 for k, v in std.items()})
    scored, _ = score_prompts(tiny_parts, PROMPTS, [0, 1], num_images_per_prompt=2, num_inference_steps=STEPS,
                              detector="broken", region=region)
    for b in range(2):
        per_g = []
        for g in range(2):
            zs = [min(abs(flat["delta_norm"][2 * b + g, s] - mean["delta_norm"][s]) / (0.01 * std["delta_norm"][s]),
                      abs(flat["x0_norm"][2 * b + g, s] - mean["x0_norm"][s]) / (0.01 * std["x0_norm"][s]))
                  for s in range(STEPS)]
            per_g.append(max(zs).item())
        assert scored.score[b].item() == pytest.approx(sum(per_g) / 2, rel=1e-4)


def test_the_mitigation_equals_a_hand_loop(tiny_pipe, tiny_parts):
    emb = _hand_embeds(tiny_pipe)
    x_T = torch.randn((2, 2, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    # A region centred on other noise with a narrow std: every trajectory leaves it, strong or mild.
    other = torch.randn((4, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(99))
    _, ref_norms, _ = _hand_loop(tiny_pipe, other, emb[0:1].expand(4, -1, -1), emb[2:3].expand(4, -1, -1))
    mean, std = calibrate(ref_norms)
    for tau_strong, mild_steps in ((14.0, 10), (1e9, 2)):
        region = StabilityRegion(mean, {k: v * 0.05 for k, v in std.items()})
        monitor = StabilityMonitor(tiny_parts, STEPS, 4, region, mitigate=True, tau_strong=tau_strong,
                                   mild_steps=mild_steps)
        final = sample_latents(tiny_parts, emb[:2], emb[2:3], x_T, num_inference_steps=STEPS, guidance_scale=SCALE,
                               correction=monitor)
        ref_x, ref, kind = _hand_loop(tiny_pipe, x_T.reshape(4, 4, 8, 8), emb[:2].repeat_interleave(2, dim=0),
                                      emb[2:3].expand(4, -1, -1), region, tau_strong=tau_strong,
                                      mild_steps=mild_steps)
        assert monitor.kind.tolist() == kind and any(kind)
        assert monitor.active_steps.sum() > 0
        torch.testing.assert_close(final.reshape(4, 4, 8, 8), ref_x, rtol=1e-4, atol=1e-4)
        for k in STABILITY_NORMS:
            torch.testing.assert_close(monitor.traces()[k], ref[k], rtol=1e-4, atol=1e-4)
    unmitigated = sample_latents(tiny_parts, emb[:2], emb[2:3], x_T, num_inference_steps=STEPS, guidance_scale=SCALE)
    assert (unmitigated - final).abs().max() > 1e-3


def test_a_calibration_is_bound_to_its_settings():
    settings = {"model_id": "m", "dtype": "fp32", "scheduler": "ddim", "num_inference_steps": 3,
                "guidance_scale": 7.5, "height": None, "width": None}
    stats = {k: [1.0, 1.0, 1.0] for k in STABILITY_NORMS}
    record = calibration_record(settings, stats, stats, 4, 2, "abc")
    check_calibration(record, settings, "cal.json")
    with pytest.raises(ConfigError, match=r"cal.json was made with --guidance_scale 7.5, this run has 5.0"):
        check_calibration(record, {**settings, "guidance_scale": 5.0}, "cal.json")
    with pytest.raises(ConfigError, match=r"made with --model m, this run has other"):
        check_calibration(record, {**settings, "model_id": "other"}, "cal.json")
