"""A mistyped model reference is one line and exit 2 from every CLI that loads a pipeline, before any model library
(diffusers, transformers; torch too where the CLI module does not import it itself) is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

# Each CLI, the arguments it needs besides the model, the model flag it documents, and whether its module imports
# torch before its checks (the mitigation CLIs' settings live in common/t2i/mitigation/options.py, without torch).
CLIS = {
    "detect_mem": ("diffmem.detect.detect_mem", ["--dataset", "{p}", "--run_name", "r"], "--model_id", False),
    "explain_tokens": ("diffmem.detect.explain_tokens", ["--out", "{o}", "--prompt", "a cat"], "--model_id", False),
    "inference_mem": ("diffmem.mitigate.inference_mem", ["--dataset", "{p}", "--run_name", "r"], "--model_id", False),
    "tradeoff": ("diffmem.mitigate.tradeoff", ["--dataset", "{p}", "--run_name", "r"], "--model_id", False),
    "train_text_to_image": ("diffmem.finetune.train_text_to_image", ["--dataset", "{o}", "--output_dir", "{o}/run"],
                            "--pretrained_model_name_or_path", False),
}
HEAVY = ("diffusers", "transformers", "open_clip", "accelerate", "torch")

# Runs one CLI's main() in a fresh interpreter and reports its exit code, stderr and the heavy modules imported.
RUNNER = """
import contextlib, io, json, sys
from importlib import import_module
err = io.StringIO()
with contextlib.redirect_stderr(err):
    try:
        rc = import_module(sys.argv[1]).main(sys.argv[2:])
    except SystemExit as exc:
        rc = exc.code
print(json.dumps({"rc": rc, "stderr": err.getvalue(), "imported": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


@pytest.mark.parametrize("model", ["data/lb", "./nope/x"])
@pytest.mark.parametrize("name", list(CLIS))
def test_a_mistyped_model_is_one_line_before_any_model_library(tmp_path, name, model):
    module, extra, flag, imports_torch = CLIS[name]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"caption": "a cat"}\n')
    args = [a.format(p=prompts, o=tmp_path) for a in extra]
    res = subprocess.run([sys.executable, "-c", RUNNER, module, flag, model, *args], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    lines = [line for line in out["stderr"].splitlines() if line.strip()]
    assert out["rc"] == 2 and len(lines) == 1, out
    why = "not a Hub id (owner/name)" if model.startswith(".") else "not in the local Hub cache (HF_HUB_OFFLINE is set)"
    assert lines[0].startswith(f"{name}: error: --") and f" {model}: no such folder, and {why}" in lines[0], lines
    assert "stacktrace" not in lines[0] and "Traceback" not in out["stderr"]
    assert set(out["imported"]) <= ({"torch"} if imports_torch else set()), out["imported"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "mit_outputs").exists()
