"""finetune/train_text_to_image.py on the other families' tiny pipelines (SDXL, SD3, Flux, PixArt): each trains and
its output loads as its own class, LoRA trains the adapters alone and exports them merged, the thresholded loss
runs in flow's velocity space, and the flow-matching loss matches a direct float64 computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import base_args, write_images
from safetensors.torch import load_file

from diffmem.common.t2i.pipelines.tiny import FAMILY_CLASSES

WEIGHTS = "diffusion_pytorch_model.safetensors"
DENOISER = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer", "pixart": "transformer"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mem(tmp_path_factory):
    """Four captioned 16 x 16 images (words the tiny T5 tokenizer knows, so every encoder sees real tokens)."""
    captions = ["a photo of a red cat", "a painting of a blue dog", "the house near a tree", "a dog on the house"]
    return write_images(tmp_path_factory.mktemp("mem") / "images", captions, seed=3)


def train(model_dir, mem, out, *extra) -> int:
    from diffmem.finetune.train_text_to_image import main

    return main(base_args(model_dir, mem, out, "--max_train_steps", "2", "--learning_rate", "1e-3", *extra))


def weights(folder, family):
    return load_file(folder / DENOISER[family] / WEIGHTS)


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ every family


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "pixart"])
def test_each_family_trains_and_its_output_loads_as_its_class(family_dirs, mem, tmp_path, fresh_accelerate, family):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    assert train(family_dirs[family], mem, out, "--checkpointing_steps", "2", "--validation_prompts", "a red cat",
                 "--validation_inference_steps", "2") == 0
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == FAMILY_CLASSES[family]
    base, tuned = weights(family_dirs[family], family), weights(out, family)
    assert tuned.keys() == base.keys()
    assert max((tuned[k] - base[k]).abs().max().item() for k in base) > 0  # the denoiser trained
    assert (out / "checkpoint-2" / DENOISER[family] / WEIGHTS).is_file()
    vae = load_file(out / "vae" / WEIGHTS)
    assert all(torch.equal(v, t) for v, t in zip(load_file(family_dirs[family] / "vae" / WEIGHTS).values(),
                                                  vae.values()))
    assert all(np.isfinite(row["train_loss"]) for row in read_log(out))
    assert (out / "validation" / "step-2" / "000.png").is_file()  # sampled by the family's own pipeline


@pytest.mark.parametrize("family, extra", [("sd3", ["--lora_rank", "2"]), ("pixart", ["--hard_threshold", "1e6"])])
def test_bf16_mixed_precision_trains(family_dirs, mem, tmp_path, fresh_accelerate, family, extra):
    """bf16 autocast over fp32 trainable weights (LoRA: over bf16 base weights); the export is fp32."""
    out = tmp_path / "run"
    assert train(family_dirs[family], mem, out, "--mixed_precision", "bf16", *extra) == 0
    assert all(np.isfinite(row["train_loss"]) for row in read_log(out))
    tuned = weights(out, family)
    assert all(t.dtype == torch.float32 for t in tuned.values())
    base = weights(family_dirs[family], family)
    assert max((tuned[k] - base[k]).abs().max().item() for k in base) > 0


def test_two_processes_train_lora_adapters_of_a_transformer(family_dirs, mem, tmp_path):
    """accelerate launch, DDP on two CPU processes: the family's predict reads the denoiser's config through the
    DDP-wrapped LoRA module, and both ranks' gradients meet."""
    from conftest import accelerate_launch, free_port

    out = tmp_path / "ddp"
    args = base_args(family_dirs["pixart"], mem, out, "--max_train_steps", "2", "--learning_rate", "1e-3",
                     "--lora_rank", "2", "--hard_threshold", "1e6")
    args[args.index("--train_batch_size") + 1] = "1"
    res = accelerate_launch("--config_file", "accelerate_configs/cpu.yaml", "--multi_gpu", "--num_processes", "2",
                            "--main_process_port", free_port(), "finetune/train_text_to_image.py", *args, timeout=240,
                            env={"ACCELERATE_USE_CPU": "true"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert [row["step"] for row in read_log(out)] == [1, 2]
    base, tuned = weights(family_dirs["pixart"], "pixart"), weights(out, "pixart")
    assert max((tuned[k] - base[k]).abs().max().item() for k in base) > 0


# ----------------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_lora_trains_the_adapters_alone_resumes_exactly_and_exports_them_merged(family_dirs, mem, tmp_path,
                                                                               fresh_accelerate, family):
    from diffusers import DiffusionPipeline

    from diffmem.common.safe_load import safe_torch_load
    from diffmem.common.t2i.pipelines import denoiser_parts, load_pipeline
    from diffmem.common.t2i.train import LoraDenoiser

    name, model = DENOISER[family], family_dirs[family]
    common = ["--lora_rank", "4", "--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema",
              "--ema_decay", "0.5", "--gradient_checkpointing"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(model, mem, straight, *common) == 0
    fresh_accelerate()
    assert train(model, mem, resumed, *common, "--resume_from_checkpoint", straight / "checkpoint-2") == 0

    adapters = safe_torch_load(straight / "checkpoint-4" / f"{name}_lora" / "model.pt")
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)  # the adapters, not the base
    again = safe_torch_load(resumed / "checkpoint-4" / f"{name}_lora" / "model.pt")
    assert all(torch.equal(adapters[k], again[k]) for k in adapters)  # exact resume
    assert all(torch.equal(a, b) for a, b in zip(weights(straight, family).values(),
                                                 weights(resumed, family).values()))

    assert type(DiffusionPipeline.from_pretrained(straight)).__name__ == FAMILY_CLASSES[family]
    base, tuned = weights(model, family), weights(straight, family)
    assert tuned.keys() == base.keys()  # merged: a plain model of the class, no adapter left
    projection = ("to_q.", "to_k.", "to_v.", "to_out.0.")
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(any(p in k for p in projection) and k.endswith("weight") for k in changed)

    # The export is the base plus the final (EMA) adapters: both predict the same.
    ema = safe_torch_load(straight / "checkpoint-4" / f"{name}_lora_ema" / "model.pt")
    merged = denoiser_parts(load_pipeline(str(straight)), height=16, width=16)
    adapted = denoiser_parts(load_pipeline(str(model)), height=16, width=16)
    LoraDenoiser(adapted.unet, 4, name).load_state_dict(ema)
    x = torch.randn(2, *merged.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = merged.encode(["a photo of a red cat", "a dog"]).embeds
        np.testing.assert_allclose(merged.predict(x, 500, cond).numpy(), adapted.predict(x, 500, cond).numpy(),
                                   rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- thresholded loss on flow


def test_hard_threshold_on_a_flow_family_measures_velocities(family_dirs, mem, tmp_path, fresh_accelerate, capsys):
    out = tmp_path / "kept"
    assert train(family_dirs["sd3"], mem, out, "--hard_threshold", "1e6") == 0
    log = read_log(out)
    assert all(row["dropped_fraction"] == 0.0 and row["text_noise_norm"] > 0 for row in log)
    fresh_accelerate()
    capsys.readouterr()
    assert train(family_dirs["sd3"], mem, tmp_path / "dropped", "--hard_threshold", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--hard_threshold 0 dropped every one of the run's 4 samples" in err[-1]


@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt"])
def test_flow_matching_loss_and_threshold_against_a_direct_computation(family_dirs, mem, scheme):
    """x_σ = (1−σ)x₀ + σε, v = ε − x₀, σ = (N − ⌊u·N⌋)/N of the unshifted schedule, w = σ⁻² for sigma_sqrt: by hand
    in float64, against the loss on the tiny SD3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffmem.common.seeding import STREAM_NOISE, STREAM_TIMESTEP, STREAM_VAE, randn_per_sample, torch_generator
    from diffmem.common.t2i.pipelines import denoiser_parts, load_pipeline
    from diffmem.common.t2i.text_image_data import (
        CaptionConfig,
        ImageTransformConfig,
        TextImageDataset,
        read_image_folder,
    )
    from diffmem.common.t2i.train import FlowWeighting, TextToImageLoss, collate_captions

    pipe = load_pipeline(str(family_dirs["sd3"]))
    parts = denoiser_parts(pipe, height=16, width=16)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert sched.config.shift == 1.0  # the tiny pipeline's: σ_i = (N − i)/N
    ds = TextImageDataset(read_image_folder(mem), ImageTransformConfig(16), CaptionConfig(), seed=0)
    batch = collate_captions([ds[(0, p, p)] for p in range(4)])
    seeds = batch["sample_seed"].tolist()
    vae = pipe.vae

    with torch.no_grad():
        dist = vae.encode(batch["pixel_values"]).latent_dist
        eps = randn_per_sample(seeds, (4, 8, 8), STREAM_VAE).double()
        x0 = ((dist.mean.double() + dist.std.double() * eps) - vae.config.shift_factor) * vae.config.scaling_factor
        noise = randn_per_sample(seeds, (4, 8, 8), STREAM_NOISE).double()
        streams = [torch_generator(s, STREAM_TIMESTEP) for s in seeds]
        if scheme == "logit_normal":  # u = sigmoid(z), z ~ N(0, 1) (Esser et al. 2024, Sec. 3.1)
            u = [torch.sigmoid(torch.normal(0.0, 1.0, (1,), generator=g)) for g in streams]
        else:
            u = [torch.rand((1,), generator=g) for g in streams]
        n = 1000
        sigma = torch.tensor([(n - int(float(v) * n)) / n for v in u], dtype=torch.float64).view(4, 1, 1, 1)
        x_sigma = (1 - sigma) * x0 + sigma * noise
        v_target = noise - x0
        t = (sigma.view(4) * n).float()
        cond = parts.encode(batch["captions"]).embeds
        v_c = parts.predict(x_sigma.float(), t, cond).double()
        v_u = parts.predict(x_sigma.float(), t, parts.unconditional().expand(4)).double()
    weight = sigma.view(4) ** -2 if scheme == "sigma_sqrt" else torch.ones(4, dtype=torch.float64)
    expected = ((v_c - v_target) ** 2).flatten(1).mean(dim=1) * weight
    norms = (v_c - v_u).flatten(1).norm(dim=1)
    threshold = float(norms.sort().values[1:3].mean())  # between the middle two: two samples kept

    loss = TextToImageLoss(vae=vae, noise_scheduler=sched, parts=parts, denoiser="transformer",
                           weight_dtype=torch.float32, device=torch.device("cpu"), unwrap=lambda m: m,
                           hard_threshold=threshold, weighting=FlowWeighting(scheme))
    terms = loss(batch, {"transformer": parts.unet})
    np.testing.assert_allclose(terms.stats["timestep"].numpy(), t.numpy(), rtol=1e-6)
    np.testing.assert_allclose(terms.per_sample.detach().double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(terms.stats["text_noise_norm"].double().numpy(), norms.numpy(), rtol=1e-4, atol=1e-6)
    assert terms.keep.tolist() == (norms < threshold).tolist() and 0 < terms.keep.sum() < 4


# -------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("family, extra, message", [
    ("sd3", ["--lora_rank", "-1"], "--lora_rank must be >= 0, got -1"),
    ("sd", ["--weighting_scheme", "logit_normal"], "--weighting_scheme: sigma sampling of flow matching (SD3, Flux); "
                                                   "Stable Diffusion 1.x/2.x trains on the DDPM eps/v loss"),
    ("pixart", ["--logit_std", "0.5"], "PixArt-α/Σ trains on the DDPM eps/v loss"),
    ("sd3", ["--snr_gamma", "5"], "--snr_gamma: Min-SNR-gamma weights the DDPM eps/v loss; SD3/SD3.5 trains by flow"),
    ("flux", ["--prediction_type", "v_prediction"], "Flux.1 predicts the rectified-flow velocity"),
    ("sd3", ["--mode_scale", "1.3"], "--mode_scale is a parameter of --weighting_scheme mode; this run uses "
                                     "logit_normal"),
    ("flux", ["--logit_mean", "0.5"], "--logit_mean is a parameter of --weighting_scheme logit_normal; this run uses "
                                      "none"),
    ("sdxl", ["--train_text_encoder"], "SDXL's encoders stay frozen"),
    ("flux", ["--resolution", "18"], "--resolution 18: a Flux.1 image side must be a multiple of 4"),
])
def test_settings_a_family_does_not_take_are_one_line(family_dirs, mem, tmp_path, fresh_accelerate, capsys, family,
                                                      extra, message):
    assert train(family_dirs[family], mem, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # The resolution is checked once the model is loaded: its loading progress comes first.
    errors = [line for line in err if line.startswith("train_text_to_image: error: ")]
    assert errors == err[-1:] and message in errors[0], err
