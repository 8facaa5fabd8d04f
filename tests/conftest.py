"""Shared fixtures: everything offline, models built once per session in a temporary folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test's workers share the cores: one OpenMP thread each, for them and the CLIs they start, before torch
    # is imported (docs/development.md, "Small models on a shared CPU").
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny SD-shaped pipeline (random weights, real CLIP tokenizer) that from_pretrained loads."""
    from diffmem.common.t2i.pipelines import build_pipeline

    return build_pipeline(tmp_path_factory.mktemp("tiny-sd"), arch="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipeline_dir):
    """The tiny pipeline loaded through the real loading path, fp32 on CPU."""
    from diffmem.common.t2i.pipelines import load_pipeline

    return load_pipeline(str(tiny_pipeline_dir))


@pytest.fixture(scope="session")
def tiny_parts(tiny_pipe):
    """Scoring parts (UNet, text side, DDIM scheduler, latent shape) of the tiny pipeline."""
    from diffmem.common.t2i.pipelines import denoiser_parts

    return denoiser_parts(tiny_pipe)


def run_cli(script: str, *args: str, timeout: float = 300, env: dict | None = None):
    """Run ``python SCRIPT ARGS`` from the repo root the way a user would; returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(script: str, *args, timeout: float | None = None, env: dict | None = None):
    """``run_cli``'s CompletedProcess, from the script's ``main(argv)`` called in this process: the same code from
    argv on, without a fresh interpreter importing torch and diffusers again for every call. What needs a process
    of its own keeps run_cli: the script file itself, a kill, a launcher, process-wide state (signal handlers)."""
    import contextlib
    import importlib
    import io
    import subprocess
    import traceback
    import warnings

    import torch
    from accelerate.state import AcceleratorState, GradientState

    del timeout  # a subprocess's limit; here pytest's own
    module = importlib.import_module("diffmem." + script.removesuffix(".py").replace("/", "."))
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv, threads = os.environ.copy(), sys.argv, torch.get_num_threads()
    os.environ.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    if "OMP_NUM_THREADS" in (env or {}):  # read once at start-up by a fresh interpreter; here set directly
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [str(REPO / script), *argv]
    try:
        # fork_rng: a CLI seeding torch's global generator must not change what a later test draws.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("default")  # shown on stderr, as a fresh interpreter shows them
            try:
                code = module.main(argv)
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code
                else:
                    print(exc.code, file=sys.stderr)
                    code = 1
            except Exception:  # a subprocess's traceback and exit code 1
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return subprocess.CompletedProcess([sys.executable, script, *argv], code or 0, out.getvalue(), err.getvalue())


def call_main(main, argv, capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of a CLI's main(argv) called in process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def load_script(script: str, name: str):
    """A CLI script as a module (for folders that are no package, like data/), so a test can call its main()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# finetune/train_unconditional.py's flags for a tiny network (8 channels, 2 levels) that trains in seconds.
TINY_EDM_TRAIN = ["--num_channels", "8", "--channel_mult", "1,2", "--num_blocks", "1", "--attn_resolutions", "4",
                  "--report_to", "none", "--no_progress", "--lr", "1e-3"]


def edm_train_args(data_zip, out, steps: int, batch: int, *extra) -> list:
    """train_unconditional.py arguments for ``steps`` optimizer steps of ``batch``: a snapshot (and checkpoint)
    every 5 steps, the LR ramped up over 4 steps, an EMA half-life of 2 steps' images."""
    return ["--data", data_zip, "--outdir", out, "--batch", str(batch), "--duration", str(steps * batch / 1e6),
            "--snap", str(5 * batch / 1e3), "--lr_rampup", str(4 * batch / 1e3), "--ema", str(2 * batch / 1e6),
            *TINY_EDM_TRAIN, *extra]


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> Path:
    """This checkout's wheel installed (without dependencies) into a folder of its own, as ``pip install .`` would
    lay it out; with that folder first on PYTHONPATH, ``import diffmem`` is the wheel's copy, not the checkout's
    editable install (whose finder comes after PYTHONPATH)."""
    import subprocess

    from filelock import FileLock

    # Built once for all pytest-xdist workers (their temporary folders share this session's folder): two builds
    # at once would share setuptools' build/ folder in the checkout.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    site = shared / "installed-wheel"
    with FileLock(shared / "installed-wheel.lock"):
        if not (site / ".complete").is_file():
            wheels = shared / "wheel"
            # --no-build-isolation: build with this environment's setuptools, offline.
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(wheels), str(REPO)], check=True, capture_output=True, text=True)
            (wheel,) = wheels.glob("diffmem-*.whl")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                            str(site), str(wheel)], check=True, capture_output=True, text=True)
            (site / ".complete").touch()
    return site


def free_port() -> int:
    """A free TCP port on the loopback interface, for a multi-process launch's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args, timeout: float, env: dict | None = None):
    """Run ``accelerate launch ARGS`` from the repo root (one torch thread per process); returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **ONE_THREAD, **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def one_torch_thread():
    """Tiny models: one thread each is as fast and stays steady when other jobs share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread_per_module():
    """``one_torch_thread`` for a whole module, its module-scoped fixtures included."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict:
    """Tiny saved pipelines of every family the text-to-image arm speaks (common/t2i/pipelines/tiny.py)."""
    from diffmem.common.t2i.pipelines.tiny import TINY_FAMILIES, build_family_pipeline

    root = tmp_path_factory.mktemp("families")
    return {family: build_family_pipeline(family, root / family) for family in TINY_FAMILIES}


# Flux's default image is 128 x vae_scale_factor pixels even for a tiny model: its tests ask for 16 x 16.
FAMILY_SIZE = {"flux": ("--height", "16", "--width", "16")}


# --- the text-to-image trainer's tests (tests/cli/test_train.py, test_train_families.py) ---------------------

def write_images(folder, captions, seed=0, size=(16, 16)):
    """A folder of random images, each with its caption in a .txt beside it (the trainer's imagefolder layout)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")
        (folder / f"{i:03d}.txt").write_text(caption)
    return folder


def base_args(model_dir, mem, out, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--dataset", str(mem), "--resolution", "16",
            "--train_batch_size", "2", "--report_to", "none", "--output_dir", str(out), *map(str, extra)]


@pytest.fixture
def fresh_accelerate():
    """In-process runs share Accelerate's singletons; give each run a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    reset()
    yield reset
    reset()
