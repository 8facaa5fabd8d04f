"""The CLIP padding fix (CVPR 2026 Findings) against a hand-built conditioning and a hand-written CFG loop."""

from __future__ import annotations

import pytest
import torch
from mitigation_case import PROMPTS, ROWS, STEPS, G, W, method_settings

from diffmem.common.t2i.detection import encode_prompts
from diffmem.common.t2i.text_noise import initial_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def _generate(parts, **kw):
    from diffmem.common.t2i.mitigation.methods import generate_batch

    emb = encode_prompts(parts, PROMPTS).embeds.embeds
    uncond = parts.unconditional().embeds
    lat = initial_latents(ROWS, G, parts.latent_shape, 11, init_noise_sigma=float(parts.scheduler.init_noise_sigma))
    return generate_batch(parts, emb, uncond, lat, ROWS, PROMPTS, method_settings("clip_pad", **kw)), lat


def _encode_ids(parts, ids):
    with torch.no_grad():
        return parts.text_encoder(torch.tensor([ids]))[0]


def _ids(parts, prompt, pad_id):
    """BOS, the prompt's tokens, the end token, then pad_id up to 77: written out, not through the tokenizer's
    padding."""
    ids = parts.tokenizer(prompt).input_ids
    return ids + [pad_id] * (77 - len(ids)), len(ids) - 1


def hand_cfg(parts, cond, uncond, lat):
    out = []
    flat = lat.flatten(0, 1)
    for n in range(flat.shape[0]):
        s = parts.scheduler.__class__.from_config(parts.scheduler.config)
        s.set_timesteps(STEPS)
        x = flat[n:n + 1].clone()
        for t in s.timesteps:
            with torch.no_grad():
                e_u = parts.unet(x, t, encoder_hidden_states=uncond).sample
                e_c = parts.unet(x, t, encoder_hidden_states=cond[n // G:n // G + 1]).sample
            x = s.step(e_u + W * (e_c - e_u), t, x).prev_sample
        out.append(x[0])
    return torch.stack(out)


def test_eot_mode_is_bang_padding_with_the_end_token_zeroed(tiny_parts):
    bang = tiny_parts.tokenizer.convert_tokens_to_ids("!")
    assert bang == 0 and tiny_parts.tokenizer.pad_token == "<|endoftext|>"  # SD 1.x pads with the end token
    rows = []
    for p in PROMPTS:
        ids, end = _ids(tiny_parts, p, bang)
        e = _encode_ids(tiny_parts, ids)
        e[:, end] = 0  # their "mask": the encoder's output row set to zero
        rows.append(e)
    uncond = _encode_ids(tiny_parts, _ids(tiny_parts, "", bang)[0])  # their pipeline re-encodes "" with "!" too
    gen, lat = _generate(tiny_parts)
    torch.testing.assert_close(gen.latents.flatten(0, 1), hand_cfg(tiny_parts, torch.cat(rows), uncond, lat),
                               rtol=1e-4, atol=1e-4)
    assert gen.extra_unet_calls == [[0] * G] * 2
    assert tiny_parts.tokenizer.pad_token == "<|endoftext|>"  # restored


@pytest.mark.parametrize("ratio", [0.7, 1.0])
def test_ratio_mode_zeroes_the_first_share_of_the_padding(tiny_parts, ratio):
    eos = tiny_parts.tokenizer.eos_token_id
    rows = []
    for p in PROMPTS:
        ids, end = _ids(tiny_parts, p, eos)
        e = _encode_ids(tiny_parts, ids)
        pads = 77 - (end + 1)
        count = int(min(pads, pads * ratio))
        e[:, end + 1:end + 1 + count] = 0
        assert count > 0 and (ratio < 1) == (end + 1 + count < 77)
        rows.append(e)
    uncond = _encode_ids(tiny_parts, _ids(tiny_parts, "", eos)[0])
    gen, lat = _generate(tiny_parts, clip_pad_mode="ratio", clip_pad_ratio=ratio)
    torch.testing.assert_close(gen.latents.flatten(0, 1), hand_cfg(tiny_parts, torch.cat(rows), uncond, lat),
                               rtol=1e-4, atol=1e-4)


def test_ratio_zero_is_none(tiny_parts):
    from diffmem.common.t2i.mitigation.methods import generate_batch

    gen, lat = _generate(tiny_parts, clip_pad_mode="ratio", clip_pad_ratio=0.0)
    emb = encode_prompts(tiny_parts, PROMPTS).embeds.embeds
    none = generate_batch(tiny_parts, emb, tiny_parts.unconditional().embeds, lat, ROWS, PROMPTS,
                          method_settings("none"))
    torch.testing.assert_close(gen.latents, none.latents, rtol=0, atol=0)
