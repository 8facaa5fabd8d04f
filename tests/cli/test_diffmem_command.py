"""``diffmem <verb>`` and ``python -m diffmem``: every CLI behind one command, its verb list answering at once."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest
from conftest import REPO

from diffmem import __main__ as command

CLI_PACKAGES = ("diffmem.detect", "diffmem.mitigate", "diffmem.finetune", "diffmem.data")


def test_every_cli_has_a_verb_and_every_verb_a_line(capsys):
    clis = {f"{package}.{m.name}" for package in CLI_PACKAGES
            for m in pkgutil.iter_modules(importlib.import_module(package).__path__)}
    assert clis == set(command.VERBS.values())
    assert command.main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb, module in command.VERBS.items():
        line = next(line for line in out.splitlines() if line.split()[:1] == [verb])
        assert len(line.split()) > 3, line  # the verb and its one-line summary
        assert len(line) <= 120


def test_the_verb_list_imports_no_torch():
    code = ("import sys, io, contextlib\nfrom diffmem.__main__ import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


@pytest.mark.parametrize("verb", list(command.VERBS))
def test_each_verb_help_is_its_cli_help(verb, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["diffmem", verb, "--help"])
    with pytest.raises(SystemExit) as exc:
        command.main([verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--help" in out


def test_script_names_work_as_verbs_and_unknown_verbs_are_one_line(capsys):
    aliases = command.verb_aliases()
    assert aliases["detect-mem"] == aliases["detect_mem"] == "detect"
    assert aliases["dataset_tool"] == aliases["dataset-tool"] == "dataset"
    assert aliases["mem_ratio"] == "mem-ratio" and aliases["inference_mem"] == "mitigate"
    assert command.main(["detct"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffmem: error: unknown verb 'detct' (did you mean detect?); diffmem --help lists them"]


def test_python_dash_m_diffmem_runs_a_verb(tmp_path):
    res = subprocess.run([sys.executable, "-m", "diffmem", "similarity", "mscore", "--source", tmp_path / "a.npz",
                          "--target", tmp_path / "b.npz", "--sscd-threshold", "2"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "diffmem similarity: error: expected --sscd_threshold in [-1, 1] (a threshold on SSCD cosine similarity), "
        "got 2.0"]  # under the diffmem command a CLI's messages name it "diffmem <verb>"
    res = subprocess.run([sys.executable, "-m", "diffmem", "--version"], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("diffmem ")


def test_the_diffmem_console_script_is_declared():
    text = (REPO / "setup.cfg").read_text()
    assert "    diffmem = diffmem.__main__:main\n" in text
