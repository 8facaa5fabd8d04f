"""Installed, diffmem is one import package: the wheel holds diffmem/ alone, every console script resolves, and no
file of the checkout edits sys.path to find the library."""

from __future__ import annotations

import configparser
import importlib
import re
import subprocess
import sys
import zipfile

from conftest import REPO


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines)


def test_wheel_holds_only_the_diffmem_package(tmp_path):
    # --no-build-isolation: build with this environment's setuptools, offline.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("diffmem-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        top_level = zf.read(info).decode().split()
    outside = [n for n in names if not n.startswith("diffmem/") and not re.match(r"diffmem-[^/]+\.dist-info/", n)]
    assert outside == []
    assert top_level == ["diffmem"]
    for module in ("diffmem/common/edm/sampler.py", "diffmem/detect/generate.py", "diffmem/data/convert_edm.py",
                   "diffmem/mitigate/inference_mem.py", "diffmem/finetune/train_unconditional.py"):
        assert module in names  # the import path mirrors the repository path
    assert not any("/tests/" in n or n.startswith("diffmem/bench/") for n in names)
    # Package data (diffmem.common.resources finds it): the whole lab, the accelerate configs, the notebooks.
    lab = sorted(n for n in names if n.startswith("diffmem/data/lab/"))
    tracked = subprocess.run(["git", "ls-files", "data/lab"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert lab == sorted(f"diffmem/{f}" for f in tracked)
    for data in ("diffmem/data/lab/model_index.json", "diffmem/data/lab/memorized.jsonl",
                 "diffmem/data/lab/unmemorized.jsonl", "diffmem/data/lab/manifest.json",
                 "diffmem/data/lab/unet/config.json", "diffmem/accelerate_configs/cpu.yaml",
                 "diffmem/notebooks/token_significance.ipynb", "diffmem/notebooks/detection_report.ipynb",
                 "diffmem/common/t2i/prompt_sets/data/memattn_sd1_mem345.txt",
                 "diffmem/common/t2i/prompt_sets/data/LICENSE.memattn"):
        assert data in names, data
    assert {n for n in names if n.startswith("diffmem/accelerate_configs/")} == {
        f"diffmem/{p.relative_to(REPO)}" for p in (REPO / "accelerate_configs").glob("*.yaml")}


def test_every_cli_has_its_console_script_and_it_resolves():
    scripts = console_scripts()
    clis = sorted(p.relative_to(REPO) for folder in ("detect", "mitigate", "finetune", "data")
                  for p in (REPO / folder).glob("*.py") if p.name != "__init__.py")
    for cli in clis:
        name = "diffmem-" + cli.stem.replace("_", "-")
        assert scripts.get(name) == f"diffmem.{cli.parent}.{cli.stem}:main", name
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_no_file_edits_sys_path():
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.ipynb"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    pattern = re.compile(r"sys\.path\.(insert|append)|sys\.path\s*=|sys\.path\s*\+=")
    offenders = [f for f in tracked if f != "tests/cli/test_packaging.py" and pattern.search((REPO / f).read_text())]
    assert offenders == []
