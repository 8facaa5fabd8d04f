"""Prompt-embedding optimisation, generation, baselines and ground-truth lookup on the tiny pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from diffmem.common.t2i.detection import encode_prompts
from diffmem.common.t2i.mitigation.prompt_embedding import (
    learnable_positions,
    mitigation_loss,
    optimise_prompt_embeds,
    prompt_attention_mask,
    prompt_losses,
)
from diffmem.common.t2i.text_noise import initial_latents

PROMPTS = ["The No Limits Business Woman Podcast", "Mothers influence on her young hippo", "a photo of a cat"]
STEPS = 5  # DDIM steps of the schedule; the objective is taken at step 0 (t = 801 of 1000)
G = 2


def _setup(parts, prompts, rows):
    emb = encode_prompts(parts, prompts).embeds.embeds
    uncond = parts.unconditional().embeds
    lat = initial_latents(rows, G, parts.latent_shape, 0, init_noise_sigma=float(parts.scheduler.init_noise_sigma))
    return emb, uncond, lat


OBJ = dict(num_inference_steps=STEPS, target_steps=[0], guidance_scale=7.5)


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


# --- the math, by hand --------------------------------------------------------------------------------------

def test_mitigation_loss_by_hand():
    norms = torch.tensor([[[3.0, 1.0], [4.0, 3.0]]])  # B=1, G=2, T=2
    # mean over generations and steps: (3 + 1 + 4 + 3) / 4
    assert mitigation_loss(norms).item() == pytest.approx(2.75)
    # reference code: one norm over the generations per step, sqrt(9+16)=5 and sqrt(1+9), then the step mean
    assert mitigation_loss(norms, "joint").item() == pytest.approx((5 + math.sqrt(10)) / 2)
    with pytest.raises(ValueError):
        mitigation_loss(norms, "sum")


def test_learnable_positions_never_bos_and_padding_optional():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert learnable_positions(mask).tolist() == [[False, True, True, True, True]] * 2
    assert learnable_positions(mask, freeze_padding=True).tolist() == [[False, True, True, False, False],
                                                                       [False, True, True, True, True]]


def test_attention_mask_marks_bos_words_and_first_eos(tiny_parts):
    mask = prompt_attention_mask(tiny_parts.tokenizer, ["a cat"])
    assert mask.shape == (1, 77)
    assert mask[0].tolist()[:5] == [1, 1, 1, 1, 0]  # BOS, "a", "cat", EOS, then padding


# --- optimisation --------------------------------------------------------------------------------------------

def hand_optimise(parts, emb, uncond, lat, target, iters, lr):
    """Wen et al.'s one-prompt loop at the first step, written out: returns (embedding, updates, losses)."""
    sched = parts.scheduler.__class__.from_config(parts.scheduler.config)
    sched.set_timesteps(STEPS)
    t = sched.timesteps[0]
    x = lat[0]  # [G, C, H, W]
    with torch.no_grad():
        e_u = parts.unet(x, t, encoder_hidden_states=uncond.expand(G, -1, -1)).sample
    p = emb.clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=lr)
    losses, updates = [], 0
    for _ in range(iters):
        e_c = parts.unet(x, t, encoder_hidden_states=p.expand(G, -1, -1)).sample
        loss = torch.stack([(e_c[g] - e_u[g]).norm() for g in range(G)]).mean()
        losses.append(loss.item())
        if loss.item() <= target:
            break
        (p.grad,) = torch.autograd.grad(loss, [p])
        p.grad[:, 0] = 0
        bos = p.detach()[:, 0].clone()
        opt.step()
        with torch.no_grad():
            p[:, 0] = bos  # weight decay must not move BOS either
        updates += 1
    return p.detach(), updates, losses


