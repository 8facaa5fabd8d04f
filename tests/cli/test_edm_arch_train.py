"""finetune/train_unconditional.py --arch edm-ddpmpp | edm-ncsnpp | edm-adm: EDM's own networks on our trainer
(accelerate launch, --cond, skip masks, exact resume), their parameter counts against EDM's, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ONE_THREAD, accelerate_launch, edm_train_args, run_cli, run_in_process
from safetensors.torch import load_file

from diffmem.common.edm.dataset.edm_zip import write_dataset_zip
from diffmem.common.edm.networks.build import (
    ARCH_WIDTHS,
    EDM_ARCH_NAMES,
    EDM_ARCHS,
    ArchConfig,
    build_edm_network,
    count_parameters,
    edm_backbone,
)
from diffmem.common.edm.precond import Preconditioning

SCRIPT = "finetune/train_unconditional.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("edm-arch-data")
    write_dataset_zip(root / "d.zip", rng.integers(0, 256, size=(16, 3, 8, 8), dtype=np.uint8), np.arange(16) % 4,
                      progress=False)
    return root


def args(data, out, steps, *extra):
    return edm_train_args(data / "d.zip", out, steps, 8, *extra)


def weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


# EDM's own counts, from NVlabs/edm's networks built with its train.py settings for each --arch (run in a scratch
# folder; numbers only): 32×32×3 CIFAR-10 DDPM++ (VP) and NCSN++ (VE), ImageNet-64 ADM (1000 classes), and
# DiffMemorize's basic setup (DDPM++ with num_blocks 2). augment_dim 0: EDM's CIFAR-10 models add 9 × 128 (DDPM++)
# or 9 × 256 (NCSN++) augmentation weights, which our trainer, without EDM's augmentation pipe, does not build.
EDM_COUNTS = [
    ("edm-ddpmpp", "vp", {}, 55_732_739),
    ("edm-ncsnpp", "ve", {}, 56_395_523),
    ("edm-adm", "edm", dict(resolution=64, label_dim=1000), 295_899_267),
    ("edm-ddpmpp", "vp", dict(num_blocks=2), 35_125_251),
]


@pytest.mark.parametrize("arch, precond, kw, expected", EDM_COUNTS)
def test_parameter_counts_equal_edms(arch, precond, kw, expected):
    with torch.device("meta"):  # no memory for the weights: only their shapes count
        net = build_edm_network(ArchConfig(arch=arch, **kw), Preconditioning(precond))
    assert count_parameters(net) == expected


def test_each_arch_has_its_widths_and_backbone():
    assert set(EDM_ARCHS) == set(EDM_ARCH_NAMES) and set(ARCH_WIDTHS) >= set(EDM_ARCH_NAMES)
    adm = ArchConfig(arch="edm-adm").resolved()
    assert (adm.num_channels, adm.channel_mult, adm.num_blocks, adm.attn_resolutions) == (192, (1, 2, 3, 4), 3,
                                                                                          (32, 16, 8))
    model_type, kw = edm_backbone(ArchConfig(arch="edm-ncsnpp", num_blocks=2))
    assert model_type == "SongUNet" and kw["num_blocks"] == 2 and kw["embedding_type"] == "fourier"
    assert kw["encoder_type"] == "residual" and kw["resample_filter"] == [1, 3, 3, 1] and kw["channel_mult_noise"] == 2
    assert edm_backbone(ArchConfig(arch="edm-ddpmpp", embed="fourier"))[1]["embedding_type"] == "fourier"


def test_edm_ddpmpp_twenty_steps_through_accelerate_launch(data, tmp_path):
    out = tmp_path / "run"
    res = accelerate_launch("--config_file", "accelerate_configs/cpu.yaml", SCRIPT,
                            *args(data, out, 20, "--arch", "edm-ddpmpp", "--cond", "--dropout", "0.1"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    snaps = sorted(p.name for p in out.glob("snapshot-*"))
    assert snaps == [f"snapshot-{n:09d}" for n in (40, 80, 120, 160)]
    info = json.loads((out / snaps[-1] / "snapshot.json").read_text())
    assert info["training"]["arch"] == "edm-ddpmpp" and info["training"]["arch_resolved"]["model_type"] == "SongUNet"
    from diffmem.common.edm.networks.snapshot import load_network

    net = load_network(out)
    assert type(net).__name__ == "VPPrecond" and net.label_dim == 4 and net.image_shape == (3, 8, 8)
    assert info["training"]["parameters"] == count_parameters(net.requires_grad_(True))
    # The snapshot is the EMA network of the last checkpoint, under EDM's own parameter names.
    ema = weights(out / snaps[-1])
    assert "model.enc.8x8_conv.weight" in ema and "model.map_label.weight" in ema
    assert all(torch.equal(ema[k], v) for k, v in
               load_file(str(out / "checkpoint-20" / "net_ema" / "diffusion_pytorch_model.safetensors")).items())
    # ... which samples through detect/generate.py like any snapshot, a label per seed.
    res = run_cli("detect/generate.py", "--network", out, "--seeds", "0-3", "--steps", "4", "--outdir",
                  tmp_path / "gen", "--device", "cpu", env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((tmp_path / "gen").glob("*.png"))) == 4


def test_edm_ddpmpp_resume_five_plus_five_is_bit_identical(data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    extra = ("--arch", "edm-ddpmpp", "--dropout", "0.1", "--skip_connections", "1,0,1,1")
    assert run_in_process(SCRIPT, *args(data, full, 10, *extra), env=ONE_THREAD).returncode == 0
    assert run_in_process(SCRIPT, *args(data, split, 5, *extra), env=ONE_THREAD).returncode == 0
    res = run_in_process(SCRIPT, *args(data, split, 10, *extra, "--resume_from_checkpoint", "latest"), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("snapshot-000000040", "snapshot-000000080"):
        a, b = weights(full / name), weights(split / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    config = json.loads((full / "snapshot-000000080" / "config.json").read_text())
    assert config["model_kwargs"]["skip_connections"] == [1, 0, 1, 1]


def test_edm_ncsnpp_and_edm_adm_train_a_step(data, tmp_path):
    for arch, precond in (("edm-ncsnpp", "ve"), ("edm-adm", "edm")):
        out = tmp_path / arch
        res = run_in_process(SCRIPT, *args(data, out, 1, "--arch", arch, "--precond", precond), env=ONE_THREAD)
        assert res.returncode == 0, res.stderr[-3000:]
        config = json.loads((out / "snapshot-000000008" / "config.json").read_text())
        assert config["model_type"] == EDM_ARCHS[arch][0] and config["_class_name"] == f"{precond.upper()}Precond"


@pytest.mark.parametrize("extra, message", [
    (["--arch", "edm-adm", "--embed", "fourier"], "edm-adm's noise embedding is fixed"),
    (["--arch", "edm-ddpmpp", "--skip_connections", "1,1"], "skip_connections has 2 entries; this network has 4"),
])
def test_bad_edm_arch_input_is_one_line(data, tmp_path, extra, message):
    res = run_in_process(SCRIPT, *args(data, tmp_path / "bad", 2, *extra), timeout=120, env=ONE_THREAD)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr
    # Nothing that blocks a retry: no checkpoint, no snapshot.
    assert not list((tmp_path / "bad").glob("checkpoint-*")) and not list((tmp_path / "bad").glob("snapshot-*"))
