"""Loading a text-to-image pipeline of any family the arm speaks, from a Hub id or a local folder.

Every CLI loads through :func:`load_pipeline`: ``model_index.json`` names the pipeline class, the class names the
family (:data:`FAMILIES`), and the family's own diffusers class loads it (``from_pretrained``, the real path).
Tests, the demo and the benchmarks feed it folders written by :mod:`.build` and :mod:`.tiny`.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from diffmem.common.errors import DiffmemError
from diffmem.common.hub import failure_cause, is_hub_id, model_source, removed_model_problem
from diffmem.common.safe_load import refusal_line
from diffmem.common.t2i.options import DTYPE_NAMES
from diffmem.common.t2i.pipelines.family import Family
from diffmem.common.t2i.pipelines.flux import FluxFamily
from diffmem.common.t2i.pipelines.pixart import PixArtFamily
from diffmem.common.t2i.pipelines.sd import SDFamily
from diffmem.common.t2i.pipelines.sd3 import SD3Family
from diffmem.common.t2i.pipelines.sdxl import SDXLFamily

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))

# Every family the arm speaks, by the pipeline classes its model_index.json names.
FAMILIES: dict[str, type[Family]] = {f.key: f for f in (SDFamily, SDXLFamily, SD3Family, FluxFamily, PixArtFamily)}
FAMILY_OF_CLASS = {cls: f for f in FAMILIES.values() for cls in f.pipeline_classes}
FAMILY_LIMIT = ("the text-to-image arm speaks " + ", ".join(f"{f.label} ({'/'.join(f.pipeline_classes)})"
                                                            for f in FAMILIES.values()))
PIPELINE_LAYOUT = "a diffusers pipeline folder holds model_index.json and one folder per part it names"


class ModelLoadError(DiffmemError, RuntimeError):
    """A model id or folder that cannot be loaded; the message is one line meant for the user."""


def parse_dtype(name: str) -> torch.dtype:
    """torch dtype for a CLI name (fp32, fp16, bf16)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def family_class(class_name: str | None, name: str) -> type[Family]:
    """The family of a pipeline class (model_index.json's _class_name); one line when the arm does not speak it."""
    if class_name not in FAMILY_OF_CLASS:
        raise ModelLoadError(f"{name}: a {class_name or 'pipeline of no class'} pipeline; {FAMILY_LIMIT}")
    return FAMILY_OF_CLASS[class_name]


def family_of(pipe) -> type[Family]:
    """The family of a loaded pipeline (by its class, or a subclass of a known one)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILY_OF_CLASS:
            return FAMILY_OF_CLASS[cls.__name__]
    raise ModelLoadError(f"a {type(pipe).__name__} pipeline; {FAMILY_LIMIT}")


def _part_config(library_class: list) -> str | None:
    """The config file a part's folder must hold (tokenizers' files vary: none is required)."""
    cls = str(library_class[1] or "")
    if "Tokenizer" in cls:
        return None
    return "scheduler_config.json" if "Scheduler" in cls else "config.json"


def read_model_index(folder: Path, name: str) -> dict:
    """model_index.json of a local pipeline folder, read; one line when it is not a JSON object."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{name}: cannot read model_index.json ({exc})") from exc
    if not isinstance(index, dict):
        raise ModelLoadError(f"{name}/model_index.json: expected a JSON object")
    return index


def check_pipeline_folder(folder: Path, name: str, unet_id: str | None = None) -> type[Family]:
    """A local pipeline folder's family and parts, checked before diffusers reads it: diffusers reports a missing
    part as a missing config.json of the pipeline folder itself."""
    index = read_model_index(folder, name)
    family = family_class(index.get("_class_name"), name)
    # Metadata, and the optional parts saved as None (safety_checker, a dropped T5), are no folders.
    parts = {part: lib for part, lib in index.items()
             if not part.startswith("_") and isinstance(lib, list) and None not in lib[:2]}
    layout = f"{PIPELINE_LAYOUT}: {', '.join(p + '/' for p in parts)}"
    for part, library_class in parts.items():
        if part == "unet" and unet_id is not None:
            continue  # the UNet comes from --unet_id
        if not (folder / part).is_dir():
            raise ModelLoadError(f"{name}: no {part}/ folder; {layout}"
                                 + (" (or pass --unet_id)" if part == "unet" else ""))
        config = _part_config(library_class)
        if config is not None and not (folder / part / config).is_file():
            raise ModelLoadError(f"{name}: no {part}/{config}; {layout}, each part with its config and weights as "
                                 f"save_pretrained writes them")
    return family


