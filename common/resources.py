"""The files diffmem ships beside its code: the memorization lab (``data/lab``), the accelerate launch
configurations (``accelerate_configs/*.yaml``) and the notebooks (``notebooks/*.ipynb``).

They are package data of ``diffmem`` (setup.cfg), so they lie under the package's own folder wherever it is
installed: ``site-packages/diffmem/`` for a wheel, the repository root for a checkout or ``pip install -e .``.
Everything here finds them through the package (``importlib.resources``), never through the current directory,
so a default that names the lab works from any folder. Torch-free: a CLI's defaults may use it before its
argument checks.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from diffmem.common.errors import ConfigError, DiffmemError

LAB_FILES = ("model_index.json", "memorized.jsonl", "unmemorized.jsonl", "manifest.json")


class MissingResourceError(DiffmemError, FileNotFoundError):
    """A file that diffmem ships is absent from this installation; str() is a one-line message."""


def package_root() -> Path:
    """The folder of the package ``diffmem``: ``site-packages/diffmem`` installed, the repository root in a
    checkout."""
    return Path(str(files("diffmem")))


def lab_dir() -> Path:
    """The shipped memorization lab: a 14 MB Stable-Diffusion-shaped pipeline folder (load it as any
    ``--model_id``) with ``memorized.jsonl``, ``unmemorized.jsonl``, ``gt_images/`` and ``manifest.json``
    (docs/lab.md). Raises MissingResourceError when the installation lacks it."""
    lab = package_root() / "data" / "lab"
    missing = [name for name in LAB_FILES if not (lab / name).is_file()]
    if missing:
        raise MissingResourceError(f"{lab}: the memorization lab is not in this installation ({missing[0]} missing); "
                                   f"reinstall diffmem or rebuild it with `make lab`")
    return lab


def accelerate_configs_dir() -> Path:
    """The folder of the shipped accelerate launch configurations."""
    return package_root() / "accelerate_configs"


def accelerate_config_names() -> list[str]:
    """The names of the shipped accelerate configurations (``cpu``, ``single_gpu_fp16``, …), sorted."""
    return sorted(p.stem for p in accelerate_configs_dir().glob("*.yaml"))


def accelerate_config(name: str | Path) -> Path:
    """An accelerate config file: ``name`` as given when it is an existing file, else the shipped configuration of
    that name (``cpu`` or ``cpu.yaml`` is ``accelerate_configs/cpu.yaml`` of the installation). Anything else is a
    ConfigError naming the shipped ones."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = accelerate_configs_dir() / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = ", ".join(accelerate_config_names()) or "none in this installation"
    raise ConfigError(f"{name}: no such accelerate config file, nor a shipped one (shipped: {names})")


def notebooks_dir() -> Path:
    """The folder of the shipped notebooks (``token_significance.ipynb``, ``detection_report.ipynb``); copy one
    out before running it, since they write into the ``OUT_DIR`` they are given, never next to themselves."""
    return package_root() / "notebooks"
