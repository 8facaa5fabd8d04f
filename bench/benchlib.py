"""What the inference benchmarks share: the model they time, their prompts and a synchronised timer."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffmem.common.cli import quiet_hub_logging
from diffmem.common.t2i.pipelines import assemble_pipeline, build_components, load_pipeline, parse_dtype
from diffmem.common.t2i.prompts import read_prompts

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sdv1_500_memorized.jsonl"


def add_model_args(p: argparse.ArgumentParser, archs: tuple[str, ...] = ("tiny", "sd-v1")) -> None:
    """The options every inference benchmark takes: which model, where, in what precision, which prompts."""
    p.add_argument("--arch", choices=archs, default="tiny", help="random-weight model to build")
    p.add_argument("--model_id", help="benchmark a saved pipeline instead of building one")
    p.add_argument("--prompts", help="prompt file (default: ../shared/data/sdv1_500_memorized.jsonl)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--out", help="also write the figures to this JSON file")


def bench_pipeline(args: argparse.Namespace):
    """The pipeline to time: --model_id loaded through from_pretrained, or a random --arch one built here."""
    quiet_hub_logging()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    if args.model_id:
        pipe = load_pipeline(args.model_id, dtype=dtype, device=device)
    else:
        with tempfile.TemporaryDirectory() as tok_dir:
            pipe = assemble_pipeline(build_components(args.arch, seed=0, tokenizer_dir=tok_dir)).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Families with a full-size random-weight build (family_pipeline's arch "full"): the denoiser at the released shape.
FULL_FAMILIES = {
    "sd": "Stable Diffusion v1 (860M UNet, full-size CLIP text encoder)",
    "sdxl": "SDXL base UNet (2.6B), 2-layer CLIP-L/CLIP-G text encoders at their real widths",
    "sd3": "SD3-medium MMDiT (2B), 2-layer CLIP-L/CLIP-G/T5 text encoders at their real widths",
}


def family_pipeline(family: str | None, arch: str = "tiny", device: str = "cpu", dtype: str = "fp32",
                    model_id: str | None = None):
    """The pipeline a family benchmark times, as its family's diffusers class: --model_id loaded; arch "tiny":
    the tiny random pipeline of common.t2i.pipelines.tiny, built in a temporary folder and loaded back; arch
    "full": the family's released denoiser shape with random weights, built in memory on the device (FULL_FAMILIES:
    the text encoders are shallow, the metric's cost being the denoiser's)."""
    from diffmem.common.t2i.pipelines.tiny import build_family_pipeline

    quiet_hub_logging()
    torch_device, torch_dtype = torch.device(device), parse_dtype(dtype)
    if model_id:
        pipe = load_pipeline(model_id, dtype=torch_dtype, device=torch_device)
    elif arch == "tiny":
        with tempfile.TemporaryDirectory() as folder:
            path = build_family_pipeline(family, Path(folder) / family)
            pipe = load_pipeline(str(path), dtype=torch_dtype, device=torch_device)
    elif arch == "full":
        if family not in FULL_FAMILIES:
            raise SystemExit(f"--arch full: no full-size build of {family} here (only {', '.join(FULL_FAMILIES)})")
        pipe = full_family_pipeline(family, torch_device).to(torch_device, torch_dtype)
    else:
        raise SystemExit(f"--arch {arch}: a family benchmark takes --arch tiny or full")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip(tokenizer, hidden: int, heads: int, projection: int | None = None):
    """A 2-layer CLIP text encoder at a released width (with a projection: CLIPTextModelWithProjection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_attention_heads=heads, num_hidden_layers=2, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1, hidden_act="gelu", projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _full_vae(latent_channels: int, flow: bool):
    """A narrow VAE of the released depth (4 blocks: 8× downsampling, so 1024 px is a 128 × 128 latent); it runs
    only where a benchmark decodes, which the first-step timings never do."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 8, 16, 16], in_channels=3, out_channels=3,
                         latent_channels=latent_channels, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8, sample_size=1024,
                         shift_factor=0.0609 if flow else None, scaling_factor=1.5305 if flow else 0.13025,
                         use_quant_conv=not flow, use_post_quant_conv=not flow)


def full_family_pipeline(family: str, device: torch.device, seed: int = 0):
    """A random-weight pipeline whose denoiser has the released shape (FULL_FAMILIES), fp32; its modules are built
    under ``device`` so that a multi-billion-parameter model is initialised there (the schedulers outside, on CPU,
    as from_pretrained makes them)."""
    import diffusers as D
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    from diffmem.common.resources import lab_dir
    from diffmem.common.t2i.pipelines import SD_SCHEDULER_CONFIG
    from diffmem.common.t2i.pipelines.tiny import t5_tokenizer

    torch.manual_seed(seed)
    if family == "sd":
        with tempfile.TemporaryDirectory() as tok_dir, torch.device(device):
            parts = build_components("sd-v1", seed=seed, tokenizer_dir=tok_dir)
        return assemble_pipeline({**parts, "scheduler": D.PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)})
    if family not in FULL_FAMILIES:
        raise ValueError(f"no full-size build of {family!r}; expected one of {', '.join(FULL_FAMILIES)}")
    clip = CLIPTokenizer.from_pretrained(lab_dir() / "tokenizer")
    if family == "sdxl":  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
        with torch.device(device):
            unet = D.UNet2DConditionModel(
                sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)  # six time ids of 256 + CLIP-G's 1280 pooled
            modules = dict(vae=_full_vae(4, flow=False), text_encoder=_clip(clip, 768, 12),
                           text_encoder_2=_clip(clip, 1280, 20, projection=1280), unet=unet)
        return D.StableDiffusionXLPipeline(
            **modules, tokenizer=clip, tokenizer_2=clip,
            scheduler=D.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               steps_offset=1, timestep_spacing="leading"))
    t5 = t5_tokenizer()  # sd3: stabilityai/stable-diffusion-3-medium-diffusers' transformer/config.json
    with torch.device(device):
        transformer = D.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=192)
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(t5), d_model=4096, d_kv=64, d_ff=1024, num_layers=2,
                                                 num_heads=8, decoder_start_token_id=0, pad_token_id=0,
                                                 eos_token_id=1))  # T5-XXL's width: joint_attention_dim
        modules = dict(transformer=transformer, vae=_full_vae(16, flow=True),
                       text_encoder=_clip(clip, 768, 12, projection=768),
                       text_encoder_2=_clip(clip, 1280, 20, projection=1280), text_encoder_3=text_encoder_3)
    return D.StableDiffusion3Pipeline(**modules, scheduler=D.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                      tokenizer=clip, tokenizer_2=clip, tokenizer_3=t5)


def load_prompts(path: str | None, n: int) -> list[str]:
    """n prompts from a file (the shared 500 memorized prompts by default), cycled; generated if absent."""
    source = Path(path) if path else SHARED_PROMPTS
    if source.exists():
        prompts = [r.prompt for r in read_prompts(source)]
    else:  # no shared data on this machine: generated captions of LAION-like length
        words = "vintage poster of a red house near the lake at dawn with mountains and a small boat".split()
        prompts = [" ".join(words[(i + k) % len(words)] for k in range(6 + i % 10)) for i in range(n)]
    return (prompts * (n // len(prompts) + 1))[:n]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds), synchronised with the device on both ends."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


class Timer:
    """Timestamps of optimizer steps; samples/s over the steps after warmup."""

    def __init__(self, device, warmup, batch):
        self.device, self.warmup, self.batch, self.times = device, warmup, batch, []

    def step(self, *_):
        sync(self.device)
        self.times.append(time.perf_counter())

    def samples_per_s(self):
        # The median step: robust to the stalls other jobs on a shared machine cause in single steps.
        timed = self.times[self.warmup - 1:]
        return self.batch / statistics.median(b - a for a, b in zip(timed, timed[1:]))