def test_optimisation_reaches_target_and_stops_per_prompt(tiny_parts):
    emb, uncond, lat = _setup(tiny_parts, PROMPTS, [0, 1, 2])
    initial = prompt_losses(tiny_parts, emb, uncond, lat, **OBJ)
    target = min(initial) + 1e-4  # the lowest prompt is done before any update; the others must move
    res = optimise_prompt_embeds(tiny_parts, emb, uncond, lat, target_loss=target, iters=12, lr=0.1, **OBJ)
    assert res.initial_loss == pytest.approx(initial, rel=1e-5)
    assert all(res.reached_target)
    assert max(res.final_loss) <= target
    lowest = initial.index(min(initial))
    assert res.iterations[lowest] == 0
    assert torch.equal(res.embeds[lowest], emb[lowest])
    assert all(res.iterations[b] > 0 for b in range(3) if b != lowest)
    for b in range(3):
        h = res.loss_history[b]
        assert len(h) == res.iterations[b] + 1  # one check before each update, plus the final one
        assert all(v > target for v in h[:-1]) and h[-1] <= target
    # the reported final loss is the loss of the returned embedding; BOS never moved
    assert prompt_losses(tiny_parts, res.embeds, uncond, lat, **OBJ) == pytest.approx(res.final_loss, rel=1e-4)
    torch.testing.assert_close(res.embeds[:, 0], emb[:, 0], rtol=0, atol=0)


def test_batched_equals_one_by_one_and_hand_loop(tiny_parts):
    emb, uncond, lat = _setup(tiny_parts, PROMPTS, [0, 1, 2])
    initial = prompt_losses(tiny_parts, emb, uncond, lat, **OBJ)
    target = sorted(initial)[1] * 0.55  # prompts stop after different numbers of updates
    kw = dict(target_loss=target, iters=6, lr=0.1, **OBJ)
    batched = optimise_prompt_embeds(tiny_parts, emb, uncond, lat, **kw)
    assert len(set(batched.iterations)) > 1
    for b in range(3):
        alone = optimise_prompt_embeds(tiny_parts, emb[b:b + 1], uncond, lat[b:b + 1], **kw)
        assert alone.iterations == [batched.iterations[b]]
        # Equal up to the UNet's batch-size rounding, which Adam's g/√v step can magnify for the few
        # coordinates whose gradient is near zero: a tolerance of 1% of one lr-sized step.
        torch.testing.assert_close(alone.embeds[0], batched.embeds[b], rtol=1e-3, atol=1e-3)
        assert alone.final_loss[0] == pytest.approx(batched.final_loss[b], rel=1e-4)
        hand, updates, losses = hand_optimise(tiny_parts, emb[b:b + 1], uncond, lat[b:b + 1], target, 6, 0.1)
        assert updates == alone.iterations[0]
        assert alone.loss_history[0][:len(losses)] == pytest.approx(losses, rel=1e-4)
        torch.testing.assert_close(alone.embeds, hand, rtol=1e-3, atol=1e-3)


def test_freeze_padding_and_no_target(tiny_parts):
    prompts = ["a cat", "a dog on a mat"]
    emb, uncond, lat = _setup(tiny_parts, prompts, [3, 4])
    learnable = learnable_positions(prompt_attention_mask(tiny_parts.tokenizer, prompts), freeze_padding=True)
    res = optimise_prompt_embeds(tiny_parts, emb, uncond, lat, target_loss=None, iters=2, lr=0.1,
                                 learnable=learnable, **OBJ)
    assert res.iterations == [2, 2] and res.reached_target == [False, False]
    moved = (res.embeds - emb).abs().amax(dim=-1) > 0  # [B, L]
    assert torch.equal(moved, learnable)
    assert res.final_loss[0] < res.initial_loss[0] and res.final_loss[1] < res.initial_loss[1]


# --- generation ----------------------------------------------------------------------------------------------

