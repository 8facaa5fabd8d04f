"""The detection protocols of the memorization papers as presets: each paper's model, prompt sets, steps,
generations, latents, detectors and TPR rule, with the numbers it published (cited) to print beside ours.

Torch-free: ``detect/benchmark.py`` checks its arguments against these before anything heavy is imported. Where a
paper leaves a setting open or its code differs from the text, the preset follows the code and ``notes`` says so
(docs/benchmark.md has the sources line by line).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffmem.common.hub import REMOVED_MODELS

SD14 = "CompVis/stable-diffusion-v1-4"
SD15_MIRROR = REMOVED_MODELS["runwayml/stable-diffusion-v1-5"][1][0]  # the id Early Detection used is removed

# Jeon et al.'s sd1_mem.txt is Webster's 500 (Wen et al.'s jsonl, same order); their sd1_nmem.txt (= sd2_nmem.txt)
# is shipped as Asthana & Belagiannis's byte-identical copy.
WEBSTER_500 = "webster_sd1_500"
JEON_NONMEM_500 = "asthana_sd2_nmem"
MEMATTN_NONMEM_500 = "memattn_group_nomem500"
MEMBENCH_SD1 = "membench_sd1_final"


@dataclass(frozen=True)
class Published:
    """One number pair a paper printed: AUC and TPR at the protocol's FPR, on ``model``, from ``source``."""

    model: str
    auc: float
    tpr: float
    source: str


@dataclass(frozen=True)
class ProtocolRun:
    """One detector setting of a protocol: scored on both prompt sets with the same latents rule."""

    key: str  # the run's name in the table and in DIR/{key}.json
    detector: str
    num_images_per_prompt: int
    target_steps: str = "0"  # detect_mem's --target_steps: a prefix of the trajectory (wen only)
    options: tuple[tuple[str, object], ...] = ()  # further DetectConfig fields (e.g. ("dsm_step", 1))
    published: tuple[Published, ...] = ()


@dataclass(frozen=True)
class Protocol:
    name: str
    paper: str
    model_id: str  # the paper's model as a live Hub id (the default of --model_id)
    memorized: str  # registry sets (set:NAME) scored as positives and negatives
    non_memorized: str
    num_inference_steps: int
    guidance_scale: float
    latents: str  # "shared": every prompt starts from the same G latents (Jeon's and Asthana's set_seed per prompt)
    tpr_rule: str  # common.metrics.TPR_RULES
    fpr_targets: tuple[float, ...]
    runs: tuple[ProtocolRun, ...]
    notes: tuple[str, ...] = field(default=())

    def run(self, key: str) -> ProtocolRun:
        for r in self.runs:
            if r.key == key:
                return r
        raise KeyError(key)


JEON_TABLE = "Jeon, Kim & No, ICML 2025, Table 1"
ASTHANA_TABLE = "Asthana & Belagiannis, ICLR 2026, Table 1 (as quoted by DiffAudit-Research @0b371e8)"
EARLY_README = "randomnameforicml/icml-2026 @fe315bb, README 'Main Results (N=500+500)'"
WEN_NOTEBOOK = "YuxinWenRick/diffusion_memorization @c8fe471, examples/det_mem_viz.ipynb cell 5 output"
WEN_PAPER = "Wen et al., ICLR 2024 (setting not stated in the quoted text)"


