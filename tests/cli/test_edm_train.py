"""finetune/train_unconditional.py end to end on CPU: a short run through ``accelerate launch``, exact resume,
two processes against one, the LR/EMA schedule actually applied, snapshots that reload, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ONE_THREAD, TINY_EDM_TRAIN, accelerate_launch, edm_train_args, free_port, run_cli, run_in_process
from safetensors.torch import load_file

from diffmem.common.edm.dataset.edm_zip import write_dataset_zip

SCRIPT = "finetune/train_unconditional.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 labelled 8×8 grey images in an EDM zip (digits would do; synthetic keeps the fixture instant)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("edm-data")
    images = rng.integers(0, 256, size=(16, 1, 8, 8), dtype=np.uint8)
    write_dataset_zip(root / "d.zip", images, np.arange(16) % 4, progress=False)
    write_dataset_zip(root / "nolabels.zip", images, None, progress=False)
    return root


def args(data, out, steps, batch=8, *extra):
    return edm_train_args(data / "d.zip", out, steps, batch, *extra)


def weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_twenty_steps_through_accelerate_launch_write_loadable_snapshots(data, tmp_path):
    out = tmp_path / "run"
    res = accelerate_launch("--config_file", "accelerate_configs/cpu.yaml", SCRIPT,
                            *args(data, out, 20, 8, "--precond", "edm", "--cond", "--dropout", "0.1"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    snaps = sorted(p.name for p in out.glob("snapshot-*"))
    assert snaps == [f"snapshot-{n:09d}" for n in (40, 80, 120, 160)]
    info = json.loads((out / snaps[-1] / "snapshot.json").read_text())
    assert info["images_seen"] == 160 and info["step"] == 20 and info["training"]["precond"] == "edm"
    from diffmem.common.edm.networks.snapshot import load_network

    net = load_network(out)
    assert net.label_dim == 4 and net.pre.precond == "edm" and net.image_shape == (1, 8, 8)
    x = net(torch.zeros(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 3]))
    assert torch.isfinite(x).all()
    # The schedule is the one applied: the logged LR of step k is the base LR times the ramp at step k.
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * min(k * 8 / 32, 1.0) for k in range(1, 21)])
    # The snapshot is the EMA network, not the raw one.
    raw = load_file(str(out / "checkpoint-20" / "net" / "diffusion_pytorch_model.safetensors"))
    ema = weights(out / snaps[-1])
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert all(torch.equal(ema[k], v) for k, v in
               load_file(str(out / "checkpoint-20" / "net_ema" / "diffusion_pytorch_model.safetensors")).items())


def test_resume_half_and_half_is_bit_identical(data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    extra = ("--dropout", "0.1", "--xflip")  # dropout: the RNG state must be restored too
    res = run_cli(SCRIPT, *args(data, full, 10, 8, *extra), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_in_process(SCRIPT, *args(data, split, 5, 8, *extra), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_in_process(SCRIPT, *args(data, split, 10, 8, *extra, "--resume_from_checkpoint", "latest"),
                         env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("snapshot-000000040", "snapshot-000000080"):
        a, b = weights(full / name), weights(split / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_two_processes_match_one_with_the_same_global_batch(data, tmp_path):
    # SGD: its update is linear in the gradient, so float-sum-order differences stay at rounding level (Adam's
    # first steps divide g by |g| and would amplify them on near-zero gradients).
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--dropout", "0", "--optimizer", "sgd", "--lr", "2e-3")  # small enough not to diverge
    res = run_in_process(SCRIPT, *args(data, one, 4, 8, *extra), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    res = accelerate_launch("--config_file", "accelerate_configs/cpu.yaml", "--multi_gpu", "--num_processes", "2",
                            "--main_process_port", free_port(), SCRIPT, *args(data, two, 4, 8, *extra),
                            timeout=300, env={"ACCELERATE_USE_CPU": "true"})
    assert res.returncode == 0, res.stderr[-3000:]
    # Same samples, same per-sample noise: the same losses step by step; only the order of float sums differs.
    loss = [[json.loads(ln)["train_loss"] for ln in (o / "train_log.jsonl").read_text().splitlines()]
            for o in (one, two)]
    assert len(loss[0]) == 4 and loss[0] == pytest.approx(loss[1], rel=1e-5)
    a, b = weights(one / "snapshot-000000032"), weights(two / "snapshot-000000032")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert sorted(p.name for p in two.glob("snapshot-*")) == ["snapshot-000000032"]  # main process only


@pytest.mark.parametrize("extra, message", [
    (["--skip_connections", "1,1,1"], "--skip_connections has 3 entries; this network has 4 skip connections"),
    (["--ema_mode", "constant"], "--ema_mode constant and --ema_beta go together"),
    (["--batch_gpu", "3"], "--batch_gpu 3 does not divide the per-process batch 8"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, extra, message):
    res = run_in_process(SCRIPT, *args(data, tmp_path / "bad", 2, 8, *extra), timeout=120, env=ONE_THREAD)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_missing_data_and_cond_without_labels_are_one_line(data, tmp_path):
    res = run_in_process(SCRIPT, "--data", tmp_path / "nope.zip", "--outdir", tmp_path / "o", *TINY_EDM_TRAIN,
                         timeout=60)
    assert res.returncode == 2 and "no such file" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    bad = args(data, tmp_path / "o2", 2, 8, "--cond")
    bad[1] = data / "nolabels.zip"
    res = run_in_process(SCRIPT, *bad, timeout=120, env=ONE_THREAD)
    assert res.returncode == 2 and "--cond needs labels" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


# ------------------------------------------------------------------------------- resume binds its settings


def one_line_error(res):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def half_run(data, tmp_path_factory):
    """A run stopped after 5 of 10 steps (a checkpoint and a snapshot at step 5), as a kill would leave it."""
    out = tmp_path_factory.mktemp("half") / "run"
    res = run_in_process(SCRIPT, *args(data, out, 5, 8), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def folder_state(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change, setting", [
    (["--lr", "2e-3"], "lr=0.001 (now 0.002)"),
    (["--num_channels", "4"], "num_channels=8 (now 4)"),  # would be a load_state_dict traceback
    (["--batch", "4"], "batch=8 (now 4)"),
    (["--seed", "3"], "seed=0 (now 3)"),
    (["--ema_mode", "constant", "--ema_beta", "0.5"], "ema_mode=None (now 'constant')"),
    (["--dropout", "0.2"], "dropout=0.13 (now 0.2)"),
])
def test_a_resume_with_a_changed_setting_is_refused_and_writes_nothing(data, half_run, change, setting):
    before = folder_state(half_run)
    res = run_in_process(SCRIPT, *args(data, half_run, 10, 8, *change, "--resume_from_checkpoint", "latest"),
                  timeout=120, env=ONE_THREAD)
    line = one_line_error(res)
    assert "training_options.json" in line and setting in line and "another output folder (--out " in line, line
    assert folder_state(half_run) == before  # training_options.json included


def test_training_options_record_the_settings_that_change_the_weights(data, half_run):
    opts = json.loads((half_run / "training_options.json").read_text())
    assert opts["lr"] == 1e-3 and opts["num_channels"] == 8 and opts["batch"] == 8 and opts["batch_gpu"] == 8
    assert opts["mixed_precision"] == "no" and opts["num_processes"] == 1 and len(opts["data_sha256"]) == 64
    assert "duration" not in opts and "report_to" not in opts  # may change: extending a run, logging
    info = json.loads((half_run / "snapshot-000000040" / "snapshot.json").read_text())
    assert info["training"]["lr"] == 1e-3 and info["training"]["dataset_size"] == 16


def test_another_data_file_with_the_same_name_is_refused(data, half_run, tmp_path):
    other = tmp_path / "d.zip"
    rng = np.random.default_rng(1)
    write_dataset_zip(other, rng.integers(0, 256, size=(16, 1, 8, 8), dtype=np.uint8), np.arange(16) % 4,
                      progress=False)
    bad = args(data, half_run, 10, 8, "--resume_from_checkpoint", "latest")
    bad[1] = other
    line = one_line_error(run_in_process(SCRIPT, *bad, timeout=120, env=ONE_THREAD))
    assert "data_sha256=" in line, line


def test_outdir_that_is_a_file_is_one_line(data, tmp_path):
    (tmp_path / "f").write_text("x")
    line = one_line_error(run_in_process(SCRIPT, *args(data, tmp_path / "f", 2, 8), timeout=60))
    assert "--out " in line and "is a file" in line, line


def test_resume_counts_images_since_step_0_and_continues_lr_and_ema_step_by_step(data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    extra = ("--no_progress",)  # a setting that changes no weight may change on resume
    assert run_in_process(SCRIPT, *args(data, full, 10, 8), env=ONE_THREAD).returncode == 0
    assert run_in_process(SCRIPT, *args(data, split, 5, 8), env=ONE_THREAD).returncode == 0
    # A kill in the middle of a log write leaves a torn last line: the resume must read past it.
    with open(split / "train_log.jsonl", "a") as f:
        f.write('{"step": 6, "train_lo')
    res = run_in_process(SCRIPT, *args(data, split, 10, 8, *extra, "--resume_from_checkpoint", "latest"),
                         env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trained 10 steps (80 images)" in res.stdout, res.stdout
    assert json.loads((split / "train_summary.json").read_text())["samples_seen"] == 80
    log_full = [json.loads(ln) for ln in (full / "train_log.jsonl").read_text().splitlines()]
    log_split = [json.loads(ln) for ln in (split / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_split] == list(range(1, 11))
    for key in ("lr", "ema_beta", "train_loss"):
        assert [r[key] for r in log_split] == [r[key] for r in log_full], key
    assert log_full[0]["ema_beta"] == 0.0 and 0.0 < log_full[-1]["ema_beta"] < 1.0  # EDM's ramp, not constant


def test_a_corrupt_log_line_before_the_end_is_one_line_naming_it(data, half_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    rows = (run / "train_log.jsonl").read_text().splitlines()
    rows[2] = rows[2][:10]  # a complete line that is not JSON: not a torn tail
    (run / "train_log.jsonl").write_text("\n".join(rows) + "\n")
    line = one_line_error(run_in_process(SCRIPT, *args(data, run, 10, 8, "--resume_from_checkpoint", "latest"),
                                  timeout=120, env=ONE_THREAD))
    assert "train_log.jsonl:3: corrupt result line" in line and "the checkpoint holds the state" in line, line
