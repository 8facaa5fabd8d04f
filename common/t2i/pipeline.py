"""Loading Stable-Diffusion-shaped pipelines, and building tiny (or SD-v1-sized) ones offline.

Every CLI loads models through :func:`load_pipeline`, i.e. the real ``from_pretrained`` path on a Hub id or a
local folder. Tests, the demo and the benchmarks feed it folders written by :func:`build_pipeline`, which
assembles the same classes Stable Diffusion v1 ships (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, the
real CLIP tokenizer, a PNDM scheduler) with random weights.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.common.errors import DiffmemError
from diffmem.common.hub import failure_cause
from diffmem.common.safe_load import refusal_line
from diffmem.common.t2i.options import DTYPE_NAMES, SCHEDULERS
from diffmem.common.t2i.tokenizer import BOS_ID, EOS_ID, MODEL_MAX_LENGTH, VOCAB_SIZE, build_clip_tokenizer

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))

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


class ModelLoadError(DiffmemError, RuntimeError):
    """A model id or folder that cannot be loaded; the message is one line meant for the user."""


def parse_dtype(name: str) -> torch.dtype:
    """torch dtype for a CLI name (fp32, fp16, bf16)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


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


# What StableDiffusionPipeline loads from a folder, each part from its own subfolder with this config file (the
# tokenizer's files vary: vocab.json and merges.txt, or tokenizer.json).
PIPELINE_PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json", "tokenizer": None,
                  "scheduler": "scheduler_config.json"}
PIPELINE_LAYOUT = ("a diffusers pipeline folder holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and "
                   "scheduler/")


# The current Stable Diffusion families this arm does not speak yet: loaded as a StableDiffusionPipeline, SDXL's
# UNet fails deep in its forward (no added_cond_kwargs), and the transformer families have no unet/ at all.
OTHER_FAMILIES = {"StableDiffusionXLPipeline": "SDXL", "StableDiffusion3Pipeline": "SD3", "FluxPipeline": "Flux",
                  "PixArtAlphaPipeline": "PixArt-α", "PixArtSigmaPipeline": "PixArt-Σ"}
FAMILY_LIMIT = ("the text-to-image arm detects, explains, mitigates and fine-tunes Stable Diffusion 1.x/2.x pipelines "
                "(StableDiffusionPipeline: one CLIP encoder, a UNet) only")


def other_family(class_name: str | None, unet_config=None) -> str | None:
    """The family of a pipeline this arm cannot run (by its model_index.json class, or an SDXL-style UNet that
    needs added text and time embeddings), else None."""
    if class_name in OTHER_FAMILIES:
        return f"{class_name} ({OTHER_FAMILIES[class_name]})"
    if unet_config is not None and getattr(unet_config, "addition_embed_type", None) is not None:
        return f"a UNet with added {unet_config.addition_embed_type} embeddings (SDXL-style)"
    return None


def check_pipeline_folder(folder: Path, name: str, unet_id: str | None = None) -> None:
    """A local pipeline folder's parts, checked before diffusers reads it: diffusers reports a missing unet/ as a
    missing config.json of the pipeline folder itself."""
    try:
        class_name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        class_name = None  # diffusers' own reading of the file reports what is wrong with it
    family = other_family(class_name)
    if family is not None:
        raise ModelLoadError(f"{name}: a {family} pipeline; {FAMILY_LIMIT}")
    for part, config in PIPELINE_PARTS.items():
        if part == "unet" and unet_id is not None:
            continue  # the UNet comes from --unet_id
        if not (folder / part).is_dir():
            raise ModelLoadError(f"{name}: no {part}/ folder; {PIPELINE_LAYOUT}"
                                 + (" (or pass --unet_id)" if part == "unet" else ""))
        if config is not None and not (folder / part / config).is_file():
            raise ModelLoadError(f"{name}: no {part}/{config}; {PIPELINE_LAYOUT}, each part with its config and "
                                 f"weights as save_pretrained writes them")


