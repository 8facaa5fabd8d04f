"""docs/cli/<script>.txt is each CLI's verbatim --help (written by ``make docs``), for every CLI there is."""

from __future__ import annotations

from conftest import REPO, load_script


def test_every_cli_has_its_help_page_and_each_page_is_current():
    tool = load_script("docs/write_cli_help.py", "write_cli_help")
    scripts = {p.stem for folder in ("detect", "mitigate", "finetune", "data") for p in (REPO / folder).glob("*.py")
               if p.stem != "__init__"}
    assert scripts <= {module.rsplit(".", 1)[1] for _, module, _ in tool.PAGES}, "a CLI without a help page"
    assert tool.stale_pages() == [], "docs/cli is stale: run make docs"
    text = (REPO / "docs" / "cli" / "detect_mem.txt").read_text()
    assert text.startswith("usage: detect_mem.py")
    assert "--model, --model_id, --pretrained_model_name_or_path MODEL" in text
    assert "(required)" in text and (REPO / "docs" / "vocabulary.md").is_file()
