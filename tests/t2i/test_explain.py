"""Token-wise significance: the math by hand, the gradient against finite differences, batch invariance,
a planted dominant token, and the CLI end to end."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import run_cli, run_in_process

from diffmem.common.t2i.detection import encode_prompts, iter_text_noise_objective, text_noise_objective
from diffmem.common.t2i.explain import (
    conditioning_leaf,
    display_token,
    explain_prompts,
    generation_mean_objective,
    normalize_scores,
    step_gradients,
    token_kinds,
    token_significance,
    tokenize,
)
from diffmem.common.t2i.text_noise import initial_latents

PROMPTS = ["a photo of a castle at night", "emma watson as belle in beauty and the beast",
           "an oil painting of a quiet harbor"]
FAST = dict(num_images_per_prompt=2, num_inference_steps=10)


# ---------------------------------------------------------------------------------------------------------
# Pure functions against values worked out by hand
# ---------------------------------------------------------------------------------------------------------

def test_token_significance_is_channel_norm_averaged_over_steps():
    g = torch.zeros(2, 1, 2, 2)  # [T, B, L, D]
    g[0, 0, 0] = torch.tensor([3.0, 4.0])  # norm 5
    g[1, 0, 0] = torch.tensor([0.0, 1.0])  # norm 1
    g[0, 0, 1] = torch.tensor([-6.0, 8.0])  # norm 10
    g[1, 0, 1] = torch.tensor([0.0, 0.0])
    assert token_significance(g).tolist() == [[3.0, 5.0]]


def test_generation_mean_objective_averages_generations_only():
    norms = torch.tensor([[[1.0, 10.0], [3.0, 20.0]]])  # [B=1, G=2, T=2]
    assert generation_mean_objective(norms).tolist() == [[2.0, 15.0]]


def test_normalize_scores_by_largest_content_token():
    scores = torch.tensor([[8.0, 2.0, 4.0, 6.0], [1.0, 3.0, 2.0, 1.0]])
    content = torch.tensor([[False, True, True, False], [False, False, False, False]])
    out = normalize_scores(scores, content)
    # Row 0: content max is 4 (the BOS-like 8 does not count, and lands at 2); row 1 has no content: max 3.
    assert out.tolist() == [[2.0, 0.5, 1.0, 1.5], [pytest.approx(1 / 3), 1.0, pytest.approx(2 / 3),
                                                   pytest.approx(1 / 3)]]


def test_token_kinds_split_bos_content_eos_padding():
    assert token_kinds([49406, 320, 1125, 49407, 49407, 49407], [1, 1, 1, 1, 0, 0], 49406, 49407) == [
        "bos", "token", "token", "eos", "pad", "pad"]
    # A pad token other than EOS (SD 2 pads with "!") is told apart by the mask as well.
    assert token_kinds([49406, 320, 49407, 0, 0], [1, 1, 1, 0, 0], 49406, 49407) == [
        "bos", "token", "eos", "pad", "pad"]


def test_display_token_decodes_bpe():
    assert display_token("castle</w>") == "castle "
    assert display_token("cast") == "cast"
    assert display_token("cafÃ©</w>") == "café "  # byte-level symbols of 'é'


def test_cli_and_library_agree_on_choices():
    from diffmem.common.t2i.explain import WRT_CHOICES
    from diffmem.detect.explain_tokens import WRT_CHOICES as CLI_CHOICES
    from diffmem.detect.explain_tokens import parse_target_steps

    assert CLI_CHOICES == WRT_CHOICES
    assert parse_target_steps("0", 50) == [0]
    assert parse_target_steps("0-3,7, 2", 50) == [0, 1, 2, 3, 7]
    assert parse_target_steps("all", 4) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parts64(tiny_parts):
    """The tiny model in float64 (a copy), so finite differences are limited by fp32 norms only."""
    parts = copy.copy(tiny_parts)
    parts.unet = copy.deepcopy(tiny_parts.unet).double()
    parts.text_encoder = copy.deepcopy(tiny_parts.text_encoder).double()
    return parts


@pytest.mark.parametrize("wrt,h", [("prompt_embeds", 1e-2), ("token_embeds", 1e-3)])
def test_gradient_matches_central_difference(parts64, wrt, h):
    tokens = tokenize(parts64, PROMPTS[:2])
    latents = initial_latents([0, 1], 2, parts64.latent_shape, 0, "per_prompt", 1.0)
    uncond = encode_prompts(parts64, [""]).embeds.embeds
    kw = dict(num_inference_steps=10, target_steps=[0], guidance_scale=7.5)
    leaf, prompt_embeds = conditioning_leaf(parts64, tokens, wrt)
    [(_, objective, grad)] = list(step_gradients(parts64, leaf, prompt_embeds, uncond, latents, **kw))
    layer = parts64.text_encoder.get_input_embeddings()

    def objective_at(x):
        with torch.no_grad():
            if wrt == "prompt_embeds":
                embeds = x
            else:
                handle = layer.register_forward_hook(lambda m, a, out: x.to(out.dtype))
                embeds = parts64.text_encoder(tokens.input_ids)[0]
                handle.remove()
            return generation_mean_objective(text_noise_objective(parts64, embeds, uncond, latents, **kw))[:, 0]

    assert torch.allclose(objective_at(leaf.detach()), objective, atol=1e-6)
    scale = grad.abs().max()
    for b, k, d in [(0, 1, 0), (0, 5, 7), (1, 3, 17), (1, 0, 3), (1, 12, 31)]:
        plus, minus = leaf.detach().clone(), leaf.detach().clone()
        plus[b, k, d] += h
        minus[b, k, d] -= h
        diff = (objective_at(plus) - objective_at(minus)) / (2 * h)
        assert diff[1 - b] == 0  # the other prompt's L does not see this coordinate
        assert abs(diff[b] - grad[b, k, d]) <= 0.01 * scale, (b, k, d, float(diff[b]), float(grad[b, k, d]))


def test_unconditional_embedding_gets_no_gradient(tiny_parts):
    tokens = tokenize(tiny_parts, PROMPTS[:2])
    latents = initial_latents([0, 1], 2, tiny_parts.latent_shape, 0, "per_prompt", 1.0)
    uncond = encode_prompts(tiny_parts, [""]).embeds.embeds.clone().requires_grad_(True)
    leaf, prompt_embeds = conditioning_leaf(tiny_parts, tokens, "prompt_embeds")
    for _, norms in iter_text_noise_objective(tiny_parts, prompt_embeds, uncond, latents, num_inference_steps=10,
                                              target_steps=[0, 2], guidance_scale=7.5):
        g_cond, g_uncond = torch.autograd.grad(generation_mean_objective(norms).sum(), [leaf, uncond],
                                               allow_unused=True)
        assert g_uncond is None or not g_uncond.any()
        assert g_cond.abs().sum() > 0


def test_token_embeds_leaf_reproduces_prompt_embeds(tiny_parts):
    tokens = tokenize(tiny_parts, PROMPTS)
    _, embeds = conditioning_leaf(tiny_parts, tokens, "token_embeds")
    assert torch.allclose(embeds, encode_prompts(tiny_parts, PROMPTS).embeds.embeds, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Batches, steps, and the anchor's bug
# ---------------------------------------------------------------------------------------------------------

def test_scores_do_not_depend_on_batch_order_or_size(tiny_parts):
    kw = dict(FAST, target_steps=[0, 1])
    batched = {r.row: r for r in explain_prompts(tiny_parts, PROMPTS, [0, 1, 2], **kw)}
    order = [2, 0, 1]
    permuted = {r.row: r for r in explain_prompts(tiny_parts, [PROMPTS[i] for i in order], order, **kw)}
    single = {i: explain_prompts(tiny_parts, [PROMPTS[i]], [i], **kw)[0] for i in (1,)}
    for row, r in batched.items():
        assert r.prompt == PROMPTS[row] == permuted[row].prompt
        np.testing.assert_allclose(permuted[row].scores, r.scores, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(permuted[row].objective, r.objective, rtol=1e-5)
    np.testing.assert_allclose(single[1].scores, batched[1].scores, rtol=1e-4, atol=1e-7)
    # The anchor's bug (gradient through the unconditional row) gives every prompt the same profile.
    profiles = [np.array(batched[i].scores) for i in range(3)]
    assert min(np.abs(a - b).max() / a.max() for a in profiles for b in profiles if a is not b) > 0.05


def test_multi_step_scores_average_single_step_scores(tiny_parts):
    both = explain_prompts(tiny_parts, PROMPTS[:2], [0, 1], **FAST, target_steps=[0, 3])
    first = explain_prompts(tiny_parts, PROMPTS[:2], [0, 1], **FAST, target_steps=[0])
    fourth = explain_prompts(tiny_parts, PROMPTS[:2], [0, 1], **FAST, target_steps=[3])
    for b, f, s in zip(both, first, fourth):
        np.testing.assert_allclose(b.scores, (np.array(f.scores) + np.array(s.scores)) / 2, rtol=1e-4, atol=1e-7)
        assert b.objective == pytest.approx(f.objective + s.objective, rel=1e-5)
        assert b.target_steps == [0, 3]


def test_result_layout(tiny_parts):
    [r] = explain_prompts(tiny_parts, ["a castle"], [0], **FAST)
    n = tiny_parts.tokenizer.model_max_length
    assert len(r.tokens) == len(r.scores) == len(r.normalized) == len(r.kinds) == len(r.token_ids) == n
    assert r.tokens[:4] == ["<|startoftext|>", "a</w>", "castle</w>", "<|endoftext|>"]
    assert r.kinds[:4] == ["bos", "token", "token", "eos"] and set(r.kinds[4:]) == {"pad"}
    assert max(n for n, k in zip(r.normalized, r.kinds) if k == "token") == pytest.approx(1.0)
    assert [t for t, _ in r.ranking()] and {t.strip() for t, _ in r.ranking()} == {"a", "castle"}
    json.dumps(r.to_json())


def _planted(parts, token: str, factor: float):
    """A copy of the model whose text encoder scales the output embedding at every `token` position."""
    token_id = parts.tokenizer.convert_tokens_to_ids(token)
    text_encoder = copy.deepcopy(parts.text_encoder)

    def scale_token(module, args, kwargs, out):
        ids = kwargs.get("input_ids", args[0] if args else None)
        out.last_hidden_state = out.last_hidden_state * torch.where(ids == token_id, factor, 1.0)[..., None]
        return out

    text_encoder.register_forward_hook(scale_token, with_kwargs=True)
    planted = copy.copy(parts)
    planted.text_encoder = text_encoder
    return planted


def test_planted_dominant_token_ranks_first(tiny_parts):
    prompts = ["a photo of a castle at night", "castle on a hill with a red sky",
               "an old man reading near the castle gate", "oil painting of a quiet harbor and a castle"]
    kw = dict(num_images_per_prompt=4, num_inference_steps=50, target_steps=[0])
    control = explain_prompts(tiny_parts, prompts, list(range(4)), **kw)
    assert sum(r.ranking()[0][0] == "castle " for r in control) <= 1  # not first by chance on this model
    planted = explain_prompts(_planted(tiny_parts, "castle</w>", 3.0), prompts, list(range(4)), **kw)
    for r in planted:
        (first, top), (_, second) = r.ranking()[:2]
        assert first == "castle " and top == 1.0 and second < 0.5, r.ranking()[:3]


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

def test_cli_end_to_end_and_resume(tmp_path, tiny_pipeline_dir, tiny_parts):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"caption": p, "label": i % 2}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "out"
    args = ["--model_id", tiny_pipeline_dir, "--dataset", data, "--out", out, "--num_inference_steps", "10",
            "--num_images_per_prompt", "2", "--target_steps", "0-1", "--batch_size", "2"]
    proc = run_cli("detect/explain_tokens.py", *args)
    assert proc.returncode == 0, proc.stderr
    assert "3 explained now, 0 resumed" in proc.stdout
    rows = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2] and [r["prompt"] for r in rows] == PROMPTS
    assert [r["label"] for r in rows] == [0, 1, 0]
    # The same numbers as the library with the same rows and settings.
    lib = explain_prompts(tiny_parts, PROMPTS, [0, 1, 2], **FAST, target_steps=[0, 1])
    for r, ref in zip(rows, lib):
        assert r["tokens"] == ref.tokens and r["kinds"] == ref.kinds and r["target_steps"] == [0, 1]
        np.testing.assert_allclose(r["scores"], ref.scores, rtol=1e-4, atol=1e-7)
    page = (out / "heatmap.html").read_text()
    assert all(word in page for word in ("castle", "watson", "harbor"))
    assert "startoftext" not in page and "endoftext" not in page
    assert sorted(p.name for p in (out / "bars").iterdir()) == [f"row{i:06d}.png" for i in range(3)]

    # A second run resumes everything; changed settings are refused before any model is loaded.
    before = (out / "tokens.jsonl").read_text()
    again = run_in_process("detect/explain_tokens.py", *args)
    assert again.returncode == 0 and "0 explained now, 3 resumed" in again.stdout
    assert (out / "tokens.jsonl").read_text() == before
    # (a second --target_steps would add to the list, docs/vocabulary.md: the value itself changes)
    changed = run_in_process("detect/explain_tokens.py", *["0" if a == "0-1" else a for a in args])
    assert changed.returncode == 2 and "--overwrite" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1


def test_cli_resumes_after_torn_write(tmp_path, tiny_pipeline_dir):
    out = tmp_path / "out"
    args = ["--model_id", tiny_pipeline_dir, "--prompt", "a castle at night", "--out", out,
            "--num_inference_steps", "5", "--num_images_per_prompt", "1"]
    (out / "bars").mkdir(parents=True)
    (out / "tokens.jsonl").write_text('{"row": 0, "prompt": "a cas')  # killed mid-write
    proc = run_in_process("detect/explain_tokens.py", *args)
    assert proc.returncode == 0, proc.stderr
    [row] = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert row["prompt"] == "a castle at night" and row["kinds"][0] == "bos"


@pytest.mark.parametrize("extra,expected", [
    (["--dataset", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--prompt", "x", "--dataset", "y.jsonl"], "not allowed with argument"),
    (["--prompt", "x", "--target_steps", "50"], "--target_steps must lie in 0..49"),
    (["--prompt", "x", "--target_steps", "3-1"], "runs backwards"),
    (["--prompt", "x", "--target_steps", "first"], "--target_steps expects"),
    (["--prompt", "   "], "--prompt must not be empty"),
    (["--prompt", "x", "--wrt", "logits"], "invalid choice"),
    (["--prompt", "x", "--batch_size", "0"], "--batch_size must be at least 1"),
])
def test_cli_rejects_bad_input_in_one_line(tmp_path, extra, expected):
    # An existing folder, though no pipeline: a model reference that does not exist is refused first.
    proc = run_in_process("detect/explain_tokens.py", "--model_id", tmp_path, "--out", tmp_path / "o", *extra)
    assert proc.returncode == 2
    assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o").exists()


def test_cli_bad_jsonl_line_names_file_and_line(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"caption": "fine"}\n{"caption": 3}\n')
    proc = run_in_process("detect/explain_tokens.py", "--model_id", tmp_path, "--out", tmp_path / "o", "--dataset",
                          data)
    assert proc.returncode == 2 and f"{data}:2:" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_unloadable_model_is_one_line_and_leaves_no_settings(tmp_path):
    proc = run_in_process("detect/explain_tokens.py", "--model_id", tmp_path / "no-model", "--out", tmp_path / "o",
                   "--prompt", "a castle")
    assert proc.returncode == 2 and "no-model: no such folder, and not a Hub id (owner/name)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o" / "config.json").exists()  # a corrected --model_id may reuse the folder


def test_cli_failed_first_batch_does_not_bind_the_retry(tmp_path, tiny_pipeline_dir, monkeypatch):
    # Memory grows with num_images_per_prompt: a first batch out of memory is answered by a retry with fewer
    # generations, and since the failed run wrote no result its settings must not refuse that retry.
    import diffmem.common.t2i.explain as explain
    from diffmem.detect.explain_tokens import main

    real_explain_prompts = explain.explain_prompts

    def out_of_memory_above_one_image(*args, num_images_per_prompt, **kwargs):
        if num_images_per_prompt > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_explain_prompts(*args, num_images_per_prompt=num_images_per_prompt, **kwargs)

    monkeypatch.setattr(explain, "explain_prompts", out_of_memory_above_one_image)
    out = tmp_path / "out"
    args = ["--model_id", str(tiny_pipeline_dir), "--prompt", "a castle at night", "--out", str(out),
            "--num_inference_steps", "3"]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        main([*args, "--num_images_per_prompt", "2"])
    assert main([*args, "--num_images_per_prompt", "1"]) == 0
    [row] = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert row["prompt"] == "a castle at night"
    # Now that a result exists, its settings bind the folder.
    assert main([*args, "--num_images_per_prompt", "2"]) == 2