def _loaded_file(exc: BaseException) -> str | None:
    """The file torch.load was reading when exc was raised (its ``f`` argument, from the traceback), if a path."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "load" and frame.f_globals.get("__name__") == "torch.serialization":
            f = frame.f_locals.get("f")
            found = str(f) if isinstance(f, (str, Path)) else found
        tb = tb.tb_next
    return found


def _refused_pickle(exc: BaseException) -> str | None:
    """One line (common.safe_load's) for a pickled weights file that torch.load(weights_only=True) refused somewhere
    in exc's chain: the file and the refused global; None when no refusal is in the chain. torch's own message spans
    paragraphs, among them the advice to load with weights_only=False, which would run the pickle's code."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    refusal = next((e for e in chain if isinstance(e, pickle.UnpicklingError)), None)
    if refusal is None:
        return None
    # diffusers names the file in its own message; transformers does not, but torch.load's frame holds it.
    file = _loaded_file(refusal) or next(
        (m.group(1) for e in chain for m in [re.search(r"checkpoint file for '([^']+)'", str(e))] if m), None)
    return refusal_line(file or "a weights file", refusal)


class _DropLoggedFetchError(logging.Filter):
    """diffusers logs "An error occurred while trying to fetch DIR" when a part has .bin weights but no safetensors,
    then loads the .bin (or fails, and we report that on one line): the logged line is noise either way."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("An error occurred while trying to fetch")


@contextmanager
def _quiet_fetch_errors():
    logger = logging.getLogger("diffusers.models.modeling_utils")
    drop = _DropLoggedFetchError()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_pipeline(
    model_id: str,
    unet_id: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    variant: str | None = None,
):
    """StableDiffusionPipeline from a Hub id or local folder; optionally with the UNet of another folder.

    Raises ModelLoadError with a one-line reason when the model cannot be found or read: the model and the
    cause (a Hub error's own first line, never a pointer at a stack trace the user does not see).
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from huggingface_hub.errors import EntryNotFoundError

    # A Hub id is "owner/name"; anything else (absolute, relative with dots, deeper) is a local folder.
    is_hub_id = model_id.count("/") == 1 and not model_id.startswith((".", "/", "~"))
    path = Path(model_id).expanduser()
    if path.exists() and not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{model_id}: not a diffusers pipeline folder (no model_index.json)")
    if not path.exists() and not is_hub_id:
        raise ModelLoadError(f"{model_id}: no such model folder (expected a local folder or a Hub id owner/name)")
    if path.is_dir():
        check_pipeline_folder(path, model_id, unet_id)
    kwargs = dict(dtype=dtype, revision=revision, variant=variant, safety_checker=None,
                  requires_safety_checker=False)
    try:
        with _quiet_fetch_errors():
            if unet_id is not None:
                # Accept a bare UNet folder or any folder holding one under unet/ (pipelines, trainer checkpoints).
                sub = "unet" if (Path(unet_id) / "unet" / "config.json").is_file() else None
                kwargs["unet"] = UNet2DConditionModel.from_pretrained(unet_id, subfolder=sub, dtype=dtype)
            pipe = StableDiffusionPipeline.from_pretrained(str(path) if path.exists() else model_id, **kwargs)
    except (OSError, ValueError, pickle.UnpicklingError, EntryNotFoundError) as exc:  # Hub errors are OSErrors
        which = unet_id if unet_id is not None and "unet" not in kwargs else model_id
        refused = _refused_pickle(exc)
        if refused is not None:
            raise ModelLoadError(refused) from exc
        raise ModelLoadError(f"{which}: cannot load model ({failure_cause(exc)})") from exc
    family = other_family(None, pipe.unet.config)  # a Hub id's folder was not read before loading
    if family is not None:
        raise ModelLoadError(f"{model_id}: {family}; {FAMILY_LIMIT}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class DenoiserParts:
    """What scoring needs from a pipeline: the denoiser, the text side and the latent geometry."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    latent_shape: tuple[int, int, int]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def denoiser_parts(pipe, scheduler: str = "ddim") -> DenoiserParts:
    """The parts of a pipeline used for scoring, with its scheduler swapped to DDIM (as Wen et al. do)."""
    from diffusers import DDIMScheduler

    sched = pipe.scheduler
    if scheduler == "ddim":
        sched = DDIMScheduler.from_config(sched.config)
    elif scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
    size = pipe.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return DenoiserParts(
        unet=pipe.unet,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=sched,
        latent_shape=(pipe.unet.config.in_channels, *size),
    )


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
