"""One run per output folder (common/runlock.py): a second run refuses in one line, a dead owner's lock is taken
over, and a folder that cannot be written is one line before any model is loaded."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ONE_THREAD, run_cli


def test_a_second_lock_on_a_folder_is_refused_and_released_locks_are_gone(tmp_path):
    from diffmem.common.runlock import LOCK_NAME, RunLock, RunLockedError

    with RunLock(tmp_path / "run", "--out") as lock:
        owner = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=rf"--out .*run is in use by another run \(pid {os.getpid()},"):
            RunLock(tmp_path / "run", "--out").acquire()
        assert lock.held
    assert not (tmp_path / "run").exists()  # made for the run and left empty: removed again
    (tmp_path / "kept").mkdir()
    with RunLock(tmp_path / "kept", "--out"):
        (tmp_path / "kept" / "result.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["result.json"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("owner", [
    lambda: {"pid": dead_pid(), "host": socket.gethostname(), "since": "then"},  # killed
    lambda: {"pid": os.getpid(), "host": socket.gethostname(), "start": "1", "since": "then"},  # pid reused
    lambda: "half a lock fi",  # not written by RunLock
], ids=["dead-pid", "reused-pid", "corrupt"])
def test_a_stale_lock_is_taken_over(tmp_path, owner):
    from diffmem.common.runlock import LOCK_NAME, RunLock

    value = owner()
    (tmp_path / LOCK_NAME).write_text(value if isinstance(value, str) else json.dumps(value))
    with RunLock(tmp_path, "--out"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_another_hosts_lock_is_refused_with_the_way_out(tmp_path):
    from diffmem.common.runlock import LOCK_NAME, RunLock, RunLockedError

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1234, "host": "node-17", "since": "2026-12-06 10:00:00"}))
    with pytest.raises(RunLockedError) as err:
        RunLock(tmp_path, "--outdir").acquire()
    assert "in use by pid 1234 on node-17 since 2026-12-06 10:00:00" in str(err.value)
    assert f"delete {tmp_path / LOCK_NAME} if that run is dead" in str(err.value)
    assert (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------- the CLIs


def one_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A prompt file and a dataset zip; no model is needed: a refused run stops before loading one."""
    import numpy as np

    from diffmem.common.edm.dataset.edm_zip import write_dataset_zip

    root = tmp_path_factory.mktemp("lock-inputs")
    (root / "p.jsonl").write_text('{"caption": "a cat"}\n')
    write_dataset_zip(root / "d.zip", np.zeros((4, 1, 8, 8), dtype=np.uint8), None, progress=False)
    (root / "img").mkdir()
    (root / "no-model").mkdir()  # exists (a model reference that does not is refused before the lock), no pipeline
    return root


# Each CLI, its output folder under OUT, and the lock file it takes there.
CLIS = {
    "detect_mem": ("detect/detect_mem.py", lambda i, o: ["--model_id", i / "no-model", "--dataset", i / "p.jsonl",
                                                         "--run_name", "r", "--output_dir", o], ".r.lock"),
    "inference_mem": ("mitigate/inference_mem.py", lambda i, o: [
        "--model_id", i / "no-model", "--dataset", i / "p.jsonl", "--run_name", "r", "--out", o,
        "--sscd_model", "none", "--skip_clip"], ".diffmem.lock"),
    "tradeoff": ("mitigate/tradeoff.py", lambda i, o: [
        "--model_id", i / "no-model", "--dataset", i / "p.jsonl", "--gt_dir", i, "--run_name", "r",
        "--out", o, "--sscd_model", "default", "--reference_model", "ViT-S-32", "--reference_model_pretrain",
        "none"], ".diffmem.lock"),
    "generate": ("detect/generate.py", lambda i, o: ["--network", i / "no-network", "--seeds", "0-1",
                                                      "--outdir", o], ".generate.lock"),
    "mem_ratio": ("detect/mem_ratio.py", lambda i, o: ["--images", i / "img", "--knn_ref", i / "d.zip",
                                                        "--outdir", o], ".mem_ratio.lock"),
    "train_unconditional": ("finetune/train_unconditional.py", lambda i, o: [
        "--data", i / "d.zip", "--outdir", o, "--duration", "0.00001"], ".diffmem.lock"),
    "train_text_to_image": ("finetune/train_text_to_image.py", lambda i, o: [
        "--pretrained_model_name_or_path", i / "no-model", "--dataset", i / "img", "--output_dir", o],
        ".diffmem.lock"),
}


def out_folder(tmp_path, name):
    return tmp_path / "out"  # --out: the folder the run writes (docs/vocabulary.md)


@pytest.mark.parametrize("name", list(CLIS))
def test_a_second_run_on_a_folder_in_use_is_one_line(tmp_path, inputs, name):
    from diffmem.common.runlock import RunLock

    script, args, lock_name = CLIS[name]
    out = out_folder(tmp_path, name)
    with RunLock(out, "--out", lock_name):  # this test process is the live run holding the folder
        line = one_line(run_cli(script, *args(inputs, out), timeout=120, env=ONE_THREAD))
    assert f"{out} is in use by another run (pid {os.getpid()}," in line, line


@contextlib.contextmanager
def immutable(folder):
    """A folder nothing can be written into, not even by root (chattr +i); skipped where chattr is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"chattr +i is refused here ({res.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("name", ["detect_mem", "generate", "train_unconditional"])
def test_a_folder_that_cannot_be_written_is_one_line_before_any_model_loads(tmp_path, inputs, name):
    script, args, _ = CLIS[name]
    with immutable(tmp_path / "ro") as ro:
        out = ro / "out"
        line = one_line(run_cli(script, *args(inputs, out), timeout=120, env=ONE_THREAD))
    # The model named is not there: the folder is reported first, so nothing heavy ran before it.
    assert f"{out}: cannot create the output folder (Operation not permitted)" in line, line
    assert not out.exists()


def test_a_folder_without_write_permission_is_one_line(tmp_path, monkeypatch):
    """The same for a plain permission error (what a non-root user meets on a read-only share)."""
    import pathlib

    from diffmem.common.runlock import OutputFolderError, RunLock

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    (tmp_path / "share").mkdir()
    monkeypatch.setattr(pathlib.Path, "write_text", refuse)
    with pytest.raises(OutputFolderError, match=r"--out .*share: cannot write in the output folder "
                                                 r"\(Permission denied\)"):
        RunLock(tmp_path / "share", "--out").acquire()
