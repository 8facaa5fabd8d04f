"""EDM's four preconditioned denoisers around ``SongUNet`` / ``DhariwalUNet``, as diffusers models.

D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)) (Karras et al. 2022, Eq. 7 and Table 1) with the
constants of ``VPPrecond`` (Song et al.'s VP SDE), ``VEPrecond`` (VE SDE), ``iDDPMPrecond`` (Nichol & Dhariwal's
improved DDPM: a discrete table of M + 1 noise levels ``u``, σ rounded onto it, c_noise the table index) and
``EDMPrecond``. Each takes NVlabs/edm's constructor keywords (img_resolution, img_channels, label_dim, use_fp16,
the formulation's constants, model_type and the backbone's own keywords), holds the backbone as ``.model`` and
has EDM's parameter and buffer names, so ``build_from_edm(class_name, init_kwargs)`` followed by
``load_state_dict`` reproduces an EDM network from the contents of its pickle. Each is a diffusers ``ModelMixin``
+ ``ConfigMixin``: ``save_pretrained`` / ``from_pretrained`` (safetensors) reload the same function; the config
keeps the backbone's keywords in ``model_kwargs``.

The forward also takes what our sampler and trainer pass: class labels as int64 indices [B] (turned into EDM's
one-hot rows) or as EDM's one-hot float rows [B, label_dim]; augment_labels None means "no augmentation" (adding
the bias-free map of zeros, as EDM's training does for unaugmented images, changes nothing).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin

from diffmem.common.edm.networks.edm_unets import UNET_ARGS, UNETS, Arg, check_unet_arguments, short_repr
from diffmem.common.edm.precond import c_in, c_noise, c_out, c_skip, vp_sigma
from diffmem.common.errors import DiffmemError

# The keywords the preconditioner passes to the backbone itself (not settable through model_kwargs).
_INTERFACE_KEYS = ("img_resolution", "in_channels", "out_channels", "label_dim")


class EDMNetworkError(DiffmemError, ValueError):
    """An EDM class or keyword argument we cannot build; str() is one line naming it."""


def _plain(value):
    """A JSON-able copy of a keyword value (tuples -> lists, numpy scalars -> Python numbers)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_model_kwargs(owner: str, model_type: str, model_kwargs: dict) -> type:
    """The backbone class for model_type, or EDMNetworkError naming the unknown type or keyword."""
    if model_type not in UNETS:
        raise EDMNetworkError(f"{owner}: unknown model_type {model_type!r}; expected one of {', '.join(UNETS)}")
    cls = UNETS[model_type]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", *_INTERFACE_KEYS}
    for key in model_kwargs:
        if key not in accepted:
            raise EDMNetworkError(f"{owner}: unknown keyword argument {key!r} for {model_type} "
                                  f"(accepted: {', '.join(sorted(accepted))})")
    return cls


class _Preconditioned(ModelMixin, ConfigMixin):
    """What the four preconditioners share: the backbone, the config, the sampler-facing properties."""

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    def _setup(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, model_type: str,
               model_kwargs: dict | None, kwargs: dict, constants: dict, out_channels: int | None = None) -> None:
        """Record the config, set EDM's attributes and build ``self.model``."""
        merged = {**(model_kwargs or {}), **kwargs}
        owner = type(self).__name__
        unet = _check_model_kwargs(owner, model_type, merged)
        merged = _plain(merged)
        self.register_to_config(img_resolution=int(img_resolution), img_channels=int(img_channels),
                                label_dim=int(label_dim), use_fp16=bool(use_fp16), **_plain(constants),
                                model_type=model_type, model_kwargs=merged)
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.use_fp16 = bool(use_fp16)
        for key, value in constants.items():
            setattr(self, key, value)
        self.model = unet(img_resolution=self.img_resolution, in_channels=self.img_channels,
                          out_channels=out_channels or self.img_channels, label_dim=self.label_dim, **merged)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.img_channels, self.img_resolution, self.img_resolution)

    def round_sigma(self, sigma):
        """σ itself: only iDDPM's network has discrete noise levels."""
        return torch.as_tensor(sigma)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) at σ (Karras et al. 2022, Table 1), in σ's dtype."""
        raise NotImplementedError  # each formulation defines its own column of Table 1

    def _model_output(self, F_x: torch.Tensor) -> torch.Tensor:
        return F_x

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, force_fp32: bool = False) -> torch.Tensor:
        """D(x; σ) in fp32; the preconditioning is fp32 elementwise math (which a caller's autocast leaves in
        fp32), the backbone runs in fp16 only for use_fp16 networks on CUDA, as EDM's."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        k_skip, k_out, k_in, k_noise = self.coefficients(sigma)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        if class_labels is not None:
            class_labels = class_labels.to(x.device)
        F_x = self.model((k_in * x).to(dtype), k_noise.flatten(), class_labels=class_labels,
                         augment_labels=augment_labels)
        return k_skip * x + k_out * self._model_output(F_x).to(torch.float32)


class VPPrecond(_Preconditioned):
    """Variance-preserving preconditioning: c_skip 1, c_out −σ, c_in 1/√(σ²+1), c_noise (M−1) t(σ); the network's
    range is σ(ε_t) … σ(1) of the VP schedule (Table 1)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", model_kwargs: dict | None = None, **kwargs):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs, kwargs,
                    dict(beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t))
        # fp32, as EDM computes them (the sampler clamps its σ range to these values); on the CPU whatever the
        # default device, so that a network built on the meta device (to count parameters) has its range too.
        self.sigma_min = float(vp_sigma(torch.tensor(float(epsilon_t), device="cpu"), beta_d, beta_min))
        self.sigma_max = float(vp_sigma(torch.tensor(1.0, device="cpu"), beta_d, beta_min))

    def coefficients(self, sigma):
        return (c_skip(sigma, "vp"), c_out(sigma, "vp"), c_in(sigma, "vp"),
                c_noise(sigma, "vp", self.beta_d, self.beta_min, self.M))


