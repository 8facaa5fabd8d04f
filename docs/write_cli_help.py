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
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent / "cli"
WIDTH = "100"
# (page name, CLI module, argv before --help): a CLI with subcommands has a page for each.
PAGES = [
    ("diffmem", "diffmem.__main__", []),  # the verbs (diffmem --help)
    ("detect_mem", "diffmem.detect.detect_mem", []),
    ("screen", "diffmem.detect.screen", []),
    ("benchmark", "diffmem.detect.benchmark", []),
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
    ("demo", "diffmem.detect.demo", []),
    ("inference_mem", "diffmem.mitigate.inference_mem", []),
    ("tradeoff", "diffmem.mitigate.tradeoff", []),
    ("train_text_to_image", "diffmem.finetune.train_text_to_image", []),
    ("train_unconditional", "diffmem.finetune.train_unconditional", []),
    ("dataset_tool", "diffmem.data.dataset_tool", []),
    ("build_lab", "diffmem.data.build_lab", []),
    ("build_tiny", "diffmem.data.build_tiny", []),
    ("convert_edm", "diffmem.data.convert_edm", []),
    ("prompt_sets", "diffmem.data.prompt_sets", []),
]


def render_help(module: str, head: list[str]) -> str:
    """The CLI's ``--help`` text at WIDTH columns."""
    cli = importlib.import_module(module)
    if hasattr(cli, "usage"):  # the diffmem command: its verb list
        return cli.usage()
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


VOCABULARY = DOCS.parent / "vocabulary.md"
VOCABULARY_HEAD = """# The option vocabulary

One concept, one canonical option in every command; the spellings of the anchors' READMEs (Wen et al.'s, the
diffusers examples', EDM's, DiffMemorize's) and our earlier ones stay as aliases, which each command's `--help`
lists beside the canonical name. Written by `make docs` from the parsers themselves (`docs/write_cli_help.py`).

| concept | canonical | what it is |
|---|---|---|
| model | `--model` | a Hub id (`owner/name`), a pipeline folder, an EDM snapshot or run folder, an EDM pickle |
| data | `--data` | what the command reads as its data: a prompt file, an image folder, an EDM dataset zip, a source |
| output | `--out` | the folder the run writes (`dataset` and `similarity features`: the one file they make) |
| batch | `--batch_size` | items per forward pass or optimizer step (its help says which) |
| seed | `--seed`, `--seeds` | one base seed (sample *i* uses seed + *i*); a seed list `0-63` or `1,5,7-9` |
| steps | `--target_steps` | which DDIM steps: `0`, `0-9`, `0,5,10-12` (or `0 5 10-12`) or `all` |
| thresholds | `--mem_ratio_threshold`, `--sscd_threshold`, `--energy_threshold` | one name per meaning |

- Lists: space-separated (`--sizes 16 32 64`); numbers and seed or step specs also take commas (`--sizes 16,32,64`,
  EDM's form); a repeated option extends the list; the first use replaces the default.
- Every `--name_with_underscores` also answers to `--name-with-underscores` (`--knn-ref`, `--batch-gpu`,
  `--max-images`).
- No abbreviations: `--out` is never taken for `--outdir`; an unknown option is one line naming the closest one.
- `diffmem detect --score_steps N` (the first N steps) is the one old spelling whose value reads differently; it
  sets `--target_steps 0-(N-1)`.

## Aliases, command by command

| command | canonical | also answers to |
|---|---|---|
"""


def alias_rows(name: str, text: str) -> list[str]:
    """The table rows of one help page: each option listed with aliases (``  --out, --outdir DIR``)."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"  (--[\w-]+(?:, --[\w-]+)+)", line)
        if m:
            canonical, *aliases = m.group(1).split(", ")
            rows.append(f"| {name} | `{canonical}` | {', '.join(f'`{a}`' for a in aliases)} |")
    return rows


def vocabulary_text() -> str:
    """docs/vocabulary.md: the concepts, then every alias of every command."""
    rows = [row for name, module, head in PAGES for row in alias_rows(name, render_help(module, head))]
    return VOCABULARY_HEAD + "\n".join(rows) + "\n"


def stale_pages() -> list[str]:
    """The pages that differ from (or are missing for) their CLI's help, and the vocabulary page."""
    stale = [name for name, module, head in PAGES
             if not (DOCS / f"{name}.txt").is_file() or (DOCS / f"{name}.txt").read_text() != render_help(module, head)]
    if not VOCABULARY.is_file() or VOCABULARY.read_text() != vocabulary_text():
        stale.append("../vocabulary.md")
    return stale


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        stale = stale_pages()
        for name in stale:
            print(f"docs/cli/{name}.txt differs from the CLI's --help; run make docs", file=sys.stderr)
        return 1 if stale else 0
    DOCS.mkdir(exist_ok=True)
    for name, module, head in PAGES:
        (DOCS / f"{name}.txt").write_text(render_help(module, head))
    VOCABULARY.write_text(vocabulary_text())
    print(f"wrote {len(PAGES)} pages in {DOCS} and {VOCABULARY}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
