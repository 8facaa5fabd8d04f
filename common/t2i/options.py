"""The choice lists and model-dependent defaults of the text-to-image options, and the options the text-to-image
CLIs share, in a module without torch: a CLI's ``--help`` and its argument checks run before torch is imported,
and the library modules that act on a choice take it from here."""

import argparse

from diffmem.common.settings import option

DTYPE_NAMES = ("fp32", "fp16", "bf16")  # common.t2i.pipelines.DTYPES: the weights' dtype
SCHEDULERS = ("ddim", "pipeline")  # common.t2i.pipelines.denoiser_parts: DDIM (Wen et al.) or the pipeline's own
# The settings that are recorded with a run's results only when given, so runs from before they existed resume.
GEOMETRY_FIELDS = ("scheduler", "height", "width")
LATENT_MODES = ("per_prompt", "shared")  # common.t2i.text_noise.initial_latents: seed gen_seed + row, or gen_seed
DETECTORS = ("wen", "anisotropy", "sharpness")  # what detect/screen.py scores captions with
# detect_mem's: those and the Early Detection (ICML 2026) and Broken Memories (KDD 2026) detectors (broken needs a
# calibration run first, so the screen does not offer it).
ALL_DETECTORS = (*DETECTORS, "grad_diff", "dsm", "broken")
# Somepalli et al.'s prompt augmentations (common.t2i.prompt_aug; the rand_* baselines of --method)
PROMPT_AUG_STYLES = ("rand_word_add", "rand_numb_add", "rand_word_repeat")  # common.t2i.detection.score_prompts
WRT_CHOICES = ("prompt_embeds", "token_embeds")  # common.t2i.explain: what token significance differentiates
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a UNet predicts (common.t2i.text_noise.epsilon_from_output)
# (γ_N, γ_C) of Asthana & Belagiannis's code per prediction type: SD v1 (ε-prediction) and SD 2 (v-prediction).
ANISOTROPY_WEIGHTS = {"epsilon": (1.0, 2.0), "v_prediction": (1.0, 0.1)}

# The options (the model, the prompts, the generations) that mean the same in detect/detect_mem.py,
# detect/explain_tokens.py and the mitigation CLIs (common/t2i/mitigation/run.py, mitigate/inference_mem.py):
# name -> option() arguments, so each default and help is written once, here.
SHARED_OPTIONS = {
    "model_id": dict(flag="--model", aliases=("--model_id", "--pretrained_model_name_or_path"),
                     help="Hub id or local pipeline folder (SD 1/2, SDXL, SD3/3.5, Flux.1, PixArt-α/Σ)"),
    "unet_id": dict(default=None, type=str,
                    help="folder of a UNet (or of a pipeline/checkpoint with unet/) to use instead"),
    "revision": dict(default=None, type=str,
                     help="Hub revision of --model: a branch, tag or commit hash, which pins it (None: the default "
                          "branch)"),
    "variant": dict(default=None, type=str, help="weights variant, e.g. fp16"),
    "dtype": dict(default="fp32", choices=DTYPE_NAMES,
                  help="weights of the diffusion model (a text embedding optimised or differentiated stays fp32)"),
    "split": dict(default="train", help="split of a Hugging Face dataset"),
    "column": dict(default=None, type=str, help="caption column of a Hugging Face dataset (None: caption/prompt/text)"),
    "start": dict(default=0, help="first dataset row"),
    "end": dict(default=None, type=int, help="one past the last dataset row"),
    "num_images_per_prompt": dict(default=4, help="generations G per prompt"),
    "gen_seed": dict(default=0, flag="--seed", aliases=("--gen_seed",),
                     help="row i starts from the latents of seed SEED + i"),
    "latents": dict(default="per_prompt", choices=LATENT_MODES,
                    help="shared: every prompt starts from seed SEED's latents"),
    "num_inference_steps": dict(default=50, help="DDIM steps of the trajectory"),
    "guidance_scale": dict(default=7.5, help="classifier-free guidance scale of the trajectory (Flux: true CFG "
                                             "against the empty prompt, as diffusers' true_cfg_scale)"),
    "scheduler": dict(default=None, type=str, choices=SCHEDULERS,
                      help="ddim: the model's schedule as DDIM (Wen et al.); pipeline: the folder's own scheduler "
                           "(None: ddim for SD 1/2, SDXL and PixArt, pipeline (FlowMatchEuler) for SD3 and Flux)"),
    "height": dict(default=None, type=int, help="image height in pixels (None: the model's default, sample_size x "
                                                "vae_scale_factor)"),
    "width": dict(default=None, type=int, help="image width in pixels (None: the model's default)"),
}


def shared_option(name: str):
    """The settings-dataclass field of the shared option ``name`` (a key of SHARED_OPTIONS)."""
    return option(**SHARED_OPTIONS[name])


def batch_size_option(default: int):
    """``--batch_size``: its meaning is shared, its default each CLI's own, since the memory a prompt needs is not
    (detect_mem's forward passes without gradients take 32 prompts; explain_tokens' and the mitigations' backward
    passes 4)."""
    return option(default, help="prompts per batch (memory grows with batch_size x num_images_per_prompt)")


def prompt_aug_method(text: str) -> str:
    """An option type: Wen et al.'s ``--prompt_aug_style STYLE``, which is ``--method STYLE`` here."""
    if text not in PROMPT_AUG_STYLES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(PROMPT_AUG_STYLES)}, got {text!r}")
    return text
