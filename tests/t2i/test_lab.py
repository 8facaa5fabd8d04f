"""The memorization lab: the lab's pieces on tiny inputs, the shipped model's known answer, and the builder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli

from diffmem.common.t2i.lab import (
    lab_captions,
    lab_split,
    nearest_ratio,
    replication_figures,
    sscd_replication_figures,
    vae_loss,
)

ROOT = REPO
LAB = ROOT / "data" / "lab"


def test_captions_are_distinct_and_seeded():
    a = lab_captions(200, seed=3)
    assert len(set(a)) == 200
    assert a == lab_captions(200, seed=3)
    assert a != lab_captions(200, seed=4)
    assert all(c.startswith("a ") and " near the " in c for c in a)


def test_split_roles_are_disjoint():
    s = lab_split(100, 5, 20, 7, seed=0)
    assert len(s.memorized) == 5 and len(s.seen_once) == 20 and len(s.novel_captions) == 7
    assert not set(s.memorized) & set(s.seen_once)
    assert len(set(s.memorized_captions + s.seen_once_captions + s.novel_captions)) == 32
    with pytest.raises(ValueError):
        lab_split(10, 5, 6, 0, seed=0)


def test_vae_loss_by_hand():
    recon = torch.tensor([[[[1.0, 0.0]]]])
    target = torch.tensor([[[[0.0, 0.0]]]])
    mean = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, float(np.log(2.0))]])
    # MSE = 0.5; KL = 0.5 * [(1 + 1 - 1 - 0) + (0 + 2 - 1 - ln 2)] = 0.5 * (2 - ln 2)
    expected = 0.5 + 0.1 * 0.5 * (2 - np.log(2.0))
    assert vae_loss(recon, target, mean, logvar, kl_weight=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_nearest_ratio_by_hand():
    training = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    generated = torch.tensor([[0.5, 0.0], [3.0, 4.0]])
    idx, ratio = nearest_ratio(generated, training)
    # first: d = 0.5, 2.5, ~4.03 -> ratio 0.2; second: d = 5, 4, 3 -> nearest [2] (3), then [1] (4)
    assert idx.tolist() == [0, 2]
    assert ratio[0].item() == pytest.approx(0.2)
    assert ratio[1].item() == pytest.approx(3.0 / 4.0)


def test_replication_figures_counts_own_copies():
    training = torch.tensor([[0.0, 0.0], [10.0, 0.0]]).view(2, 2, 1, 1)
    # caption 0 owns image 7 (training row 0); caption 1 is novel; two generations each
    gen = torch.tensor([[[0.1, 0.0], [5.0, 0.0]], [[9.9, 0.0], [5.0, 1.0]]]).view(2, 2, 2, 1, 1)
    fig = replication_figures(gen, [7, None], training, [7, 8])
    assert fig["generations"] == 4
    assert fig["replication_rate"] == pytest.approx(2 / 4)  # 0.1/9.9 and 0.1/9.9 are copies
    assert fig["own_image_rate"] == pytest.approx(1 / 4)  # only caption 0's copy is of its own image


def test_sscd_replication_figures_by_hand():
    s = 0.6 ** 0.5
    training = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # training rows: image 7, image 8
    # caption 0 owns image 7; caption 1 is novel; two generations each
    generated = torch.tensor([[1.0, 0.0], [s, (1 - s * s) ** 0.5], [0.0, 1.0], [0.6, 0.8]])
    fig = sscd_replication_figures(generated, training, [7, None], [7, 8], group_size=2)
    # top-1 similarities: 1.0 (7), 0.775 (7), 1.0 (8), 0.8 (8)
    assert fig["mean_top1"] == pytest.approx((1.0 + s + 1.0 + 0.8) / 4, rel=1e-6)
    assert fig["rate_gt_0.5"] == 1.0 and fig["rate_gt_0.7"] == 1.0
    assert fig["own_image_rate_gt_0.5"] == pytest.approx(2 / 4)  # only caption 0's generations have an own image
    fig = sscd_replication_figures(generated, training, [8, None], [7, 8], group_size=2)
    assert fig["own_image_rate_gt_0.5"] == 0.0  # caption 0's copies are of image 7, not its own image 8


@pytest.mark.skipif(not (LAB / "model_index.json").is_file(), reason="data/lab not built (make lab)")
def test_shipped_lab_scores_memorized_captions_higher():
    from diffmem.common.t2i.detection import score_prompts
    from diffmem.common.t2i.pipelines import denoiser_parts, load_pipeline
    from diffmem.common.t2i.prompts import read_prompts

    manifest = json.loads((LAB / "manifest.json").read_text())
    assert manifest["lab"]["detection"]["auc"] >= 0.9
    mem = read_prompts(str(LAB / "memorized.jsonl"))[:4]
    unmem = read_prompts(str(LAB / "unmemorized.jsonl"))
    unmem = [r for r in unmem if r.type == "seen_once"][:3] + [r for r in unmem if r.type == "novel"][:3]
    for r in mem:
        assert (LAB / "gt_images" / str(r.index) / "0.png").is_file()
    parts = denoiser_parts(load_pipeline(str(LAB)))
    prompts = [r.prompt for r in mem + unmem]
    trace, _ = score_prompts(parts, prompts, rows=list(range(len(prompts))), num_images_per_prompt=4, gen_seed=0,
                             num_inference_steps=50, guidance_scale=7.5, score_steps=1, latents_mode="per_prompt")
    scores = trace.score.tolist()
    assert min(scores[:len(mem)]) > max(scores[len(mem):])


@pytest.mark.skipif(not (LAB / "model_index.json").is_file(), reason="data/lab not built (make lab)")
def test_shipped_lab_loads_like_a_checkpoint():
    # The README promises the lab loads like any checkpoint: the plain diffusers call, no diffmem loader and no
    # dtype, must give one dtype throughout (transformers reads the text encoder's dtype from its config, diffusers
    # loads the UNet and VAE in fp32) and generate.
    from diffusers import StableDiffusionPipeline

    def dtypes(pipe):
        return {name: getattr(pipe, name).dtype for name in ("unet", "vae", "text_encoder")}

    pipe = StableDiffusionPipeline.from_pretrained(str(LAB))
    assert dtypes(pipe) == dict.fromkeys(("unet", "vae", "text_encoder"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the lab's 16x16 resolution
    images = pipe("a test", num_inference_steps=2, height=size, width=size, output_type="np").images
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all()
    pipe = StableDiffusionPipeline.from_pretrained(str(LAB), torch_dtype=torch.float16)
    assert dtypes(pipe) == dict.fromkeys(("unet", "vae", "text_encoder"), torch.float16)


def test_builder_quick_end_to_end(tmp_path):
    out = tmp_path / "lab"
    res = run_cli("data/build_lab.py", "--out", str(out), "--quick", "--quiet", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert 0.0 <= manifest["lab"]["detection"]["auc"] <= 1.0
    assert manifest["mitigated"]["hard_threshold"] > 0
    # the mitigated run continued the lab run's early checkpoint (shared first steps), not a fresh start
    summary = json.loads((tmp_path / "lab.build" / "train_mitigated" / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{manifest['recipe']['mitigation_from_step']}")
    sscd = manifest["lab"]["replication"]["memorized"]["sscd"]
    assert 0.0 <= sscd["own_image_rate_gt_0.5"] <= sscd["rate_gt_0.5"] <= 1.0
    assert manifest["counts"]["memorized"] == len((out / "memorized.jsonl").read_text().splitlines())
    rows = [json.loads(x) for x in (out / "unmemorized.jsonl").read_text().splitlines()]
    assert {r["type"] for r in rows} == {"seen_once", "novel"} and all(r["label"] == 0 for r in rows)
    assert (out / "model_index.json").is_file()
    # neither build paths nor the build environment's offline flag are shipped
    assert not [p for p in out.rglob("*.json") if "_name_or_path" in p.read_text() or "local_files" in p.read_text()]
    # the fp16 files load in fp32 by default, like the UNet and VAE beside the text encoder
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size < 20e6


def test_builder_rejects_bad_input(tmp_path):
    res = run_cli("data/build_lab.py", "--out", str(tmp_path / "x"), "--train_steps", "0")
    assert res.returncode == 2
    assert "--train_steps" in res.stderr.strip().splitlines()[-1]
    res = run_cli("data/build_lab.py", "--out", str(tmp_path / "x"), "--train_steps", "100",
                  "--mitigation_from_step", "100")
    assert res.returncode == 2
    assert "--mitigation_from_step" in res.stderr.strip().splitlines()[-1]
