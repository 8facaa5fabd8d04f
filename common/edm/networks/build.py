"""The one builder of the unconditional wing's trainable networks: ``--arch`` and its widths (``ArchConfig``), our
``UNet2DModel`` layouts (``ddpmpp``, ``ncsnpp``: :mod:`common.edm.networks.unet2d`) and EDM's own training
architectures (its ``train.py --arch ddpmpp | ncsnpp | adm``).

``finetune/train_unconditional.py --arch edm-ddpmpp | edm-ncsnpp | edm-adm`` trains EDM's exact networks
(``common.edm.networks.edm_unets``) inside EDM's preconditioners (``common.edm.networks.edm_preconditioners``): the
same module tree,
parameter names and initialisation as NVlabs/edm, so a snapshot is what EDM would have written and a published
EDM pickle of the same settings has the same parameter count. The widths come from ``ArchConfig`` (our flags
``--num_channels``, ``--channel_mult``, ``--num_blocks``, ``--attn_resolutions``, ``--dropout``); what each
architecture fixes besides (Karras et al. 2022, Appendix F.1 and EDM's ``train.py``) is below. EDM's
augmentation pipe is not part of our trainer, so ``augment_dim`` is 0 (EDM's CIFAR-10 models have 9 inputs
there, 1 152 parameters more; a network without them computes what theirs does for unaugmented images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

from diffmem.common.edm.networks.edm_preconditioners import EDMPrecond, VEPrecond, VPPrecond
from diffmem.common.edm.networks.unet2d import ARCHS, EMBEDDINGS, build_unet2d_network
from diffmem.common.edm.precond import Preconditioning
from diffmem.common.errors import ConfigError
from diffmem.common.settings import int_list, option

# --arch: our UNet2DModel layouts (unet2d.ARCHS), then EDM's own networks.
EDM_ARCH_NAMES = ("edm-ddpmpp", "edm-ncsnpp", "edm-adm")
# The widths each --arch starts from (num_channels, channel_mult, num_blocks, attn_resolutions): ours are
# DiffMemorize's basic setup; EDM's are what its train.py gives each --arch (CIFAR-10 DDPM++/NCSN++, ImageNet ADM).
ARCH_WIDTHS = {
    "ddpmpp": (128, (2, 2, 2), 2, (16,)),
    "ncsnpp": (128, (2, 2, 2), 2, (16,)),
    "edm-ddpmpp": (128, (2, 2, 2), 4, (16,)),
    "edm-ncsnpp": (128, (2, 2, 2), 4, (16,)),
    "edm-adm": (192, (1, 2, 3, 4), 3, (32, 16, 8)),
}
_WIDTH_FIELDS = ("num_channels", "channel_mult", "num_blocks", "attn_resolutions")


@dataclass
class ArchConfig:
    """Width, depth and layout of the network, in EDM's / DiffMemorize's terms; a width left None is the
    architecture's own (``ARCH_WIDTHS``), filled in by ``resolved()``."""

    arch: str = option("ddpmpp", choices=ARCHS + EDM_ARCH_NAMES,
                       help="ddpmpp/ncsnpp: diffusers' UNet2DModel with EDM's embeddings; edm-*: EDM's own "
                            "SongUNet (DDPM++, NCSN++) and DhariwalUNet (ADM)")
    num_channels: int | None = option(None, type=int, metavar="C", aliases=("--cbase",),
                                      help="EDM's model_channels (None: the arch's, 128; 192 for edm-adm)")
    channel_mult: tuple[int, ...] | None = option(None, type=int_list, nargs="+", metavar="M", aliases=("--cres",),
                                                  help="width multiplier per level (None: the arch's, 2,2,2; "
                                                       "1,2,3,4 for edm-adm)")
    num_blocks: int | None = option(None, type=int, metavar="N",
                                    help="residual blocks per level (None: the arch's, 2 for ours as DiffMemorize's "
                                         "basic setup; 4 for edm-ddpmpp/edm-ncsnpp; 3 for edm-adm)")
    attn_resolutions: tuple[int, ...] | None = option(None, type=int_list, nargs="+", metavar="R",
                                                      help="resolutions with attention (None: the arch's, 16; "
                                                           "32,16,8 for edm-adm)")
    dropout: float = option(0.13, help="dropout probability of the residual blocks")
    embed: str | None = option(None, choices=EMBEDDINGS,
                               help="noise embedding (None: the arch's: fourier for the ncsnpp ones, else positional)")
    resolution: int = 32  # set from the data
    channels: int = 3  # set from the data
    label_dim: int = 0  # 0: unconditional; set from the data with --cond

    def resolved(self) -> ArchConfig:
        """A copy with every width given (the architecture's own where None); ValueError for an unknown arch."""
        if self.arch not in ARCH_WIDTHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCH_WIDTHS)}")
        own = dict(zip(_WIDTH_FIELDS, ARCH_WIDTHS[self.arch]))
        given = {k: getattr(self, k) for k in _WIDTH_FIELDS if getattr(self, k) is not None}
        values = {**own, **given}
        values["channel_mult"] = tuple(values["channel_mult"])
        values["attn_resolutions"] = tuple(values["attn_resolutions"])
        return replace(self, **values)

    def validate(self) -> None:
        """Argument-level checks; raises ConfigError (one line)."""
        for name in ("num_channels", "num_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be >= 1, got {value}")
        if self.channel_mult is not None and (not self.channel_mult or min(self.channel_mult) < 1):
            raise ConfigError(f"--channel_mult needs positive integers, got {list(self.channel_mult)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.arch == "edm-adm" and self.embed is not None:
            raise ConfigError("--embed applies to ddpmpp, ncsnpp, edm-ddpmpp and edm-ncsnpp; edm-adm's noise "
                              "embedding is fixed (positional)")

    @property
    def noise_embedding(self) -> str:
        return self.embed or ("fourier" if self.arch in ("ncsnpp", "edm-ncsnpp") else "positional")



# What EDM's train.py sets for each --arch beyond the widths: the SongUNet variant (DDPM++ / NCSN++ of Song et
# al. 2021) or Dhariwal & Nichol's ADM.
EDM_ARCHS = {
    "edm-ddpmpp": ("SongUNet", dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                                    channel_mult_noise=1, resample_filter=[1, 1])),
    "edm-ncsnpp": ("SongUNet", dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                                    channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    "edm-adm": ("DhariwalUNet", {}),
}
# Our --precond names -> EDM's preconditioner classes (iDDPM is a sampling-only formulation in EDM: no loss).
EDM_PRECONDS = {"vp": VPPrecond, "ve": VEPrecond, "edm": EDMPrecond}


def is_edm_arch(arch: str) -> bool:
    """Whether ``--arch`` names one of EDM's own networks (as opposed to our ``UNet2DModel`` layouts)."""
    return arch in EDM_ARCHS


def edm_backbone(arch: ArchConfig) -> tuple[str, dict]:
    """(model_type, backbone keywords) of EDM's network for these settings, as EDM's train.py passes them."""
    if arch.arch not in EDM_ARCHS:
        raise ConfigError(f"--arch {arch.arch} is not one of EDM's networks ({', '.join(EDM_ARCHS)})")
    model_type, fixed = EDM_ARCHS[arch.arch]
    arch = arch.resolved()
    kwargs = dict(model_channels=arch.num_channels, channel_mult=list(arch.channel_mult), num_blocks=arch.num_blocks,
                  attn_resolutions=list(arch.attn_resolutions), dropout=arch.dropout, **fixed)
    if arch.embed is not None:
        if model_type != "SongUNet":
            raise ConfigError(f"--embed applies to edm-ddpmpp and edm-ncsnpp; {arch.arch}'s embedding is fixed "
                              "(positional)")
        kwargs["embedding_type"] = arch.embed  # our --embed names are SongUNet's embedding_type names
    return model_type, kwargs


def edm_preconditioner_kwargs(pre: Preconditioning) -> dict:
    """The constructor constants of EDM's preconditioner for our ``Preconditioning`` (same formulation)."""
    if pre.precond == "vp":
        return dict(beta_d=pre.beta_d, beta_min=pre.beta_min, M=pre.M, epsilon_t=pre.epsilon_t)
    if pre.precond == "ve":
        return dict(sigma_min=pre.ve_sigma_min, sigma_max=pre.ve_sigma_max)
    return dict(sigma_data=pre.sigma_data)


def build_edm_network(arch: ArchConfig, pre: Preconditioning, skip_connections: Sequence[int] | None = None):
    """A freshly initialised EDM network (EDM's initialisation; the caller seeds torch's global RNG): the
    preconditioner of ``pre`` around the backbone of ``arch``, DiffMemorize's skip mask applied."""
    model_type, kwargs = edm_backbone(arch)
    if skip_connections is not None:
        kwargs["skip_connections"] = [int(m) for m in skip_connections]
    cls = EDM_PRECONDS[pre.precond]
    return cls(img_resolution=arch.resolution, img_channels=arch.channels, label_dim=arch.label_dim,
               model_type=model_type, **edm_preconditioner_kwargs(pre), **kwargs)


def describe(arch: ArchConfig) -> dict:
    """The architecture as recorded in ``snapshot.json``: our settings plus the backbone keywords they give."""
    record = asdict(arch.resolved())
    if is_edm_arch(arch.arch):
        record["model_type"], record["backbone_kwargs"] = edm_backbone(arch)
    return record


def build_network(arch: ArchConfig, pre: Preconditioning, skip_connections: Sequence[int] | None = None):
    """A freshly initialised network of ``arch`` (the caller seeds torch's global RNG): EDM's own for ``edm-*``,
    else ours on ``UNet2DModel``; DiffMemorize's skip mask applied."""
    if is_edm_arch(arch.arch):
        return build_edm_network(arch, pre, skip_connections)
    return build_unet2d_network(arch, pre, skip_connections)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