def _jeon(model: str, auc: float, tpr: float) -> Published:
    return Published(model, auc, tpr, JEON_TABLE)


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol(
        "wen24", "Wen, Liu, Chen & Lyu, Detecting, Explaining, and Mitigating Memorization in Diffusion Models, "
        "ICLR 2024", SD14, WEBSTER_500, MEMATTN_NONMEM_500, 50, 7.5, "per_prompt", "strict", (0.01,),
        (ProtocolRun("wen_step0_g1", "wen", 1),
         ProtocolRun("wen_step0_g4", "wen", 4, published=(Published("SD v1.4", 0.960, 0.760, WEN_PAPER),)),
         ProtocolRun("wen_all_g4", "wen", 4, "all", published=(Published("SD v1.4", 0.994, 0.982, WEN_NOTEBOOK),))),
        ("The paper's 2 000 non-memorized prompts were never released (Wen et al. issue #1): MemAttn's 500 "
         "(group_nomem500, MIT) stand in; the notebook's 0.994/0.982 used 500 Lexica prompts "
         "(Gustavosta/Stable-Diffusion-Prompts).",
         "Wen et al. draw x_T on CUDA with seed i+4 in fp16; diffmem draws it on the CPU with seed i (sample i is "
         "the same on any device), so generations differ and so, slightly, do the numbers.")),
    Protocol(
        "jeon25", "Jeon, Kim & No, Understanding and Mitigating Memorization in Generative Models via Sharpness of "
        "Probability Landscapes, ICML 2025", SD14, WEBSTER_500, JEON_NONMEM_500, 50, 7.5, "shared", "nearest_first",
        (0.01, 0.03),
        (ProtocolRun("sharpness_g1", "sharpness", 1, published=(_jeon("SD v1.4", 0.987, 0.908),
                                                                _jeon("SD v2.0", 0.959, 0.740))),
         ProtocolRun("sharpness_g4", "sharpness", 4, published=(_jeon("SD v1.4", 0.998, 0.982),
                                                                _jeon("SD v2.0", 0.991, 0.895))),
         ProtocolRun("wen_step0_g1", "wen", 1, published=(_jeon("SD v1.4", 0.976, 0.896),
                                                          _jeon("SD v2.0", 0.948, 0.739))),
         ProtocolRun("wen_step0_g4", "wen", 4, published=(_jeon("SD v1.4", 0.992, 0.944),
                                                          _jeon("SD v2.0", 0.980, 0.876))),
         ProtocolRun("wen_steps5_g4", "wen", 4, "0-4", published=(_jeon("SD v1.4", 0.997, 0.978),
                                                                  _jeon("SD v2.0", 0.984, 0.917)))),
        ("Every prompt starts from the same G latents (their set_seed(42) before each prompt): --latents shared.",
         "TPR is numpy's argmin over |FPR - x| (their detect_eval.py); only TPR@1% is published.",
         "SD v2.0 (stabilityai/stable-diffusion-2) is removed from the Hub; its rows are printed for reference.")),
    Protocol(
        "asthana26", "Asthana & Belagiannis, Detecting and Mitigating Memorization in Diffusion Models through "
        "Anisotropy of the Log-Probability, ICLR 2026", SD14, WEBSTER_500, JEON_NONMEM_500, 50, 7.5, "shared",
        "nearest_first", (0.01, 0.03),
        (ProtocolRun("anisotropy_g1", "anisotropy", 1,
                     published=(Published("SD v1.4", 0.994, 0.935, ASTHANA_TABLE),
                                Published("SD v2.0", 0.953, 0.791, ASTHANA_TABLE))),
         ProtocolRun("anisotropy_g4", "anisotropy", 4,
                     published=(Published("SD v1.4", 0.999, 0.984, ASTHANA_TABLE),
                                Published("SD v2.0", 0.981, 0.890, ASTHANA_TABLE)))),
        ("Their prompt files are Jeon et al.'s, byte for byte; latents shared as in Jeon's code.",
         "On SD 2 their channel cosine is of raw v-predictions; diffmem's is in ε units (docs/detection.md).")),
    Protocol(
        "early26", "Early Detection of Memorization in Diffusion Models, ICML 2026 (randomnameforicml/icml-2026)",
        SD15_MIRROR, WEBSTER_500, JEON_NONMEM_500, 50, 7.5, "per_prompt", "at_most", (0.01,),
        (ProtocolRun("grad_diff_g1", "grad_diff", 1,
                     published=(Published("SD 1.5", 0.9759, 0.8280, EARLY_README),)),
         ProtocolRun("dsm01_g1", "dsm", 1, published=(Published("SD 1.5", 0.9647, 0.8340, EARLY_README),)),
         ProtocolRun("dsm12_g1", "dsm", 1, options=(("dsm_step", 1),),
                     published=(Published("SD 1.5", 0.9745, 0.8580, EARLY_README),)),
         ProtocolRun("wen_step0_g1", "wen", 1, published=(Published("SD 1.5", 0.9406, 0.7340, EARLY_README),))),
        ("Their 500 + 500 files are not shipped; their 10-row samples are the first rows of Jeon et al.'s files, so "
         "those are used (an inference, not stated by the authors).",
         "runwayml/stable-diffusion-v1-5 is removed from the Hub; the default is its community mirror.",
         "Their Wen Step 0 is the squared norm at one generation: the same ranking, the same AUC.")),
    Protocol(
        "membench", "Hong, Oh & Sung, MemBench: Memorized Image Trigger Prompt Dataset for Diffusion Models, "
        "TMLR 2025", SD14, MEMBENCH_SD1, MEMATTN_NONMEM_500, 50, 7.5, "per_prompt", "strict", (0.01,),
        (ProtocolRun("wen_step0_g4", "wen", 4), ProtocolRun("anisotropy_g4", "anisotropy", 4)),
        ("MemBench benchmarks mitigation only: it has no detection protocol and no published detection numbers. "
         "This preset (its 3 000 SD1 trigger prompts against MemAttn's 500 non-memorized) is diffmem's own.",)),
)}


def protocol(name: str) -> Protocol:
    """The preset called ``name``; KeyError with the known names otherwise."""
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
