"""Tiny random-weight pipelines of the current Stable Diffusion families (SDXL, SD3, Flux, PixArt-Σ), built offline
(``diffmem build-tiny``; the tests' fixtures).

Each is the family's own diffusers pipeline class with tiny configs (two-layer encoders of width 32, one- or
two-block denoisers, a two-block VAE), saved with ``save_pretrained`` so that ``DiffusionPipeline.from_pretrained``
reads it back as that class. The CLIP slots use the lab's tokenizer; the T5 slots a Unigram tokenizer built from a
word list (transformers' ``T5Tokenizer(vocab=[(piece, score), ...])``: nothing to download). The transformer
families start their output projections at zero, which would make every prompt's prediction the same: those
weights get a small seeded perturbation so that a conditional difference exists.
"""

from __future__ import annotations

from pathlib import Path

import diffusers as D
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from diffmem.common.resources import lab_dir
from diffmem.common.t2i.pipelines.build import build_pipeline, strip_build_paths

TINY_FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart")
# The pipeline class each family saves in its model_index.json.
FAMILY_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                  "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
                  "pixart": "PixArtSigmaPipeline"}
T5_WORDS = ("a", "an", "the", "of", "photo", "painting", "cat", "dog", "red", "blue", "house", "tree", "near", "on")
WIDTH = 32  # the encoders' hidden size


def t5_tokenizer():
    """A tiny T5 (Unigram) tokenizer: the special pieces, the word list and single letters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -3.0) for w in T5_WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _clip_config(tokenizer, **extra):
    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=WIDTH, intermediate_size=37,
                          layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                          vocab_size=tokenizer.vocab_size, hidden_act="gelu", **extra)


def _t5_encoder(tokenizer, width: int = WIDTH):
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _vae(flow: bool):
    """A two-block VAE with 4 latent channels; the flow families' with SD3's shift and scale and no quant convs."""
    return D.AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=8, sample_size=16, shift_factor=0.0609 if flow else None,
                         scaling_factor=1.5035 if flow else 0.18215, use_quant_conv=not flow,
                         use_post_quant_conv=not flow)


def perturb_zero_weights(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.02) -> None:
    """Give every all-zero weight a small seeded normal perturbation (zero-initialised output projections)."""
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def build_family_pipeline(family: str, folder: Path, seed: int = 0) -> Path:
    """Build, save and return the folder of a tiny ``family`` pipeline (one of TINY_FAMILIES; ``sd`` is
    :func:`build_pipeline`'s tiny Stable Diffusion)."""
    if family == "sd":
        return build_pipeline(folder, arch="tiny", seed=seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    clip = CLIPTokenizer.from_pretrained(lab_dir() / "tokenizer")
    if family == "sdxl":
        unet = D.UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + WIDTH,  # six time ids of 8 + the pooled embedding
            cross_attention_dim=2 * WIDTH, norm_num_groups=8)
        pipe = D.StableDiffusionXLPipeline(
            vae=_vae(False), text_encoder=CLIPTextModel(_clip_config(clip)),
            text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip, projection_dim=WIDTH)), tokenizer=clip,
            tokenizer_2=clip, unet=unet,
            scheduler=D.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               steps_offset=1, timestep_spacing="leading"))
    elif family == "sd3":
        t5 = t5_tokenizer()
        transformer = D.SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=WIDTH, joint_attention_dim=2 * WIDTH,
            pooled_projection_dim=2 * WIDTH)
        pipe = D.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=D.FlowMatchEulerDiscreteScheduler(), vae=_vae(True),
            text_encoder=CLIPTextModelWithProjection(_clip_config(clip, projection_dim=WIDTH)), tokenizer=clip,
            text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip, projection_dim=WIDTH)), tokenizer_2=clip,
            text_encoder_3=_t5_encoder(t5, 2 * WIDTH), tokenizer_3=t5)  # T5 as wide as both CLIPs, as in SD3
    elif family == "flux":
        t5 = t5_tokenizer()
        transformer = D.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=WIDTH, pooled_projection_dim=WIDTH, axes_dims_rope=[4, 2, 2])
        pipe = D.FluxPipeline(transformer=transformer, scheduler=D.FlowMatchEulerDiscreteScheduler(), vae=_vae(True),
                              text_encoder=CLIPTextModel(_clip_config(clip)), tokenizer=clip,
                              text_encoder_2=_t5_encoder(t5), tokenizer_2=t5)
    elif family == "pixart":
        t5 = t5_tokenizer()
        transformer = D.PixArtTransformer2DModel(
            sample_size=8, num_layers=1, patch_size=1, attention_head_dim=8, num_attention_heads=2,
            caption_channels=WIDTH, in_channels=4, out_channels=8,  # learned σ: 2C channels, the first C kept
            cross_attention_dim=16, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
        pipe = D.PixArtSigmaPipeline(transformer=transformer, scheduler=D.DPMSolverMultistepScheduler(),
                                     vae=_vae(False), text_encoder=_t5_encoder(t5), tokenizer=t5)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    perturb_zero_weights(denoiser, generator)
    pipe.save_pretrained(folder)
    strip_build_paths(folder)
    return Path(folder)
