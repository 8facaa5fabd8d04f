"""A training run's folder and its checkpoints: the file names (torch-free: the EMM sweep reads them), finding the
checkpoint to resume, the settings a run binds, and reading and writing a checkpoint's own files without running
code (the models in ``save_pretrained`` format, the EMA as safetensors + JSON).

Resume is exact: a checkpoint holds the models (``<name>/``, plus ``<name>_ema/``), the EMA state, optimizer, LR
scheduler, grad scaler, RNG states and ``trainer_state.json`` (step and the settings that fix the data order).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from diffmem.common.results import bind_run_settings, check_run_settings, jsonable, write_json_atomic
from diffmem.common.safe_load import UnsafeFileError, safe_torch_load
from diffmem.common.training.config import (
    TRAIN_FREE_FIELDS,
    TrainConfig,
    TrainSetupError,
    launched_processes,
    resolved_mixed_precision,
)

if TYPE_CHECKING:
    import torch


CHECKPOINT_PREFIX = "checkpoint-"


TRAIN_SUMMARY = "train_summary.json"  # written once a training has finished


TRAINER_STATE = "trainer_state.json"


TRAIN_LOG = "train_log.jsonl"


TRAINING_OPTIONS = "training_options.json"


# The EMA inside a checkpoint: the shadow weights (safetensors, keyed <model>.<parameter>) and the scalars (JSON).
# Neither format can carry code, unlike the pickle Accelerate writes for a registered object, which its
# load_custom_state reads with weights_only=False.
EMA_WEIGHTS = "ema_shadow.safetensors"


EMA_STATE = "ema_state.json"


LEGACY_EMA_STATE = "custom_checkpoint_0.pkl"  # checkpoints written before EMA_STATE: read weights-only


def list_checkpoints(output_dir: str | Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, path) of ``checkpoint-N`` folders in step order; complete ones have trainer_state.json."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        if m and p.is_dir() and (not complete_only or (p / TRAINER_STATE).is_file()):
            out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: ``latest`` (None when there is none yet) or an explicit path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if not path.is_dir() and (Path(output_dir) / resume).is_dir():
        path = Path(output_dir) / resume  # the diffusers example accepts a bare checkpoint-N name
    if not (path / TRAINER_STATE).is_file():
        raise TrainSetupError(f"{resume}: not a complete diffmem checkpoint (no {TRAINER_STATE})")
    return path


def save_module(module: torch.nn.Module, path: Path) -> None:
    """A trained module in its library's ``save_pretrained`` format, else its state dict as ``model.pt``."""
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(path)
    else:
        import torch

        path.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), path / "model.pt")


def load_module(module: torch.nn.Module, path: Path) -> None:
    """Load what :func:`save_module` wrote into module (a ``model.pt`` read weights-only)."""
    # from_pretrained handles each library's key layout (e.g. transformers 5 drops the text_model. prefix).
    if hasattr(module, "save_pretrained") and hasattr(type(module), "from_pretrained"):
        loaded = type(module).from_pretrained(path)
        state = loaded.state_dict()
        del loaded
    else:
        state = safe_torch_load(path / "model.pt")
    module.load_state_dict(state)


