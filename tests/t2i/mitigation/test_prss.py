"""PRSS (Chen et al., CVPR 2025) against a hand-written search and sampling loop on the tiny pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from mitigation_case import PROMPTS, ROWS, STEPS, G, W, method_settings

from diffmem.common.t2i.detection import encode_prompts
from diffmem.common.t2i.text_noise import initial_latents

PARAPHRASES = {PROMPTS[0]: ["Listen to the No Limits Business Woman Podcast.", "a", "podcast"]}

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def _settings(**kw):
    return method_settings("prss", **kw)


def _inputs(parts):
    emb = encode_prompts(parts, PROMPTS).embeds.embeds
    uncond = parts.unconditional().embeds
    lat = initial_latents(ROWS, G, parts.latent_shape, 11, init_noise_sigma=float(parts.scheduler.init_noise_sigma))
    return emb, uncond, lat


def _generate(parts, **kw):
    from diffmem.common.t2i.mitigation.methods import generate_batch

    emb, uncond, lat = _inputs(parts)
    return generate_batch(parts, emb, uncond, lat, ROWS, PROMPTS, _settings(**kw))


@pytest.fixture
def paraphrase_file(tmp_path):
    path = tmp_path / "para.jsonl"
    path.write_text("".join(json.dumps({"caption": c, "paraphrases": p}) + "\n" for c, p in PARAPHRASES.items()))
    return path


def _eps(parts, x, t, cond):
    with torch.no_grad():
        return parts.unet(x, t, encoder_hidden_states=cond).sample


def _candidates(parts, b, table):
    return [encode_prompts(parts, [p]).embeds.embeds for p in [PROMPTS[b], *table.get(PROMPTS[b], [])]]


def _magnitudes(parts, lat, table=PARAPHRASES):
    """m[n][j] = ‖ε(x_T, candidate j) − ε(x_T, ∅)‖ at the first step, one trajectory at a time."""
    s = parts.scheduler.__class__.from_config(parts.scheduler.config)
    s.set_timesteps(STEPS)
    t = s.timesteps[0]
    uncond = parts.unconditional().embeds
    flat = lat.flatten(0, 1)
    return [[float((_eps(parts, flat[n:n + 1], t, c) - _eps(parts, flat[n:n + 1], t, uncond)).norm())
             for c in _candidates(parts, n // G, table)] for n in range(flat.shape[0])]


def hand_prss(parts, lat, l_pr, thr, l_ss, table=PARAPHRASES):
    uncond = parts.unconditional().embeds
    mags = _magnitudes(parts, lat, table)
    out, picks = [], []
    for n, m in enumerate(mags):
        pick = next((j for j, v in enumerate(m) if v <= l_ss), min(range(len(m)), key=m.__getitem__))
        picks.append(pick)
        cands = _candidates(parts, n // G, table)
        mod, orig, trigger = cands[pick], cands[0], m[0] > l_ss
        s = parts.scheduler.__class__.from_config(parts.scheduler.config)
        s.set_timesteps(STEPS)
        x = lat.flatten(0, 1)[n:n + 1].clone()
        for t in s.timesteps:
            e_u, e_mod, e_orig = _eps(parts, x, t, uncond), _eps(parts, x, t, mod), _eps(parts, x, t, orig)
            mag = float((e_mod - e_u).norm())
            if trigger and mag > l_pr:
                a = (W * l_pr - thr) / (W - 1)
                sc = min((mag - a) / (thr - a) * W, W)
                guided = e_orig + sc * (e_mod - e_orig) + (W - sc) * (e_mod - e_u)
            else:
                guided = e_u + W * (e_mod - e_u)
            x = s.step(guided, t, x).prev_sample
        out.append(x[0])
    return torch.stack(out), picks, mags


def test_prss_search_and_reanchoring_against_a_hand_written_loop(tiny_parts, paraphrase_file):
    _, _, lat = _inputs(tiny_parts)
    mags = _magnitudes(tiny_parts, lat)
    # On the tiny model "a" (the second paraphrase) is below 0.3 and "podcast" (the third) lower still: the search
    # takes the first candidate at or below l_ss, not the smallest; prompt 1 has no paraphrase and stays itself.
    l_ss = 0.3
    assert mags[0][2] <= l_ss and mags[0][3] < mags[0][2] and min(mags[2]) > l_ss
    first = [m[0] for m in mags]
    l_pr, thr = min(first) * 0.5, max(first) * 1.5
    gen = _generate(tiny_parts, paraphrases=str(paraphrase_file), prss_l_pr=l_pr, prss_thr=thr, prss_l_ss=l_ss)
    want, picks, _ = hand_prss(tiny_parts, lat, l_pr, thr, l_ss)
    torch.testing.assert_close(gen.latents.flatten(0, 1), want, rtol=1e-4, atol=1e-4)
    got_picks = [c for d in gen.details for c in d["prss_choice"]]
    assert got_picks == picks == [2, 2, 0, 0]
    assert [d["prss_paraphrases"] for d in gen.details] == [3, 0]
    # cost: ε_u and each candidate tried at step 0, plus ε_orig on re-anchored steps of a paraphrased trajectory
    reanchored = [s for d in gen.details for s in d["prss_reanchored_steps"]]
    for n, extra in enumerate(e for r in gen.extra_unet_calls for e in r):
        tried = picks[n] + 1 if mags[n][picks[n]] <= l_ss else len(mags[n])
        assert extra == 1 + tried + (reanchored[n] if picks[n] > 0 else 0)
    assert sum(reanchored) > 0


def test_prss_without_paraphrases_is_reanchoring_alone(tiny_parts):
    _, _, lat = _inputs(tiny_parts)
    first = [m[0] for m in _magnitudes(tiny_parts, lat, {})]
    l_pr, thr = min(first) * 0.5, max(first) * 1.5
    gen = _generate(tiny_parts, prss_l_pr=l_pr, prss_thr=thr, prss_l_ss=1e-6)
    want, picks, _ = hand_prss(tiny_parts, lat, l_pr, thr, 1e-6, {})
    torch.testing.assert_close(gen.latents.flatten(0, 1), want, rtol=1e-4, atol=1e-4)
    assert picks == [0] * 4 and gen.extra_unet_calls == [[2] * G] * 2  # ε_u and the prompt at step 0, no ε_orig
    none = _generate(tiny_parts, prss_l_ss=1e9)  # the prompt is below l_ss: no trigger, plain CFG
    from diffmem.common.t2i.mitigation.methods import generate_batch
    from diffmem.common.t2i.mitigation.options import MitigationSettings

    emb, uncond, lat = _inputs(tiny_parts)
    cfg = generate_batch(tiny_parts, emb, uncond, lat, ROWS, PROMPTS, MitigationSettings(
        method="none", num_images_per_prompt=G, num_inference_steps=STEPS, guidance_scale=W, gen_seed=11))
    torch.testing.assert_close(none.latents, cfg.latents, rtol=0, atol=1e-6)
    assert sum(n for d in gen.details for n in d["prss_reanchored_steps"]) > 0
    assert not torch.allclose(gen.latents, cfg.latents, atol=1e-3)


def test_prss_scale_by_hand():
    from diffmem.common.t2i.mitigation.prss import prss_scale

    # their README's setting: s = 1 at m = l_pr, w at m = thr, capped at w
    got = prss_scale(torch.tensor([3.0, 5.0, 9.0]), 7.5, 3.0, 5.0)
    torch.testing.assert_close(got, torch.tensor([1.0, 7.5, 7.5]))


@pytest.mark.parametrize("line, reason", [
    ("not json", "2: not JSON"),
    ('{"text": "a"}', '2: expected an object with a "caption" string'),
    ('{"caption": "a", "paraphrases": "b"}', '2: "paraphrases" must be a list of non-empty strings'),
])
def test_bad_paraphrase_line_names_file_and_line(tmp_path, line, reason):
    from diffmem.common.errors import ConfigError
    from diffmem.common.t2i.mitigation.options import read_paraphrases

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"caption": "x", "caption1": "y"}) + "\n" + line + "\n")
    with pytest.raises(ConfigError) as err:
        read_paraphrases(str(path))
    assert str(err.value) == f"{path}:{reason}" or str(err.value).startswith(f"{path}:{reason}")
    path.write_text(json.dumps({"caption": " x ", "caption1": "y", "caption2": "z"}) + "\n")
    assert read_paraphrases(str(path)) == {"x": ["y", "z"]}  # their caption1..N layout