class VEPrecond(_Preconditioned):
    """Variance-exploding preconditioning: c_skip 1, c_out σ, c_in 1, c_noise ln(σ/2) (Table 1)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet",
                 model_kwargs: dict | None = None, **kwargs):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs, kwargs,
                    dict(sigma_min=sigma_min, sigma_max=sigma_max))

    def coefficients(self, sigma):
        return c_skip(sigma, "ve"), c_out(sigma, "ve"), c_in(sigma, "ve"), c_noise(sigma, "ve")


def iddpm_alpha_bar(j: torch.Tensor, M: int, C_2: float) -> torch.Tensor:
    """ᾱ_j = sin²(π/2 · j / (M (C_2 + 1))), iDDPM's cosine schedule as EDM writes it (Karras et al. 2022, Table 1)."""
    return (0.5 * math.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2


def iddpm_sigma_table(M: int, C_1: float, C_2: float) -> torch.Tensor:
    """u_M = 0, u_{j−1} = sqrt((u_j² + 1) / max(ᾱ_{j−1}/ᾱ_j, C_1) − 1) for j = M … 1, in fp32 (Table 1, iDDPM)."""
    with torch.device("cpu"):  # CPU whatever the default device (see VPPrecond)
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):
            ratio = (iddpm_alpha_bar(j - 1, M, C_2) / iddpm_alpha_bar(j, M, C_2)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
    return u


class iDDPMPrecond(_Preconditioned):  # noqa: N801 (EDM's class name, which pickles refer to)
    """Improved-DDPM preconditioning: c_skip 1, c_out −σ, c_in 1/√(σ²+1), c_noise M − 1 − j(σ) with j the index
    of the nearest level of the table ``u``; the backbone predicts 2·C channels (ε and the variance), D uses the
    first C (Table 1)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",
                 model_kwargs: dict | None = None, **kwargs):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs, kwargs,
                    dict(C_1=C_1, C_2=C_2, M=M), out_channels=2 * int(img_channels))
        self.register_buffer("u", iddpm_sigma_table(M, C_1, C_2))
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def round_sigma(self, sigma, return_index: bool = False):
        """The nearest table level to each σ (or its index), in σ's dtype and shape. The nearest level is found
        with ``torch.cdist`` as EDM does, so a σ halfway between two levels rounds the way EDM's sampler does."""
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1),
                            self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def coefficients(self, sigma):
        index = self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip(sigma, "vp"), c_out(sigma, "vp"), c_in(sigma, "vp"), self.M - 1 - index

    def _model_output(self, F_x):
        return F_x[:, :self.img_channels]


