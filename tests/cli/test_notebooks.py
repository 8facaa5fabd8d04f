"""The notebooks run top to bottom on CPU (nbclient, the venv's own kernel) and are committed without outputs; they
use diffmem's public API alone and write only into their OUT_DIR, from a checkout and from an installed wheel.

The kernel is ipykernel's "python3": jupyter_client launches it with sys.executable, i.e. the interpreter that
runs pytest, so it sees the same installed packages on a fresh clone after `pip install -e .[dev]` (and, with
PYTHONPATH set to a wheel's install folder, that wheel's diffmem).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from html import escape
from pathlib import Path

import pytest
from conftest import REPO

NOTEBOOKS = REPO / "notebooks"
TOOL_FOLDERS = {".git", ".venv", "build", ".pytest_cache", ".ruff_cache", "__pycache__"}
SOURCE_SUFFIXES = {".py", ".md", ".txt", ".cfg", ".toml", ".yaml"}


def execute(name: str, params: dict, cwd: Path, notebooks: Path = NOTEBOOKS):
    """Run NOTEBOOKS/NAME with params injected after its "parameters" cell (as papermill does), in folder cwd."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebooks / name, as_version=4)
    where = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(where + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs_of(nb, mime: str) -> list[str]:
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and mime == "text/plain":
                texts.append(out["text"])
            elif mime in out.get("data", {}):
                texts.append(out["data"][mime])
    return texts


@pytest.mark.parametrize("name", ["token_significance.ipynb", "detection_report.ipynb"])
def test_committed_without_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert any("parameters" in c["metadata"].get("tags", []) for c in code)


def written_since(root: Path, since: float) -> list[str]:
    """Files under root created or changed since ``since`` that git does not track (or that lie in data/lab/ or
    notebooks/), outside the folders tools own (git, the venv, caches): what a run left in the tree, ignored
    folders such as .cache/ included. Source files and editors' temporary files are left out: the notebooks write
    results and figures, and people may be editing the checkout meanwhile."""
    tracked = set(subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split())
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in TOOL_FOLDERS and not d.endswith(".egg-info")]
        for f in files:
            path = Path(folder) / f
            rel = path.relative_to(root).as_posix()
            if path.suffix in SOURCE_SUFFIXES or (f.startswith(".") and f.endswith((".tmp", ".swp"))):
                continue
            if path.stat().st_mtime >= since and (rel not in tracked or rel.startswith(("data/lab/", "notebooks/"))):
                found.append(rel)
    return found


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under root but bytecode caches."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_notebooks_use_the_public_api_only():
    for name in ("token_significance.ipynb", "detection_report.ipynb"):
        code = "\n".join("".join(c["source"]) for c in json.loads((NOTEBOOKS / name).read_text())["cells"]
                         if c["cell_type"] == "code")
        imports = set(re.findall(r"^\s*(?:from|import) (diffmem\S*)", code, flags=re.M))
        assert imports == {"diffmem.common"} and "import api" in code, (name, imports)
        assert "__file__" not in code and "OUT_DIR" in code


def lab_captions(name: str) -> list[str]:
    return [json.loads(line)["caption"] for line in (REPO / "data" / "lab" / name).read_text().splitlines()
            if line.strip()]


def test_token_significance_on_the_lab_by_default(tmp_path):
    prompt = lab_captions("memorized.jsonl")[0]
    start = time.time() - 1
    nb = execute("token_significance.ipynb", dict(NUM_INFERENCE_STEPS=10, TARGET_STEPS=[0, 1]), tmp_path)
    out = tmp_path / "token_significance_outputs"  # the default OUT_DIR, in the current folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.html", "token_bars.png", "tokens.jsonl"]
    assert [r["wrt"] for r in map(json.loads, (out / "tokens.jsonl").read_text().splitlines())] == [
        "prompt_embeds", "token_embeds"]
    assert written_since(REPO, start) == []  # nothing in the checkout (the package) itself
    text = "".join(outputs_of(nb, "text/plain"))
    assert "data/lab" in text and repr(prompt) in text  # the lab and its first memorized caption
    html = "".join(outputs_of(nb, "text/html"))
    for word in [w for w in prompt.split() if len(w) > 3]:
        assert word in html
    assert "wrt prompt_embeds" in html and "wrt token_embeds" in html
    assert "startoftext" not in html and "endoftext" not in html
    assert outputs_of(nb, "image/png"), "the bar chart was not displayed"
    assert "share of the summed score on BOS/EOS/padding" in text


def test_detection_report_from_the_installed_wheel_writes_only_its_out_dir(installed_wheel, tmp_path,
                                                                           monkeypatch):
    package = installed_wheel / "diffmem"
    before, start = tree_state(package), time.time() - 1
    monkeypatch.setenv("PYTHONPATH", str(installed_wheel))  # the kernel imports the wheel's diffmem
    cwd = tmp_path / "work"
    cwd.mkdir()
    nb = execute("detection_report.ipynb", dict(OUT_DIR="report", NUM_IMAGES_PER_PROMPT=2, NUM_INFERENCE_STEPS=10,
                                                SCORE_STEPS=2, TOP_K=3), cwd, package / "notebooks")
    out = cwd / "report"
    assert sorted(p.name for p in cwd.iterdir()) == ["report"]
    assert sorted(p.name for p in out.iterdir()) == ["noise_by_step.png", "roc.png", "scores.jsonl",
                                                     "scores_kde.png", "top_prompts.html"]
    assert tree_state(package) == before  # nothing written into the installed package
    assert written_since(REPO, start) == []  # nor into the checkout
    assert str(package / "data" / "lab") in "".join(outputs_of(nb, "text/plain"))  # the wheel's own lab
    results = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in results] == lab_captions("memorized.jsonl") + lab_captions("unmemorized.jsonl")
    assert all(len(r["text_noise_norm"]) == 2 and len(r["text_noise_norm"][0]) == 2 for r in results)
    text = "".join(outputs_of(nb, "text/plain"))
    assert "AUC" in text
    html = "".join(outputs_of(nb, "text/html"))
    top = max(results, key=lambda r: r["score"])
    assert top["label"] == 1  # the lab's memorized captions score highest
    assert escape(top["prompt"]) in html  # the top-scoring prompt is listed
    assert html.count('class="prompt"') == 3  # and its top 3 prompts explained token by token
