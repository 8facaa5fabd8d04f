"""Stable Diffusion 1-shaped pipelines built offline: tiny, the lab's shape, or SD v1's full size, random weights.

:func:`build_pipeline` assembles the classes Stable Diffusion v1 ships (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, the real CLIP tokenizer, a PNDM scheduler) and saves them where the loader reads them back; the
other families' tiny pipelines are :mod:`.tiny`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffmem.common.t2i.tokenizer import BOS_ID, EOS_ID, MODEL_MAX_LENGTH, VOCAB_SIZE, build_clip_tokenizer

# Stable Diffusion v1's scheduler (scheduler/scheduler_config.json of CompVis/stable-diffusion-v1-4).
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
)

_TINY = dict(
    unet=dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, norm_num_groups=32),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
)

ARCHS = {
    # Smallest model with every SD block type: 16x16 RGB images, 4x8x8 latents, 32-wide cross-attention.
    "tiny": _TINY,
    # The memorization lab (common.t2i.lab): the tiny UNet and VAE with a 64-wide text encoder and cross-attention,
    # wide enough that jointly trained caption embeddings separate (measured: docs/lab.md).
    "lab": dict(
        unet={**_TINY["unet"], "cross_attention_dim": 64},
        vae=_TINY["vae"],
        text={**_TINY["text"], "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64},
    ),
    # The shapes of CompVis/stable-diffusion-v1-4 (860M UNet, 123M text encoder, 84M VAE), random weights.
    "sd-v1": dict(
        unet=dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512, norm_num_groups=32),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768),
    ),
}


def build_components(arch: str = "tiny", seed: int = 0, tokenizer_dir: str | Path | None = None):
    """Randomly initialised SD-shaped components (dict of unet, vae, text_encoder, tokenizer, scheduler)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    n_blocks = len(spec["vae"]["block_out_channels"])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        **spec["vae"],
    )
    text_config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        **spec["text"],
    )
    text_encoder = CLIPTextModel(text_config)
    if tokenizer_dir is None:
        import tempfile

        tokenizer_dir = tempfile.mkdtemp(prefix="diffmem-tokenizer-")
    tokenizer = build_clip_tokenizer(tokenizer_dir)
    scheduler = PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def assemble_pipeline(components: dict):
    """A StableDiffusionPipeline from components, without a safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def build_pipeline(out_dir: str | Path, arch: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised SD-shaped pipeline folder that from_pretrained loads offline."""
    out = Path(out_dir)
    components = build_components(arch, seed, tokenizer_dir=out / "tokenizer")
    assemble_pipeline(components).save_pretrained(out)
    return out


BUILD_KEYS = {"_name_or_path", "local_files_only"}


def strip_build_paths(folder: str | Path) -> None:
    """Drop what save_pretrained copies into configs from how the model was loaded: ``_name_or_path`` (the
    folder it came from) and ``local_files_only`` (whether HF_HUB_OFFLINE was set).

    A shipped pipeline folder should not name the build machine's temporary paths or depend on its environment;
    loaders fill these in again when the folder is loaded.
    """
    import json

    for config in Path(folder).rglob("*.json"):
        data = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(data, dict) and BUILD_KEYS & data.keys():
            for key in BUILD_KEYS & data.keys():
                del data[key]
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