def save_ema_state(ema, named_params: list[tuple[str, torch.nn.Parameter]], folder: Path) -> None:
    """The EMA's shadow weights as safetensors keyed by parameter name, its scalars as JSON."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    if len(shadow) != len(named_params):
        raise TrainSetupError(f"the EMA holds {len(shadow)} tensors for {len(named_params)} trainable parameters")
    save_file({name: s.detach().cpu().contiguous() for (name, _), s in zip(named_params, shadow)},
              str(folder / EMA_WEIGHTS))
    write_json_atomic(folder / EMA_STATE, state)


def load_ema_state(ema, named_params: list[tuple[str, torch.nn.Parameter]], folder: Path) -> None:
    """Restore the EMA from a checkpoint (its safetensors and JSON, or a legacy pickle read weights-only); a file
    that is not what it should be is one line (UnsafeFileError / TrainSetupError)."""
    weights, scalars = folder / EMA_WEIGHTS, folder / EMA_STATE
    if scalars.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = json.loads(scalars.read_text())
            tensors = load_file(str(weights))
        except (OSError, ValueError, SafetensorError) as exc:
            raise UnsafeFileError(f"{folder}: unreadable EMA state ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}); expected {EMA_STATE} and "
                                  f"{EMA_WEIGHTS} as this trainer writes them") from None
        names = [n for n, _ in named_params]
        if not isinstance(state, dict) or sorted(tensors) != sorted(names):
            raise UnsafeFileError(f"{weights}: holds other tensors than this run's {len(names)} trainable "
                                  f"parameters; expected the EMA of this model")
        state["shadow_params"] = [tensors[n] for n in names]
    elif (folder / LEGACY_EMA_STATE).is_file():
        state = safe_torch_load(folder / LEGACY_EMA_STATE)
    else:
        raise TrainSetupError(f"{folder}: no EMA state ({EMA_STATE}); the run uses --use_ema")
    shadow = state.get("shadow_params") if isinstance(state, dict) else None
    if not isinstance(shadow, list) or [tuple(t.shape) for t in shadow] != [tuple(p.shape) for _, p in named_params]:
        raise UnsafeFileError(f"{folder}: the EMA state does not match this model's trainable parameters")
    try:
        ema.load_state_dict(state)
    except ValueError as exc:
        raise UnsafeFileError(f"{folder}: bad EMA state ({exc})") from None


def architecture_mismatch(text: str) -> str:
    """The first size mismatch, missing or unexpected key of torch's load_state_dict error, in a few words."""
    size = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                     r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
    if size:
        return f"{size.group(1)}: {size.group(2)} in the checkpoint, {size.group(3)} here"
    keys = re.search(r"(Missing|Unexpected) key\(s\) in state_dict: \"([^\"]+)\"", text)
    if keys:
        return f"{'missing' if keys.group(1) == 'Missing' else 'unexpected'} parameter {keys.group(2)}"
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else "load_state_dict failed"


@contextmanager
def accelerate_view(checkpoint: Path):
    """The folder to hand Accelerate's load_state: the checkpoint itself, or for a legacy checkpoint (its EMA in
    LEGACY_EMA_STATE) a temporary folder of links to every other file. Accelerate refuses a custom-state file
    that no registered object claims, and would read it with weights_only=False; load_ema_state reads it
    weights-only instead."""
    if not (checkpoint / LEGACY_EMA_STATE).exists():
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="diffmem-resume-") as tmp:
        for entry in checkpoint.iterdir():
            if entry.name != LEGACY_EMA_STATE:
                (Path(tmp) / entry.name).symlink_to(entry.resolve())
        yield Path(tmp)


def bound_train_settings(cfg: TrainConfig) -> dict:
    """The generic loop's settings that change the trained weights (all but TRAIN_FREE_FIELDS), resolved.

    The process count and micro-batch are bound too: the same global batch split otherwise sums the gradient in
    another order, so the weights differ in the last bits and drift apart, and exact resume is lost.
    """
    settings = {k: v for k, v in asdict(cfg).items() if k not in TRAIN_FREE_FIELDS}
    settings["mixed_precision"] = resolved_mixed_precision(cfg.mixed_precision)
    settings["num_processes"] = launched_processes()
    return settings


def resume_hint(outdir_flag: str) -> str:
    """What to do about a refused setting, naming the CLI's output-folder flag."""
    return f"resume with the recorded value, or train the new one in another output folder ({outdir_flag} NEW_DIR)"


def bind_training_settings(cfg: TrainConfig, settings: dict, results_exist: bool = False,
                           outdir_flag: str = "--out") -> Path | None:
    """Bind the settings that change a run's result to its output folder; the checkpoint to resume from.

    Once the folder holds a complete checkpoint (or results_exist: an arm's own outputs such as snapshots),
    settings that differ from its ``training_options.json`` are refused with one line naming each setting, the
    recorded and the new value (ConfigError). Call it before any model is built: on refusal nothing is written.
    Accepted settings are recorded by the main process when the folder has no result yet. A run started in a new
    folder from another run's checkpoint is a new run (a fork: the lab's mitigated run continues the lab run
    with a loss threshold), bound to its own settings from then on.
    """
    out = Path(cfg.output_dir)
    settings = jsonable(settings)
    resume = resolve_resume(cfg.resume_from_checkpoint, out)
    results = results_exist or bool(list_checkpoints(out))
    hint = resume_hint(outdir_flag)
    check_run_settings(out / TRAINING_OPTIONS, settings, results, hint, overwrite_flag=None)
    if os.environ.get("RANK", "0") == "0":
        out.mkdir(parents=True, exist_ok=True)
        bind_run_settings(out / TRAINING_OPTIONS, settings, results, hint, overwrite_flag=None)
    return resume
