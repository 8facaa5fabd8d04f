"""The notebooks run top to bottom on CPU (nbclient, the venv's own kernel) and are committed without outputs.

The kernel is ipykernel's "python3": jupyter_client launches it with sys.executable, i.e. the interpreter that
runs pytest, so it sees the same installed packages on a fresh clone after `pip install -e .[dev]`.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import pytest
from conftest import REPO

NOTEBOOKS = REPO / "notebooks"


def execute(name: str, params: dict, cwd: Path):
    """Run notebooks/NAME with params injected after its "parameters" cell (as papermill does)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
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


def lab_captions(name: str) -> list[str]:
    return [json.loads(line)["caption"] for line in (REPO / "data" / "lab" / name).read_text().splitlines()
            if line.strip()]


def test_token_significance_on_the_lab_by_default(tmp_path):
    prompt = lab_captions("memorized.jsonl")[0]
    nb = execute("token_significance.ipynb", dict(NUM_INFERENCE_STEPS=10, TARGET_STEPS=[0, 1]), REPO / "notebooks")
    text = "".join(outputs_of(nb, "text/plain"))
    assert "data/lab" in text and repr(prompt) in text  # the lab and its first memorized caption
    html = "".join(outputs_of(nb, "text/html"))
    for word in [w for w in prompt.split() if len(w) > 3]:
        assert word in html
    assert "wrt prompt_embeds" in html and "wrt token_embeds" in html
    assert "startoftext" not in html and "endoftext" not in html
    assert outputs_of(nb, "image/png"), "the bar chart was not displayed"
    assert "share of the summed score on BOS/EOS/padding" in text


def test_detection_report_scores_the_lab_and_reports(tmp_path):
    nb = execute("detection_report.ipynb", dict(OUTPUT_DIR=str(tmp_path), NUM_IMAGES_PER_PROMPT=2,
                                                NUM_INFERENCE_STEPS=10, SCORE_STEPS=2, TOP_K=3), REPO / "notebooks")
    results = [json.loads(line) for line in (tmp_path / "notebook.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in results] == lab_captions("memorized.jsonl") + lab_captions("unmemorized.jsonl")
    assert all(len(r["text_noise_norm"]) == 2 and len(r["text_noise_norm"][0]) == 2 for r in results)
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "score_kde.png").is_file()
    text = "".join(outputs_of(nb, "text/plain"))
    assert "AUC" in text
    html = "".join(outputs_of(nb, "text/html"))
    top = max(results, key=lambda r: r["score"])
    assert top["label"] == 1  # the lab's memorized captions score highest
    assert escape(top["prompt"]) in html  # the top-scoring prompt is listed
    assert html.count('class="prompt"') == 3  # and its top 3 prompts explained token by token