def hub_family(model_id: str, revision: str | None) -> type[Family]:
    """The family of a Hub model, from its model_index.json alone (one small download, or the cache). A model the
    Hub removed is one line with its mirrors, before anything is downloaded."""
    removed = removed_model_problem(model_id, revision)
    if removed is not None:
        raise ModelLoadError(f"{model_id}: {removed}")
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index = DiffusionPipeline.load_config(model_id, revision=revision)
    except (OSError, ValueError, EntryNotFoundError) as exc:
        raise ModelLoadError(f"{model_id}: cannot load model ({failure_cause(exc)})") from exc
    return family_class(index.get("_class_name"), model_id)


def model_family(model_id: str, revision: str | None = None) -> type[Family]:
    """The family of a model before loading it: a folder's model_index.json (its parts checked), or a Hub model's."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{model_id}: not a diffusers pipeline folder (no model_index.json)")
        return check_pipeline_folder(path, model_id)
    return hub_family(model_id, revision)


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
    """The pipeline of a Hub id or local folder, as its family's diffusers class; optionally with the UNet of
    another folder (the UNet families).

    Raises ModelLoadError with a one-line reason when the model cannot be found or read: the model and the
    cause (a Hub error's own first line, never a pointer at a stack trace the user does not see).

    The pipeline's ``model_source`` is what a run records of it (common.hub.model_source): the id, the revision
    asked for and the commit it was loaded at (None for a folder).
    """
    import diffusers
    from huggingface_hub.errors import EntryNotFoundError

    path = Path(model_id).expanduser()
    if path.exists() and not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{model_id}: not a diffusers pipeline folder (no model_index.json)")
    if not path.exists() and not (model_id.count("/") == 1 and is_hub_id(model_id)):
        raise ModelLoadError(f"{model_id}: no such model folder (expected a local folder or a Hub id owner/name)")
    family = check_pipeline_folder(path, model_id, unet_id) if path.is_dir() else hub_family(model_id, revision)
    if unet_id is not None and not family.cross_attention_unet:
        raise ModelLoadError(f"--unet_id {unet_id}: {family.label} has no UNet (its denoiser is a transformer)")
    kwargs = dict(dtype=dtype, revision=revision, variant=variant)
    if family is SDFamily:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with _quiet_fetch_errors():
            if unet_id is not None:
                # Accept a bare UNet folder or any folder holding one under unet/ (pipelines, trainer checkpoints).
                sub = "unet" if (Path(unet_id) / "unet" / "config.json").is_file() else None
                kwargs["unet"] = diffusers.UNet2DConditionModel.from_pretrained(unet_id, subfolder=sub, dtype=dtype)
            pipeline_class = getattr(diffusers, family.pipeline_classes[0])
            if path.is_dir():  # the folder's own class (PixArt-α or -Σ)
                pipeline_class = getattr(diffusers, read_model_index(path, model_id)["_class_name"])
            pipe = pipeline_class.from_pretrained(str(path) if path.exists() else model_id, **kwargs)
    except (OSError, ValueError, pickle.UnpicklingError, EntryNotFoundError) as exc:  # Hub errors are OSErrors
        which = unet_id if unet_id is not None and "unet" not in kwargs else model_id
        refused = _refused_pickle(exc)
        if refused is not None:
            raise ModelLoadError(refused) from exc
        raise ModelLoadError(f"{which}: cannot load model ({failure_cause(exc)})") from exc
    unet = getattr(pipe, "unet", None)
    if family is SDFamily and getattr(unet.config, "addition_embed_type", None) is not None:
        name = unet_id if unet_id is not None else model_id
        raise ModelLoadError(f"{name}: a UNet with added {unet.config.addition_embed_type} embeddings (SDXL-style) "
                             f"in a StableDiffusionPipeline; load it as the SDXL pipeline it belongs to")
    pipe.set_progress_bar_config(disable=True)
    pipe.model_source = model_source(model_id, revision)
    return pipe.to(device)
