"""Write docs/cli/<script>.txt: each CLI's verbatim ``--help`` (``make docs``); ``--check`` compares instead.

    python docs/write_cli_help.py            # (re)write docs/cli/
    python docs/write_cli_help.py --check    # exit 1 naming each page that differs from the CLI's --help

The help is rendered in this process at a fixed width, so a page changes only when a CLI's options do.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent / "cli"
WIDTH = "100"
# (page name, CLI module, argv before --help): a CLI with subcommands has a page for each.
PAGES = [
    ("detect_mem", "diffmem.detect.detect_mem", []),
    ("evaluate", "diffmem.detect.evaluate", []),
    ("explain_tokens", "diffmem.detect.explain_tokens", []),
    ("generate", "diffmem.detect.generate", []),
    ("mem_ratio", "diffmem.detect.mem_ratio", []),
    ("emm", "diffmem.detect.emm", []),
    ("similarity", "diffmem.detect.similarity", []),
    ("similarity-features", "diffmem.detect.similarity", ["features"]),
    ("similarity-rpscore", "diffmem.detect.similarity", ["rpscore"]),
    ("similarity-mscore", "diffmem.detect.similarity", ["mscore"]),
    ("jacobian", "diffmem.detect.jacobian", []),
    ("inference_mem", "diffmem.mitigate.inference_mem", []),
    ("tradeoff", "diffmem.mitigate.tradeoff", []),
    ("train_text_to_image", "diffmem.finetune.train_text_to_image", []),
    ("train_unconditional", "diffmem.finetune.train_unconditional", []),
    ("dataset_tool", "diffmem.data.dataset_tool", []),
    ("build_lab", "diffmem.data.build_lab", []),
    ("convert_edm", "diffmem.data.convert_edm", []),
]


def render_help(module: str, head: list[str]) -> str:
    """The CLI's ``--help`` text at WIDTH columns."""
    cli = importlib.import_module(module)
    out = io.StringIO()
    old, argv0 = os.environ.get("COLUMNS"), sys.argv[0]
    os.environ["COLUMNS"] = WIDTH
    sys.argv[0] = module.rsplit(".", 1)[1] + ".py"  # argparse's prog: the script's name, as a user runs it
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            if hasattr(cli, "parse_args"):
                cli.parse_args([*head, "--help"])
            else:
                cli.build_parser().parse_args([*head, "--help"])
    finally:
        sys.argv[0] = argv0
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue()


def stale_pages() -> list[str]:
    """The pages that differ from (or are missing for) their CLI's help."""
    return [name for name, module, head in PAGES
            if not (DOCS / f"{name}.txt").is_file() or (DOCS / f"{name}.txt").read_text() != render_help(module, head)]


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        stale = stale_pages()
        for name in stale:
            print(f"docs/cli/{name}.txt differs from the CLI's --help; run make docs", file=sys.stderr)
        return 1 if stale else 0
    DOCS.mkdir(exist_ok=True)
    for name, module, head in PAGES:
        (DOCS / f"{name}.txt").write_text(render_help(module, head))
    print(f"wrote {len(PAGES)} pages in {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
