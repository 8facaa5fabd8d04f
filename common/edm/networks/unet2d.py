"""EDM denoisers on diffusers' ``UNet2DModel``: D(x; σ) with preconditioning, skip masks and EDM's embeddings.

``EDMNetwork`` wraps a ``UNet2DModel`` F and computes D(x; σ) = c_skip x + c_out F(c_in x; c_noise) with the
formulation's constants (``common.edm.precond``). Everything that fixes its behaviour — the UNet config, the
preconditioning constants, the skip mask and the noise-embedding kind — is its diffusers config, so
``save_pretrained`` / ``from_pretrained`` reload exactly the same function.

The skip mask follows DiffMemorize: one 0/1 per encoder output (diffusers' ``down_block_res_samples``: the
stem conv first, then each resnet and downsampler output in encoder order); a 0 feeds zeros in place of that
tensor to the decoder, so shapes and parameter counts are unchanged. It is applied where the decoder
*consumes* a skip (a forward pre-hook on the receiving up-block resnet zeroes the trailing channels of its
concatenated input): the producers cannot be hooked, since the stem's output also feeds the first down block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config

from diffmem.common.edm.precond import Preconditioning
from diffmem.common.errors import DiffmemError

if TYPE_CHECKING:  # the settings live with the one builder, which imports this module
    from diffmem.common.edm.networks.build import ArchConfig

EMBEDDINGS = ("positional", "fourier")


class SkipMaskError(DiffmemError, ValueError):
    """A skip mask of the wrong length or with values other than 0/1."""


# ------------------------------------------------------------------------------------ embeddings


def positional_embedding(c_noise: torch.Tensor, num_channels: int, max_positions: int = 10000) -> torch.Tensor:
    """EDM DDPM++ noise embedding: [sin(c fᵢ), cos(c fᵢ)], fᵢ = (1/max_positions)^(i/(C/2 − 1)) (EDM's
    PositionalEmbedding with endpoint=True, sin/cos swapped as SongUNet does)."""
    half = num_channels // 2
    freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / (half - 1))
    x = c_noise.float()[:, None] * freqs[None, :]
    return torch.cat([x.sin(), x.cos()], dim=1)


def fourier_embedding(c_noise: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """EDM NCSN++ noise embedding: [sin(2π fᵢ c), cos(2π fᵢ c)] with fixed random fᵢ ~ N(0, scale²) (EDM's
    FourierEmbedding, sin/cos swapped as SongUNet does). Not diffusers' "fourier", which takes log c and
    rescales the output."""
    x = c_noise.float()[:, None] * (2 * math.pi * freqs.float())[None, :]
    return torch.cat([x.sin(), x.cos()], dim=1)


class FourierNoiseEmbedding(torch.nn.Module):
    """``fourier_embedding`` with its frequencies as a saved buffer (they are drawn once, at construction)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return fourier_embedding(c_noise, self.freqs)


# ------------------------------------------------------------------------------------ architecture


# The --arch layouts this module builds (build.py adds EDM's own networks).
ARCHS = ("ddpmpp", "ncsnpp")


