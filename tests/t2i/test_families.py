"""The family room (common/t2i/pipelines): each family loads as its own class, encodes its unconditional branch as
its pipeline does, scores the metric that a direct computation written here gives, and ``--method none`` equals the
family's own diffusers pipeline called with the same latents; rectified flow's identities hold in float64."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmem.common.t2i.detection import score_prompts
from diffmem.common.t2i.pipelines import (
    FAMILIES,
    FamilyError,
    ModelLoadError,
    check_pipeline_folder,
    denoiser_parts,
    load_pipeline,
)
from diffmem.common.t2i.pipelines.tiny import FAMILY_CLASSES, TINY_FAMILIES
from diffmem.common.t2i.rectified_flow import (
    flow_epsilon,
    flow_sample,
    flow_score,
    flow_score_difference,
    flow_target,
    flow_x0,
)
from diffmem.common.t2i.sampler import sample_latents
from diffmem.common.t2i.text_noise import initial_latents

SIZE = {"flux": dict(height=16, width=16)}
PROMPTS = ["a photo of a cat", "a red house near a tree"]


@pytest.fixture(scope="module")
def pipes(family_dirs):
    return {f: load_pipeline(str(family_dirs[f])) for f in TINY_FAMILIES}


def test_rectified_flow_identities_in_float64():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 4, 2, 2, generator=g,
                                                                                     dtype=torch.float64)
    for sigma in (1.0, 0.7, 0.05):
        x = flow_sample(x0, eps, sigma)
        v = flow_target(x0, eps)
        assert torch.allclose(flow_x0(x, v, sigma), x0) and torch.allclose(flow_epsilon(x, v, sigma), eps)
        # the score of N((1−σ)x₀, σ²I) at x, by hand
        assert torch.allclose(flow_score(x, v, sigma), -(x - (1 - sigma) * x0) / sigma**2)
    v_c, v_u = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g,
                                                                                dtype=torch.float64)
    x = torch.randn(2, 5, generator=g, dtype=torch.float64)
    for sigma in (1.0, 0.3):
        direct = flow_score(x, v_c, sigma) - flow_score(x, v_u, sigma)
        assert torch.allclose(flow_score_difference(v_c, v_u, sigma), direct)
    # Wen et al.'s ε difference is blind at σ = 1; the velocity difference is not
    assert torch.equal(flow_epsilon(x, v_c, 1.0) - flow_epsilon(x, v_u, 1.0), torch.zeros_like(x))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_each_family_loads_as_its_class_and_family(pipes, family_dirs, family):
    assert type(pipes[family]).__name__ == FAMILY_CLASSES[family]
    assert check_pipeline_folder(family_dirs[family], "m") is FAMILIES[family]
    parts = denoiser_parts(pipes[family], **SIZE.get(family, {}))
    assert parts.family.key == family
    expected = "FlowMatchEulerDiscreteScheduler" if parts.family.flow else "DDIMScheduler"
    assert type(parts.scheduler).__name__ == expected  # the family's default scheduler


def _direct_first_step_norms(family: str, pipe, prompts, latents, parts) -> torch.Tensor:
    """‖out(x_T, c) − out(x_T, ∅)‖ at the first timestep, written out with each family's own diffusers calls."""
    sched = parts.timesteps_scheduler(4)
    t = sched.timesteps[0]
    G = latents.shape[1]
    norms = []
    for b, prompt in enumerate(prompts):
        x = latents[b] * getattr(sched, "init_noise_sigma", 1.0)
        if family == "sd":
            ids = pipe.tokenizer([prompt, ""], padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            emb = pipe.text_encoder(ids)[0]
            out = [pipe.unet(x, t, encoder_hidden_states=e[None].expand(G, -1, -1)).sample for e in emb]
        elif family == "sdxl":
            pe, ne, pp, npool = pipe.encode_prompt(prompt, do_classifier_free_guidance=True)
            assert not ne.any() and not npool.any()  # force_zeros_for_empty_prompt: the unconditional is zeros
            ids = torch.tensor([[16, 16, 0, 0, 16, 16]], dtype=torch.float32).expand(G, -1)
            out = [pipe.unet(x, t, encoder_hidden_states=e.expand(G, -1, -1),
                             added_cond_kwargs={"text_embeds": p.expand(G, -1), "time_ids": ids}).sample
                   for e, p in ((pe, pp), (ne, npool))]
        elif family == "sd3":
            pe, ne, pp, npool = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=True)
            out = [pipe.transformer(hidden_states=x, timestep=t.expand(G), encoder_hidden_states=e.expand(G, -1, -1),
                                    pooled_projections=p.expand(G, -1)).sample for e, p in ((pe, pp), (ne, npool))]
        elif family == "flux":
            enc = [pipe.encode_prompt(p, None) for p in (prompt, "")]
            c, h, w = x.shape[1:]
            packed = pipe._pack_latents(x, G, c, h, w)
            img_ids = pipe._prepare_latent_image_ids(G, h // 2, w // 2, x.device, x.dtype)
            out = [pipe._unpack_latents(pipe.transformer(
                hidden_states=packed, timestep=t.expand(G) / 1000, guidance=None, pooled_projections=p.expand(G, -1),
                encoder_hidden_states=e.expand(G, -1, -1), txt_ids=ids, img_ids=img_ids).sample, 16, 16,
                pipe.vae_scale_factor) for e, p, ids in enc]
        else:  # pixart: the first C of 2C output channels
            pe, pm, ne, nm = pipe.encode_prompt(prompt, negative_prompt="", clean_caption=False)
            out = [pipe.transformer(x, encoder_hidden_states=e.expand(G, -1, -1),
                                    encoder_attention_mask=m.expand(G, -1), timestep=t.expand(G),
                                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
                   for e, m in ((pe, pm), (ne, nm))]
        norms.append((out[0] - out[1]).flatten(1).norm(dim=1).mean())
    return torch.stack(norms)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@torch.no_grad()
def test_first_step_metric_equals_a_direct_computation(pipes, family):
    pipe = pipes[family]
    parts = denoiser_parts(pipe, **SIZE.get(family, {}))
    terms, truncated = score_prompts(parts, PROMPTS, [0, 1], num_images_per_prompt=2, num_inference_steps=4)
    latents = initial_latents([0, 1], 2, parts.latent_shape, 0)
    direct = _direct_first_step_norms(family, pipe, PROMPTS, latents, parts)
    assert torch.allclose(terms.score, direct, rtol=1e-4, atol=1e-6), (terms.score, direct)
    assert truncated == [False, False] and (terms.score > 0).all()


@pytest.mark.parametrize("family", TINY_FAMILIES)
@torch.no_grad()
def test_method_none_images_equal_the_family_pipeline(pipes, family):
    pipe = pipes[family]
    parts = denoiser_parts(pipe, "pipeline", **SIZE.get(family, {}))
    steps, scale, G = 3, 4.0, 2
    latents = initial_latents([3], G, parts.latent_shape, 7)  # x_T of row 3, seed 7, unscaled
    ours = parts.decode(sample_latents(parts, parts.encode(PROMPTS[:1]).embeds, parts.unconditional(),
                                       latents * parts.init_noise_sigma(steps), num_inference_steps=steps,
                                       guidance_scale=scale))[0]
    kwargs = dict(parts.family.pipeline_kwargs(), num_inference_steps=steps, num_images_per_prompt=G,
                  output_type="np", latents=parts.family.pipeline_latents(latents[0]))
    if family == "flux":  # real CFG against the empty prompt; no distilled guidance in this (schnell-like) model
        kwargs.update(true_cfg_scale=scale, negative_prompt="")
    else:
        kwargs.update(guidance_scale=scale)
    theirs = torch.from_numpy(np.asarray(pipe(PROMPTS[0], **kwargs).images)).permute(0, 3, 1, 2)
    assert torch.allclose(ours, theirs, atol=2e-5), (ours - theirs).abs().max()


def test_the_flow_families_refuse_ddim_and_anisotropy_without_weights(pipes):
    with pytest.raises(FamilyError, match="--scheduler ddim: not defined for SD3/SD3.5"):
        denoiser_parts(pipes["sd3"], "ddim")
    parts = denoiser_parts(pipes["flux"], **SIZE["flux"])
    with pytest.raises(FamilyError, match="pass --anisotropy_weights"):
        score_prompts(parts, PROMPTS, [0, 1], num_images_per_prompt=1, num_inference_steps=4, detector="anisotropy")
    terms, _ = score_prompts(parts, PROMPTS, [0, 1], num_images_per_prompt=1, num_inference_steps=4,
                             detector="anisotropy", anisotropy_weights=(1.0, 0.5))
    assert torch.isfinite(terms.score).all()


def test_an_unknown_pipeline_class_and_a_transformer_unet_id_are_one_line(tmp_path, family_dirs):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelLoadError, match="a KandinskyPipeline pipeline; the text-to-image arm speaks"):
        check_pipeline_folder(tmp_path, str(tmp_path))
    with pytest.raises(ModelLoadError, match="--unet_id .*: SD3/SD3.5 has no UNet"):
        load_pipeline(str(family_dirs["sd3"]), unet_id=str(family_dirs["sd"]))
    with pytest.raises(ModelLoadError, match="SDXL-style.* load it as the SDXL pipeline"):
        load_pipeline(str(family_dirs["sd"]), unet_id=str(family_dirs["sdxl"]))


def test_build_tiny_writes_a_pipeline_the_loader_reads(tmp_path, capsys):
    from diffmem.data import build_tiny

    assert build_tiny.FAMILY_CHOICES == TINY_FAMILIES
    assert build_tiny.main(["--family", "pixart", "--out", str(tmp_path / "p")]) == 0
    assert type(load_pipeline(str(tmp_path / "p"))).__name__ == "PixArtSigmaPipeline"
    assert build_tiny.main(["--family", "pixart", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.strip().endswith("already exists (pass --overwrite to replace it)")
