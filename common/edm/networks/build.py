"""EDM's own training architectures (its ``train.py --arch ddpmpp | ncsnpp | adm``) as our trainable networks.

``finetune/train_unconditional.py --arch edm-ddpmpp | edm-ncsnpp | edm-adm`` trains EDM's exact networks
(``common.edm.networks.edm_unets``) inside EDM's preconditioners (``common.edm.networks.edm_preconditioners``): the same module tree,
parameter names and initialisation as NVlabs/edm, so a snapshot is what EDM would have written and a published
EDM pickle of the same settings has the same parameter count. The widths come from ``ArchConfig`` (our flags
``--num_channels``, ``--channel_mult``, ``--num_blocks``, ``--attn_resolutions``, ``--dropout``); what each
architecture fixes besides (Karras et al. 2022, Appendix F.1 and EDM's ``train.py``) is below. EDM's
augmentation pipe is not part of our trainer, so ``augment_dim`` is 0 (EDM's CIFAR-10 models have 9 inputs
there, 1 152 parameters more; a network without them computes what theirs does for unaugmented images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from diffmem.common.edm.networks.edm_preconditioners import EDMPrecond, VEPrecond, VPPrecond
from diffmem.common.edm.networks.unet2d import ArchConfig
from diffmem.common.edm.precond import Preconditioning
from diffmem.common.errors import ConfigError

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
