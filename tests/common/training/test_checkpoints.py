"""Training checkpoints run no code: the EMA is safetensors + JSON, every pickle of a checkpoint is read
weights-only, and a file that is not what it should be is one line, exit 2, with nothing run or written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ONE_THREAD, edm_train_args, run_cli, run_in_process
from safetensors.torch import load_file

from diffmem.common.edm.dataset.edm_zip import write_dataset_zip

SCRIPT = "finetune/train_unconditional.py"


class Payload:
    """Pickles as a call of builtins.eval that writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("ckpt-data")
    write_dataset_zip(root / "d.zip", rng.integers(0, 256, size=(16, 1, 8, 8), dtype=np.uint8), None, progress=False)
    return root / "d.zip"


@pytest.fixture(scope="module")
def half_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    res = run_cli(SCRIPT, *edm_train_args(data, out, 5, 8), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def legacy_ema_state(ckpt) -> dict:
    """The EMA state as Accelerate's register_for_checkpointing pickled it before ema_state.json."""
    from diffmem.common.edm.networks.snapshot import load_network

    state = json.loads((ckpt / "ema_state.json").read_text())
    shadow = load_file(ckpt / "ema_shadow.safetensors")
    order = [f"net.{n}" for n, _ in load_network(ckpt.parent).named_parameters()]  # the trainer's parameter order
    return {**state, "shadow_params": [shadow[n] for n in order]}


def fork(half_run, tmp_path):
    """A copy of the half run, as a folder someone else wrote."""
    out = tmp_path / "fork"
    shutil.copytree(half_run, out)
    return out, out / "checkpoint-5"


def resume(data, out):
    return run_in_process(SCRIPT, *edm_train_args(data, out, 10, 8, "--resume_from_checkpoint", "latest"),
                   timeout=120, env=ONE_THREAD)


def one_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    return lines[0]


def test_a_checkpoint_holds_no_pickled_ema(half_run):
    ckpt = half_run / "checkpoint-5"
    assert not list(ckpt.glob("custom_checkpoint_*"))
    state = json.loads((ckpt / "ema_state.json").read_text())
    assert state["optimization_step"] == 5
    shadow = load_file(ckpt / "ema_shadow.safetensors")
    ema_export = load_file(ckpt / "net_ema" / "diffusion_pytorch_model.safetensors")
    # The shadow weights are the EMA export's, keyed <model>.<parameter>.
    assert all(torch.equal(shadow[f"net.{k}"], v) for k, v in ema_export.items() if f"net.{k}" in shadow)


@pytest.mark.parametrize("legacy_only", [True, False], ids=["legacy-ema-pickle", "beside-the-safe-ema"])
def test_an_eval_reduce_in_the_ema_pickle_is_refused_and_never_runs(data, half_run, tmp_path, legacy_only):
    out, ckpt = fork(half_run, tmp_path)
    marker = tmp_path / "PWNED"
    # The hostile record first, the genuine legacy EMA state after it: what a tampered checkpoint would hold.
    torch.save({"x": Payload(marker), **legacy_ema_state(ckpt)}, ckpt / "custom_checkpoint_0.pkl")
    if legacy_only:
        (ckpt / "ema_state.json").unlink()
        (ckpt / "ema_shadow.safetensors").unlink()
        line = one_line(resume(data, out))
        assert "custom_checkpoint_0.pkl: refused global builtins.eval" in line and "\x1b" not in line, line
        assert not (out / "checkpoint-10").exists()
    else:  # the check resume runs first, in process (the CLI path is the legacy case's)
        from diffmem.common.safe_load import UnsafeFileError, verify_checkpoint_files

        with pytest.raises(UnsafeFileError, match="custom_checkpoint_0.pkl: refused global builtins.eval"):
            verify_checkpoint_files(ckpt)
    assert not marker.exists()


def test_every_pickle_of_a_checkpoint_is_read_weights_only(data, half_run, tmp_path):
    from diffmem.common.safe_load import UnsafeFileError, verify_checkpoint_files

    verify_checkpoint_files(half_run / "checkpoint-5")  # a genuine checkpoint passes
    # Each pickle the trainer's resume hands to Accelerate, checked in process (the check resume runs first) ...
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        out, ckpt = fork(half_run, tmp_path / name)
        marker = tmp_path / "PWNED"
        torch.save({"state": Payload(marker)}, ckpt / name)
        with pytest.raises(UnsafeFileError, match=f"{name}: refused global builtins.eval"):
            verify_checkpoint_files(ckpt)
        assert not marker.exists()
    # ... and once through the CLI's resume: one line, exit 2, nothing run.
    line = one_line(resume(data, out))
    assert "random_states_0.pkl: refused global builtins.eval" in line, line
    assert not marker.exists()


def test_a_legacy_ema_pickle_still_resumes_exactly(data, half_run, tmp_path):
    out, ckpt = fork(half_run, tmp_path)
    torch.save(legacy_ema_state(ckpt), ckpt / "custom_checkpoint_0.pkl")
    new_shadow = load_file(ckpt / "ema_shadow.safetensors")
    (ckpt / "ema_state.json").unlink()
    (ckpt / "ema_shadow.safetensors").unlink()
    straight = tmp_path / "straight"
    shutil.copytree(half_run, straight)
    for run in (out, straight):
        res = resume(data, run)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = (load_file(r / "checkpoint-10" / "ema_shadow.safetensors") for r in (out, straight))
    assert a.keys() == b.keys() == new_shadow.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_ema_file_of_another_model_is_one_line(data, half_run, tmp_path):
    out, ckpt = fork(half_run, tmp_path)
    from safetensors.torch import save_file

    shadow = load_file(ckpt / "ema_shadow.safetensors")
    save_file({k: v for k, v in list(shadow.items())[1:]}, str(ckpt / "ema_shadow.safetensors"))
    line = one_line(resume(data, out))
    assert "ema_shadow.safetensors: holds other tensors" in line, line


def test_refusal_line_names_the_global_without_escape_codes(tmp_path):
    from diffmem.common.safe_load import UnsafeFileError, safe_torch_load

    path = tmp_path / "x.bin"
    torch.save([Payload(tmp_path / "m")], path)
    with pytest.raises(UnsafeFileError) as err:
        safe_torch_load(path)
    text = str(err.value)
    assert text.startswith(f"{path}: refused global builtins.eval") and "\n" not in text and "\x1b" not in text
    path.write_bytes(b"not a torch file")
    with pytest.raises(UnsafeFileError, match="not a readable torch file"):
        safe_torch_load(path)
    assert not (tmp_path / "m").exists()


def test_a_fork_with_another_architecture_names_the_setting(data, half_run, tmp_path):
    out = tmp_path / "fork-4"
    res = run_in_process(SCRIPT, *edm_train_args(data, out, 10, 8, "--num_channels", "4",
                                          "--resume_from_checkpoint", half_run / "checkpoint-5"),
                  timeout=120, env=ONE_THREAD)
    line = one_line(res)  # was a 142-line size-mismatch traceback
    assert f"{half_run / 'checkpoint-5'}: its net network does not fit this run's (" in line, line
    assert "in the checkpoint," in line and "num_channels=8 (now 4)" in line, line