def group_count(channels: Sequence[int], max_groups: int = 32, min_per_group: int = 4) -> int:
    """GroupNorm groups: EDM's min(32, C/4), lowered until it divides every width (diffusers uses one count)."""
    g = max(1, min(max_groups, min(channels) // min_per_group))
    while any(c % g for c in channels):
        g -= 1
    return g


def unet_config(a: ArchConfig) -> dict:
    """The ``UNet2DModel`` config closest to EDM's SongUNet for ``a`` (see the README for the differences)."""
    if a.arch not in ARCHS:
        raise ValueError(f"unknown arch {a.arch!r}; expected one of {', '.join(ARCHS)}")
    a = a.resolved()
    widths = [a.num_channels * m for m in a.channel_mult]
    attn = [(a.resolution >> level) in a.attn_resolutions for level in range(len(widths))]
    return dict(
        sample_size=a.resolution, in_channels=a.channels, out_channels=a.channels,
        block_out_channels=widths, layers_per_block=a.num_blocks,
        down_block_types=["AttnDownBlock2D" if at else "DownBlock2D" for at in attn],
        up_block_types=["AttnUpBlock2D" if at else "UpBlock2D" for at in reversed(attn)],
        # EDM resamples inside residual blocks (UNetBlock with up/down) and uses one attention head.
        downsample_type="resnet", upsample_type="resnet", attention_head_dim=None,
        dropout=a.dropout, norm_num_groups=group_count(widths), norm_eps=1e-6,
        # With these two settings diffusers' sinusoidal embedding equals EDM DDPM++'s (``positional_embedding``).
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
        num_class_embeds=a.label_dim or None,
    )


def skip_channels(config: dict) -> list[int]:
    """Channels of each encoder output (``down_block_res_samples``) in encoder order: stem, resnets, downsamplers."""
    widths = list(config["block_out_channels"])
    out = [widths[0]]
    for level, w in enumerate(widths):
        out += [w] * config["layers_per_block"]
        if level < len(widths) - 1:
            out.append(w)
    return out


def default_skip_mask(config: dict) -> list[int]:
    """Every skip connection on: (num_blocks + 1) · levels ones."""
    return [1] * len(skip_channels(config))


def check_skip_mask(mask: Sequence[int], config: dict) -> list[int]:
    """The mask as a list of 0/1 of the encoder's length, or SkipMaskError naming the expected length."""
    n = len(skip_channels(config))
    mask = [int(m) for m in mask]
    if len(mask) != n:
        levels, blocks = len(config["block_out_channels"]), config["layers_per_block"]
        raise SkipMaskError(f"--skip_connections has {len(mask)} entries; this network has {n} skip connections "
                            f"((num_blocks + 1) x levels = ({blocks} + 1) x {levels}): give {n} comma-separated 0/1")
    if any(m not in (0, 1) for m in mask):
        raise SkipMaskError(f"--skip_connections takes 0/1 entries, got {','.join(map(str, mask))}")
    return mask


def _zero_trailing_channels(count: int):
    def hook(module, args):
        x = args[0]
        x = torch.cat([x[:, :-count], x.new_zeros(x.shape[0], count, *x.shape[2:])], dim=1)
        return (x, *args[1:])

    return hook


# ----------------------------------------------------------------------------------------- network


class EDMNetwork(ModelMixin, ConfigMixin):
    """D(x; σ, class) = c_skip x + c_out F(c_in x; c_noise, class) with F a ``UNet2DModel`` (Karras et al. 2022, Eq.
    7)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, unet_config: dict, preconditioning: dict | None = None,
                 skip_connections: list[int] | None = None, noise_embedding: str = "positional",
                 fourier_scale: float = 16.0):
        super().__init__()
        if noise_embedding not in EMBEDDINGS:
            raise ValueError(f"unknown noise embedding {noise_embedding!r}; expected one of {', '.join(EMBEDDINGS)}")
        self.unet = UNet2DModel(**unet_config)
        self.pre = Preconditioning(**(preconditioning or {}))
        if noise_embedding == "fourier":
            # The UNet's embedding MLP reads block_out_channels[0] features, as from its own sinusoidal embedding.
            self.unet.time_proj = FourierNoiseEmbedding(unet_config["block_out_channels"][0], fourier_scale)
        mask = check_skip_mask(skip_connections or default_skip_mask(unet_config), unet_config)
        channels = skip_channels(unet_config)
        consumers = [r for block in self.unet.up_blocks for r in block.resnets]  # pop order: last skip first
        for g, resnet in enumerate(consumers):
            k = len(channels) - 1 - g
            if not mask[k]:
                resnet.register_forward_pre_hook(_zero_trailing_channels(channels[k]))

    @property
    def sigma_min(self) -> float:
        return self.pre.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.pre.sigma_max

    @property
    def label_dim(self) -> int:
        return int(self.config.unet_config.get("num_class_embeds") or 0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        u = self.config.unet_config
        return (u["in_channels"], u["sample_size"], u["sample_size"])

    def round_sigma(self, sigma):
        """σ itself: the network takes any noise level (EDM's round_sigma, which only iDDPM's network changes)."""
        return torch.as_tensor(sigma)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; σ) in fp32. The preconditioning is elementwise fp32 math, which autocast leaves in fp32, so a
        caller's autocast (Accelerate's mixed precision) reaches only the UNet's layers."""
        x = x.float()
        sigma = torch.as_tensor(sigma, device=x.device).float().reshape(-1, 1, 1, 1)
        k_skip, k_out, k_in, k_noise = self.pre.coefficients(sigma)
        # c_noise goes in as a float tensor: UNet2DModel casts a Python float timestep to long.
        F_x = self.unet(k_in * x, k_noise.flatten(), class_labels=class_labels, return_dict=False)[0]
        return k_skip * x + k_out * F_x.float()


def build_unet2d_network(arch: ArchConfig, pre: Preconditioning, skip_connections: Sequence[int] | None = None,
                         fourier_scale: float = 16.0) -> EDMNetwork:
    """A freshly initialised ``UNet2DModel`` network (the caller seeds torch's global RNG for a reproducible
    init); ``common.edm.networks.build.build_network`` is the one builder callers use."""
    config = unet_config(arch)
    mask = check_skip_mask(skip_connections, config) if skip_connections is not None else None
    return EDMNetwork(unet_config=config, preconditioning=pre.to_dict(), skip_connections=mask,
                      noise_embedding=arch.noise_embedding, fourier_scale=fourier_scale)