def test_generation_equals_diffusers_pipeline(tiny_pipe, tiny_parts):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffmem.common.t2i.sampler import decode_latents, sample_latents

    emb, uncond, lat = _setup(tiny_parts, PROMPTS[:2], [5, 6])
    ours = decode_latents(tiny_pipe.vae, sample_latents(tiny_parts, emb, uncond, lat, num_inference_steps=3,
                                                        guidance_scale=7.5))
    assert ours.shape == (2, G, 3, 16, 16)
    pipe = StableDiffusionPipeline(**{**tiny_pipe.components,
                                      "scheduler": DDIMScheduler.from_config(tiny_pipe.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=emb, negative_prompt_embeds=uncond.expand(2, -1, -1), latents=lat.flatten(0, 1),
               num_images_per_prompt=G, num_inference_steps=3, guidance_scale=7.5, output_type="pt").images
    torch.testing.assert_close(ours.flatten(0, 1), ref.float(), rtol=1e-4, atol=1e-4)


def test_image_grid_layout():
    from PIL import Image

    from diffmem.common.t2i.sampler import image_grid

    ims = [Image.new("RGB", (4, 3), (i * 50, 0, 0)) for i in range(3)]
    grid = image_grid(ims)  # 3 images -> 2 columns, 2 rows
    assert grid.size == (8, 6)
    assert grid.getpixel((5, 0)) == (50, 0, 0) and grid.getpixel((0, 4)) == (100, 0, 0)
    from diffmem.common.t2i.sampler import grid_cell

    for i in range(3):  # each image comes back out of the grid
        cell = grid_cell(grid, i, 3)
        assert cell.size == (4, 3) and cell.getpixel((0, 0)) == (i * 50, 0, 0)


# --- baselines -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rand_word_add", "rand_numb_add", "rand_word_repeat"])
def test_baselines_reproducible_and_batch_independent(tiny_parts, method):
    from diffmem.common.t2i.mitigation.run import MitigationSettings, used_prompts

    s = MitigationSettings(method=method, repeat_num=3, gen_seed=11)
    first = used_prompts(PROMPTS, [0, 1, 2], s, tiny_parts.tokenizer)
    assert first == used_prompts(PROMPTS, [0, 1, 2], s, tiny_parts.tokenizer)
    assert used_prompts(PROMPTS[2:], [2], s, tiny_parts.tokenizer) == first[2:]
    for orig, aug in zip(PROMPTS, first):
        assert aug != orig and len(aug.split(" ")) == len(orig.split(" ")) + 3
    other_seed = used_prompts(PROMPTS, [0, 1, 2], MitigationSettings(method=method, repeat_num=3, gen_seed=12),
                              tiny_parts.tokenizer)
    assert other_seed != first
    assert used_prompts(PROMPTS, [0, 1, 2], MitigationSettings(method="ours"), tiny_parts.tokenizer) == PROMPTS


# --- ground truth --------------------------------------------------------------------------------------------

def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def test_ground_truth_layouts_and_missing(tmp_path):
    from diffmem.common.t2i.groundtruth import find_ground_truth, load_images, resolve_dataset_path, resolve_gt_root

    wen = tmp_path / "sdv1_mem_groundtruth"
    (wen).mkdir()
    (wen / "sdv1_mem_groundtruth.jsonl").write_text('{"caption": "a", "index": 7}\n')
    _png(wen / "gt_images" / "7" / "b.png")
    _png(wen / "gt_images" / "7" / "a.png")
    (wen / "gt_images" / "8").mkdir()
    (wen / "gt_images" / "7" / "notes.txt").write_text("not an image")
    dataset = resolve_dataset_path(wen)
    assert dataset == wen / "sdv1_mem_groundtruth.jsonl"
    root = resolve_gt_root(dataset)
    assert root == wen / "gt_images"
    gt = find_ground_truth(root, 7)
    assert gt.ok and [p.name for p in gt.paths] == ["a.png", "b.png"]
    assert load_images(gt.paths)[0].size == (8, 8)
    assert find_ground_truth(root, 8).status == "empty"
    assert find_ground_truth(root, 9).status == "missing"
    assert find_ground_truth(None, 7).status == "no_root"
    # --gt_dir may name the parent of gt_images/ or gt_images/ itself
    assert resolve_gt_root(tmp_path / "elsewhere.jsonl", wen) == root
    assert resolve_gt_root(tmp_path / "elsewhere.jsonl", root) == root
    # lab layout: gt_images/ next to a prompt file; no folder -> None
    lab = tmp_path / "lab"
    _png(lab / "gt_images" / "0" / "x.png")
    (lab / "prompts.jsonl").write_text('{"caption": "b"}\n')
    assert resolve_gt_root(lab / "prompts.jsonl") == lab / "gt_images"
    assert resolve_gt_root(tmp_path / "nothing" / "p.jsonl") is None
    assert resolve_dataset_path(lab / "prompts.jsonl") == lab / "prompts.jsonl"
