"""Broken Memories' calibration file (Huang et al., KDD 2026): per-step means and standard deviations of ‖x_t‖,
‖x_{t−1} − x_t‖ and ‖x̂₀‖ over the guided trajectories of non-memorized prompts, and the sampling settings it was made
with. Without torch: ``detect/detect_mem.py`` and the mitigation CLIs read and check it before any model loads.

A calibration describes one sampler (model, dtype, scheduler, steps, guidance, resolution); the z-scores against it
mean nothing for another, so using it with other settings is refused in one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffmem.common.errors import ConfigError
from diffmem.common.results import file_sha256, jsonable, write_json_atomic

CALIBRATION_FORMAT = "diffmem-broken-memories-calibration"
STABILITY_NORMS = ("x_norm", "delta_norm", "x0_norm")  # ‖x_{t−1}‖, ‖x_{t−1} − x_t‖, ‖x̂₀‖ of each sampler step
# The settings a calibration is bound to (their names in detect_mem's and the mitigations' settings).
CALIBRATION_KEYS = ("model_id", "unet_id", "revision", "variant", "dtype", "scheduler", "num_inference_steps",
                    "guidance_scale", "height", "width")
CALIBRATION_FLAGS = {"model_id": "--model", "unet_id": "--unet_id", "revision": "--revision", "variant": "--variant",
                     "dtype": "--dtype", "scheduler": "--scheduler", "num_inference_steps": "--num_inference_steps",
                     "guidance_scale": "--guidance_scale", "height": "--height", "width": "--width"}


def calibration_record(settings: dict, mean: dict, std: dict, trajectories: int, prompts: int,
                       dataset_sha256: str) -> dict:
    """The file's content: the bound settings, the per-step statistics and what they were computed over."""
    return {"format": CALIBRATION_FORMAT, "version": 1,
            "settings": jsonable({k: settings.get(k) for k in CALIBRATION_KEYS}),
            "trajectories": trajectories, "prompts": prompts, "dataset_sha256": dataset_sha256,
            "mean": {k: [float(v) for v in mean[k]] for k in STABILITY_NORMS},
            "std": {k: [float(v) for v in std[k]] for k in STABILITY_NORMS}}


def write_calibration(path: str | Path, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def read_calibration(path: str | Path, flag: str = "--calibration") -> dict:
    """The calibration at path, checked for shape (ConfigError, one line, naming ``flag``, if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{flag} {path}: not a JSON file ({e})") from None
    if not isinstance(record, dict) or record.get("format") != CALIBRATION_FORMAT:
        raise ConfigError(f"{flag} {path}: not a Broken Memories calibration (detect_mem.py --detector broken "
                          f"--make_calibration writes one)")
    steps = record.get("settings", {}).get("num_inference_steps")
    for part in ("mean", "std"):
        for name in STABILITY_NORMS:
            values = record.get(part, {}).get(name)
            if not isinstance(values, list) or len(values) != steps or not all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ConfigError(f"{flag} {path}: {part}.{name} must hold {steps} finite numbers")
    return record


def check_calibration(record: dict, settings: dict, path: str | Path, flag: str = "--calibration") -> None:
    """ConfigError (one line) unless the calibration was made with these settings (those of CALIBRATION_KEYS that
    ``settings`` holds)."""
    made = record["settings"]
    for key in CALIBRATION_KEYS:
        if key in settings and jsonable(settings[key]) != made.get(key):
            raise ConfigError(f"{flag} {path} was made with {CALIBRATION_FLAGS[key]} {made.get(key)}, this run has "
                              f"{settings[key]}: calibrate with the run's settings")


def calibration_sha256(path: str | Path) -> str:
    """The calibration's identity, which a run binds (a changed file under the same name is another calibration)."""
    return file_sha256(path)
