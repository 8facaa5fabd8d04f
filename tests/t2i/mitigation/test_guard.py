"""GUARD (Zhao et al., ICML 2026) against a hand-written sampling loop on the tiny pipeline: three UNet calls per
trajectory and step, the spike attenuation written out head by head, the orthogonalisation and schedules by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from mitigation_case import PROMPTS, ROWS, STEPS, G, W, method_settings

from diffmem.common.t2i.detection import encode_prompts
from diffmem.common.t2i.text_noise import initial_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def _settings(**kw):
    return method_settings("guard", **kw)


def _generate(parts, **kw):
    from diffmem.common.t2i.mitigation.methods import generate_batch

    emb = encode_prompts(parts, PROMPTS).embeds.embeds
    uncond = parts.unconditional().embeds
    lat = initial_latents(ROWS, G, parts.latent_shape, 11, init_noise_sigma=float(parts.scheduler.init_noise_sigma))
    return generate_batch(parts, emb, uncond, lat, ROWS, PROMPTS, _settings(**kw)), emb, uncond, lat


class HandSpikeProcessor:
    """Cross-attention written out per row and head in float64, with the logits of spiking tokens times alpha."""

    def __init__(self, threshold, alpha):
        self.threshold, self.alpha = threshold, alpha

    def __call__(self, attn, hidden, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        enc = encoder_hidden_states
        b, q_len, _ = hidden.shape
        h = attn.heads
        q = attn.to_q(hidden).double().view(b, q_len, h, -1)
        k = attn.to_k(enc).double().view(b, enc.shape[1], h, -1)
        v = attn.to_v(enc).double().view(b, enc.shape[1], h, -1)
        out = torch.zeros(b, q_len, h, v.shape[-1], dtype=torch.float64)
        for row in range(b):
            for head in range(h):
                s = q[row, :, head] @ k[row, :, head].T / math.sqrt(q.shape[-1])  # [q, L]
                m = s.max(dim=0).values.tolist()
                content = m[1:]
                mu = sum(content) / len(content)
                sd = math.sqrt(sum((c - mu) ** 2 for c in content) / (len(content) - 1))
                for j in range(1, len(m)):
                    if (m[j] - mu) / (sd + 1e-6) > self.threshold:
                        s[:, j] = s[:, j] * self.alpha
                out[row, :, head] = torch.softmax(s, dim=-1) @ v[row, :, head]
        return attn.to_out[0](out.reshape(b, q_len, -1).to(hidden.dtype))


def _eps(parts, x, t, cond, processor=None):
    unet = parts.unet
    original = unet.attn_processors
    if processor is not None:
        unet.set_attn_processor({n: processor if ".attn2." in n and n.startswith(("down_blocks", "mid_block")) else p
                                 for n, p in original.items()})
    try:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=cond).sample
    finally:
        unet.set_attn_processor(original)


def hand_guard(parts, emb, uncond, lat, r0, alpha, tau, orthogonalize=True, in_basin=lambda step: True,
               neighbours=None):
    """neighbours: prompt index -> its paraphrases' embeddings [k, L, H], or (embeddings, weights [k]): then
    v⁺ = Σ w_j(ε_j − ε_u)/max(Σ w_j, 1e-8) over their ordinary predictions (GUARD's neighbour variant; the mean
    without weights), else ε⁺ is the prompt's own, attenuated."""
    out = []
    flat = lat.flatten(0, 1)
    for n in range(flat.shape[0]):
        s = parts.scheduler.__class__.from_config(parts.scheduler.config)
        s.set_timesteps(STEPS)
        x = flat[n:n + 1].clone()
        c = emb[n // G:n // G + 1]
        for step, t in enumerate(s.timesteps):
            e_u = _eps(parts, x, t, uncond)
            e_neg = _eps(parts, x, t, c)
            listed = (neighbours or {}).get(n // G)
            if listed is None:
                e_pos = _eps(parts, x, t, c, HandSpikeProcessor(tau, alpha))
            else:
                embeds, weights = listed if isinstance(listed, tuple) else (listed, [1.0] * len(listed))
                v = sum(w * (_eps(parts, x, t, embeds[j:j + 1]) - e_u) for j, w in enumerate(weights) if w)
                e_pos = e_u + v / max(sum(weights), 1e-8)
            v_pos, v_neg = (e_pos - e_u).flatten(), (e_neg - e_u).flatten()
            if orthogonalize:
                dot = float(v_pos @ v_neg)
                cos = dot / (math.sqrt(float(v_pos @ v_pos) + 1e-8) * math.sqrt(float(v_neg @ v_neg) + 1e-8))
                if cos > 0.9:
                    v_pos = v_pos - max(-2.0, min(2.0, dot / (float(v_neg @ v_neg) + 1e-8))) * v_neg
            r = r0 * math.cos(step / STEPS * math.pi / 2) if in_basin(step) else 0.0
            guided = e_u + W * v_pos.view_as(e_u) - r * v_neg.view_as(e_u)
            x = s.step(guided, t, x).prev_sample
        out.append(x[0])
    return torch.stack(out)


def test_spike_attenuation_against_a_loop():
    from diffmem.common.t2i.mitigation.guard import spike_attenuation

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 9)
    logits[0, 1, 2, 4] = 6.0  # a spike on token 4 in one head
    logits[1, 0, :, 0] = 9.0  # BOS never counts
    got = spike_attenuation(logits, 0.1, 0.3)
    for b in range(2):
        for h in range(3):
            m = logits[b, h].max(dim=0).values
            z = (m - m[1:].mean()) / (m[1:].std() + 1e-6)
            for j in range(9):
                factor = 0.3 if j > 0 and z[j] > 0.1 else 1.0
                torch.testing.assert_close(got[b, h, :, j], logits[b, h, :, j] * factor)
    assert torch.equal(got[1, 0, :, 0], logits[1, 0, :, 0])
    assert got[0, 1, 2, 4] == pytest.approx(1.8)


@pytest.mark.parametrize("ortho", ["on", "off"])
def test_guard_against_a_hand_written_loop(tiny_parts, ortho):
    gen, emb, uncond, lat = _generate(tiny_parts, guard_orthogonalize=ortho)
    want = hand_guard(tiny_parts, emb, uncond, lat, 2.0, 0.3, 0.1, orthogonalize=ortho == "on")
    torch.testing.assert_close(gen.latents.flatten(0, 1), want, rtol=1e-4, atol=1e-4)
    assert gen.extra_unet_calls == [[STEPS] * G] * 2  # 2 + k = 3 calls per step, one more than CFG
    assert [d["guard_steps_out_of_basin"] for d in gen.details] == [0, 0]  # beta 0: the tracker never fires


def test_guard_with_paraphrases_attracts_to_their_mean_and_keeps_the_prompt_without(tiny_parts, tmp_path):
    paraphrases = ["a podcast for business women without limits", "the limitless businesswoman podcast"]
    path = tmp_path / "paraphrases.jsonl"
    path.write_text(json.dumps({"caption": PROMPTS[0], "paraphrases": paraphrases}) + "\n")  # none for PROMPTS[1]
    gen, emb, uncond, lat = _generate(tiny_parts, paraphrases=str(path))
    listed = encode_prompts(tiny_parts, paraphrases).embeds.embeds
    want = hand_guard(tiny_parts, emb, uncond, lat, 2.0, 0.3, 0.1, neighbours={0: listed})
    torch.testing.assert_close(gen.latents.flatten(0, 1), want, rtol=1e-4, atol=1e-4)
    assert gen.extra_unet_calls == [[2 * STEPS] * G, [STEPS] * G]  # 2 + k calls per step: k = 2, then 1
    assert [d["guard_neighbours"] for d in gen.details] == [2, 0]
    plain, *_ = _generate(tiny_parts)
    assert not torch.allclose(plain.latents[0], gen.latents[0])  # the paraphrases changed prompt 0's images
    torch.testing.assert_close(plain.latents[1], gen.latents[1])  # and not prompt 1's


def test_guard_paraphrases_refuse_the_basin_tracker_and_bind_the_file(tmp_path):
    from diffmem.common.errors import ConfigError

    path = tmp_path / "paraphrases.jsonl"
    path.write_text(json.dumps({"caption": PROMPTS[0], "paraphrases": ["another caption"]}) + "\n")
    with pytest.raises(ConfigError, match="--guard_basin_beta > 0 needs the attenuated"):
        _settings(paraphrases=str(path), guard_basin_beta=0.5).validate()
    (tmp_path / "bad.jsonl").write_text('{"caption": "x", "paraphrases": [3]}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1: "):
        _settings(paraphrases=str(tmp_path / "bad.jsonl")).validate()
    with pytest.raises(ConfigError, match="--guard_neighbour_gating soft weighs paraphrases: it needs"):
        _settings(guard_neighbour_gating="soft").validate()
    with pytest.raises(ConfigError, match="--guard_gating_threshold is a cosine"):
        _settings(paraphrases=str(path), guard_neighbour_gating="hard", guard_gating_threshold=1.5).validate()
    with pytest.raises(ConfigError, match="--guard_gating_sigma must be > 0"):
        _settings(paraphrases=str(path), guard_neighbour_gating="soft", guard_gating_sigma=0).validate()
    # runs from before the neighbour variant still resume: its settings are recorded only when used
    assert not {"paraphrases", "guard_neighbour_gating", "guard_gating_threshold"} & set(_settings().fingerprint())
    assert _settings(paraphrases=str(path), guard_neighbour_gating="soft").fingerprint()["guard_gating_sigma"] == 0.5
    assert len(_settings(paraphrases=str(path)).fingerprint()["paraphrases_sha256"]) == 64


def hand_cosines(tokenizer, listed, listed_embeds, prompt, prompt_embeds):
    """Their pooling written out: the mean over the positions whose token is not the pad token, then the cosine."""
    def pooled(text, embeds):
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        kept = [embeds[i].double() for i, tok in enumerate(ids) if tok != tokenizer.pad_token_id]
        return sum(kept) / len(kept)

    p = pooled(prompt, prompt_embeds[0])
    out = []
    for j, text in enumerate(listed):
        q = pooled(text, listed_embeds[j])
        out.append(float(q @ p) / math.sqrt(float(q @ q) * float(p @ p)))
    return out


@pytest.mark.parametrize("gating", ["soft", "hard"])
def test_guard_neighbour_gating_against_a_hand_written_loop(tiny_parts, tmp_path, gating):
    from diffmem.common.t2i.mitigation.guard import neighbour_weights

    paraphrases = ["a podcast for business women without limits", "a photo of a dog in the snow"]
    path = tmp_path / "paraphrases.jsonl"
    path.write_text(json.dumps({"caption": PROMPTS[0], "paraphrases": paraphrases}) + "\n")
    listed = encode_prompts(tiny_parts, paraphrases).embeds.embeds
    emb = encode_prompts(tiny_parts, PROMPTS).embeds.embeds
    cos = hand_cosines(tiny_parts.tokenizer, paraphrases, listed, PROMPTS[0], emb[:1])
    # a threshold between the two cosines: hard keeps one paraphrase, soft weighs the other down
    threshold = sum(cos) / 2
    weights = [math.exp(-(max(0.0, threshold - c) / 0.5) ** 2) for c in cos] if gating == "soft" else \
        [float(c >= threshold) for c in cos]
    assert sorted(weights)[0] < 1 and max(weights) == 1
    torch.testing.assert_close(neighbour_weights(torch.tensor(cos), gating, threshold, 0.5),
                               torch.tensor(weights))
    gen, emb, uncond, lat = _generate(tiny_parts, paraphrases=str(path), guard_neighbour_gating=gating,
                                      guard_gating_threshold=threshold)
    assert gen.details[0]["guard_neighbour_cosines"] == pytest.approx(cos, abs=1e-5)
    want = hand_guard(tiny_parts, emb, uncond, lat, 2.0, 0.3, 0.1, neighbours={0: (listed, weights)})
    torch.testing.assert_close(gen.latents.flatten(0, 1), want, rtol=1e-4, atol=1e-4)
    k = 1 if gating == "hard" else 2  # hard gating evaluates only the kept paraphrase
    assert gen.details[0]["guard_neighbours"] == k and gen.extra_unet_calls[0] == [k * STEPS] * G


def test_guard_hard_gating_that_keeps_nothing_drops_the_attraction(tiny_parts, tmp_path):
    path = tmp_path / "paraphrases.jsonl"
    path.write_text(json.dumps({"caption": PROMPTS[0], "paraphrases": ["a photo of a dog in the snow"]}) + "\n")
    gen, emb, uncond, lat = _generate(tiny_parts, paraphrases=str(path), guard_neighbour_gating="hard",
                                      guard_gating_threshold=1.0)
    listed = encode_prompts(tiny_parts, ["a photo of a dog in the snow"]).embeds.embeds
    want = hand_guard(tiny_parts, emb, uncond, lat, 2.0, 0.3, 0.1, neighbours={0: (listed, [0.0])})
    torch.testing.assert_close(gen.latents.flatten(0, 1), want, rtol=1e-4, atol=1e-4)
    assert gen.details[0]["guard_neighbours"] == 0 and gen.extra_unet_calls[0] == [0] * G  # CFG's two calls


def test_guard_tracker_out_of_the_basin_drops_the_repulsion(tiny_parts):
    # every step is one of the tracker's first five, so A_t <= max(A_0..A_t) and beta = 1 is "left" at each step
    gen, emb, uncond, lat = _generate(tiny_parts, guard_basin_beta=1.0, guard_spike_scale=0.5,
                                      guard_spike_threshold=1.0)
    want = hand_guard(tiny_parts, emb, uncond, lat, 2.0, 0.5, 1.0, in_basin=lambda step: False)
    torch.testing.assert_close(gen.latents.flatten(0, 1), want, rtol=1e-4, atol=1e-4)
    assert [d["guard_steps_out_of_basin"] for d in gen.details] == [STEPS, STEPS]


def test_end_token_mass_by_hand():
    from diffmem.common.t2i.mitigation.guard import EndTokenMass

    rows, end = torch.tensor([2, 3]), torch.tensor([1, 2])  # two attenuated rows, one prompt of G = 2
    tracker = EndTokenMass(rows, end, 2, beta=0.5)
    seen = []
    for step, p in enumerate([0.6, 0.2, 0.4]):
        probs = torch.full((4, 1, 2, 4), (1 - p) / 3)
        probs[2, :, :, 1] = p
        probs[3, :, :, 2] = p
        probs[0, :, :, 1] = 0.99  # an unattenuated row is not read
        tracker.record(probs)
        tracker.record(probs)  # a second layer with the same mass
        seen.append(bool(tracker.end_step(step)))
    assert [float(h) for h in tracker.history] == pytest.approx([0.6, 0.2, 0.4])
    assert seen == [True, False, True]  # 0.2 / 0.6 <= 0.5 < 0.4 / 0.6


def test_guard_orthogonalize_and_schedules_by_hand():
    from diffmem.common.t2i.mitigation.guard import guard_orthogonalize, guard_schedule

    n = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(guard_orthogonalize(torch.tensor([[3.0, 0.1]]), n), torch.tensor([[1.0, 0.1]]))
    torch.testing.assert_close(guard_orthogonalize(torch.tensor([[1.0, 1.0]]), n), torch.tensor([[1.0, 1.0]]))
    assert guard_schedule("cosine", 0.5) == pytest.approx(math.sqrt(0.5))
    assert guard_schedule("none", 0.7) == 1.0 and guard_schedule("linear", 0.25) == 0.75
