"""Every mitigation of the harness on every family where it is defined (generations decode to finite images from the
same x_T), and the one-line reason where it is not."""

from __future__ import annotations

import json

import pytest
import torch
from broken_calibrations import write_broken_calibration

from diffmem.common.t2i.mitigation.methods import generate_batch
from diffmem.common.t2i.mitigation.options import METHODS, MitigationSettings, method_family_problem
from diffmem.common.t2i.mitigation.run import condition_batch
from diffmem.common.t2i.pipelines import denoiser_parts, load_pipeline
from diffmem.common.t2i.pipelines.tiny import TINY_FAMILIES

# What each family refuses (at the run's --guidance_scale: 1 for the schnell-like tiny Flux, 7.5 otherwise).
REFUSED = {"sd3": {"ren_attn", "guard", "clip_pad"}, "pixart": {"ren_attn", "guard", "clip_pad"},
           "flux": {"ren_attn", "jain_stp", "jain_dtp", "jain_og", "han_batch", "guard", "prss", "clip_pad"}}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_method_runs_or_is_refused_on_each_family(family_dirs, family, tmp_path):
    pipe = load_pipeline(str(family_dirs[family]))
    parts = denoiser_parts(pipe, **({"height": 16, "width": 16} if family == "flux" else {}))
    uncond = parts.unconditional()
    prompts, rows = ["a photo of a cat", "a red house"], [0, 1]
    for method in METHODS:
        settings = MitigationSettings(method=method, num_inference_steps=3, num_images_per_prompt=1, optim_iters=1,
                                      han_iters=1, guidance_scale=1.0 if family == "flux" else 7.5)
        if method == "broken":  # its calibration, made on this model at these settings
            settings.broken_calibration = write_broken_calibration(parts, tmp_path / "cal.json", 3,
                                                                   settings.guidance_scale)
        problem = method_family_problem(settings, parts.family)
        assert (problem is not None) == (method in REFUSED.get(family, set())), (method, problem)
        if problem is not None:
            assert "\n" not in problem and parts.family.label in problem or "guidance" in problem
            continue
        cond = condition_batch(parts, uncond, prompts, rows, settings)
        gen = generate_batch(parts, cond["embeds"], uncond, cond["latents"], rows, cond["prompts_used"], settings)
        images = parts.decode(gen.latents)
        assert images.shape == (2, 1, 3, 16, 16) and torch.isfinite(images).all(), method
        assert len(gen.first_step_norm) == 2 and all(n > 0 for n in gen.first_step_norm), method


@pytest.mark.parametrize("gating", ["none", "soft"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_guard_with_paraphrases_on_each_family_it_runs_on(family_dirs, family, tmp_path, gating):
    # SDXL's conditioning carries pooled embeddings and time ids: the paraphrases' rows must carry theirs.
    path = tmp_path / "paraphrases.jsonl"
    path.write_text(json.dumps({"caption": "a photo of a cat", "paraphrases": ["a cat, photographed", "cat photo"]})
                    + "\n")
    parts = denoiser_parts(load_pipeline(str(family_dirs[family])))
    uncond = parts.unconditional()
    prompts, rows = ["a photo of a cat", "a red house"], [0, 1]
    settings = MitigationSettings(method="guard", num_inference_steps=3, num_images_per_prompt=2,
                                  paraphrases=str(path), guard_neighbour_gating=gating)
    settings.validate()
    cond = condition_batch(parts, uncond, prompts, rows, settings)
    gen = generate_batch(parts, cond["embeds"], uncond, cond["latents"], rows, cond["prompts_used"], settings)
    assert torch.isfinite(parts.decode(gen.latents)).all()
    assert [d["guard_neighbours"] for d in gen.details] == [2, 0] and gen.extra_unet_calls == [[6, 6], [3, 3]]
    if gating == "soft":
        assert len(gen.details[0]["guard_neighbour_cosines"]) == 2