class EDMPrecond(_Preconditioned):
    """EDM's preconditioning: c_skip σ_d²/(σ²+σ_d²), c_out σσ_d/√(σ²+σ_d²), c_in 1/√(σ²+σ_d²), c_noise ln(σ)/4
    (Table 1)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", model_kwargs: dict | None = None, **kwargs):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs, kwargs,
                    dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data))

    def coefficients(self, sigma):
        sd = self.sigma_data
        return c_skip(sigma, "edm", sd), c_out(sigma, "edm", sd), c_in(sigma, "edm", sd), c_noise(sigma, "edm")


PRECOND_CLASSES = {cls.__name__: cls for cls in (VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond)}

# iDDPM's σ table is computed level by level at construction (about 0.2 ms a level): Nichol & Dhariwal's M is 1000.
MAX_IDDPM_LEVELS = 10_000

_SIGMA = Arg("float", 0, 1e6)
# Every constructor argument of each preconditioner (the backbone's go on to UNET_ARGS; the test suite checks that
# each signature is covered).
PRECOND_ARGS: dict[str, dict[str, Arg]] = {
    name: dict(img_resolution=UNET_ARGS["SongUNet"]["img_resolution"], img_channels=Arg("int", 1, 1 << 12),
               label_dim=UNET_ARGS["SongUNet"]["label_dim"], use_fp16=Arg("bool"),
               model_type=Arg("choice", choices=tuple(UNETS)), **constants)
    for name, constants in (
        ("VPPrecond", dict(beta_d=Arg("float", 0, 1e6), beta_min=Arg("float", 0, 1e6), M=Arg("int", 1, 1 << 40),
                           epsilon_t=Arg("float", 1e-12, 1))),
        ("VEPrecond", dict(sigma_min=_SIGMA, sigma_max=_SIGMA)),
        ("iDDPMPrecond", dict(C_1=Arg("float", 1e-12, 1), C_2=Arg("float", 0, 1e6),
                              M=Arg("int", 1, MAX_IDDPM_LEVELS))),
        ("EDMPrecond", dict(sigma_min=_SIGMA, sigma_max=Arg("float", 0, 1e6, allow_inf=True),
                            sigma_data=Arg("float", 1e-12, 1e6))))}


def check_edm_arguments(class_name: str, init_kwargs: dict) -> None:
    """A one-line EDMNetworkError (EDMArchitectureError for the backbone's) unless ``init_kwargs`` (an EDM
    pickle's ``_init_kwargs``) are arguments of the named preconditioner and its backbone, each of its type and
    in its range, describing a network that can be built (``check_unet_arguments``): checked before anything is
    built, since a constructor given a string, a negative width or 10^6 blocks fails deep inside torch or builds
    until the process is killed."""
    if class_name not in PRECOND_CLASSES:
        raise EDMNetworkError(f"unknown EDM network class {short_repr(class_name)}; expected one of "
                              f"{', '.join(PRECOND_CLASSES)}")
    rules = PRECOND_ARGS[class_name]
    if "model_kwargs" in init_kwargs:
        raise EDMNetworkError(f"{class_name}: unknown keyword argument 'model_kwargs'")
    for key in ("img_resolution", "img_channels"):
        if key not in init_kwargs:
            raise EDMNetworkError(f"{class_name}: missing keyword argument {key!r}")
    own = {k: v for k, v in init_kwargs.items() if k in rules}
    for name, value in own.items():
        problem = rules[name].problem(class_name, name, value)
        if problem:
            raise EDMNetworkError(problem)
    values = {name: p.default for name, p in inspect.signature(PRECOND_CLASSES[class_name].__init__).parameters.items()
              if name in rules and p.default is not inspect.Parameter.empty} | own
    if "sigma_max" in values and not values["sigma_min"] < values["sigma_max"]:
        raise EDMNetworkError(f"{class_name}: sigma_min {values['sigma_min']:g} must be below sigma_max "
                              f"{values['sigma_max']:g}")
    backbone = {k: v for k, v in init_kwargs.items() if k not in rules}
    _check_model_kwargs(class_name, values["model_type"], backbone)
    channels = int(init_kwargs["img_channels"])
    check_unet_arguments(values["model_type"], dict(
        backbone, img_resolution=init_kwargs["img_resolution"], in_channels=channels,
        out_channels=2 * channels if class_name == "iDDPMPrecond" else channels,
        label_dim=init_kwargs.get("label_dim", 0)))


def build_from_edm(class_name: str, init_kwargs: dict) -> _Preconditioned:
    """Our freshly initialised network for an EDM preconditioner class name and the ``_init_kwargs`` stored in an
    EDM pickle (model_type and the backbone's keywords included, DiffMemorize's skip_connections too), ready
    for ``load_state_dict`` of that pickle's state; EDMNetworkError names an unknown class or keyword, or an
    argument of the wrong type or out of range (``check_edm_arguments``). Built under ``torch.device("meta")``
    it allocates nothing (what ``load_edm_pickle`` does to count the parameters before any weight is read in)."""
    check_edm_arguments(class_name, init_kwargs)
    return PRECOND_CLASSES[class_name](**init_kwargs)


def saved_init_kwargs(config: dict) -> dict:
    """EDM's ``_init_kwargs`` of a saved config of ours (``save_pretrained``'s config.json): the backbone's keywords
    from ``model_kwargs`` flattened in, diffusers' own ``_`` keys dropped."""
    plain = {k: v for k, v in config.items() if not str(k).startswith("_") and k != "model_kwargs"}
    model_kwargs = config.get("model_kwargs") or {}
    if not isinstance(model_kwargs, dict):
        raise EDMNetworkError(f"model_kwargs must be a dict of the backbone's keywords, got {short_repr(model_kwargs)}")
    return {**plain, **model_kwargs}


def edm_parameter_count(class_name: str, init_kwargs: dict) -> int:
    """The parameter count of the network ``build_from_edm`` would build, counted on the meta device (nothing
    allocated, the arguments checked first)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_from_edm(class_name, init_kwargs).parameters())


def load_pretrained(path, class_name: str) -> _Preconditioned:
    """``from_pretrained`` of the named preconditioner class (a saved config's ``_class_name``)."""
    if class_name not in PRECOND_CLASSES:
        raise EDMNetworkError(f"unknown network class {class_name!r}; expected one of {', '.join(PRECOND_CLASSES)}")
    return PRECOND_CLASSES[class_name].from_pretrained(path)
