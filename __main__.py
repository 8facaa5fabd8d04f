"""``diffmem <verb> …`` (and ``python -m diffmem …``): every diffmem CLI behind one command.

``diffmem --help`` lists the verbs, each with the first sentence of its CLI's docstring, read from the source file
so that the list answers at once (no torch, no CLI module imported); ``diffmem <verb> --help`` is that CLI's help,
and ``diffmem <verb> ARGS`` runs its ``main(ARGS)`` exactly as ``python <folder>/<script>.py ARGS`` does.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import sys

# verb: the CLI module whose main(argv) it runs. The arm's order: text-to-image, then unconditional (EDM), then data.
VERBS = {
    "detect": "diffmem.detect.detect_mem",
    "screen": "diffmem.detect.screen",
    "benchmark": "diffmem.detect.benchmark",
    "evaluate": "diffmem.detect.evaluate",
    "explain": "diffmem.detect.explain_tokens",
    "mitigate": "diffmem.mitigate.inference_mem",
    "tradeoff": "diffmem.mitigate.tradeoff",
    "train": "diffmem.finetune.train_text_to_image",
    "demo": "diffmem.detect.demo",
    "train-unconditional": "diffmem.finetune.train_unconditional",
    "generate": "diffmem.detect.generate",
    "mem-ratio": "diffmem.detect.mem_ratio",
    "emm": "diffmem.detect.emm",
    "similarity": "diffmem.detect.similarity",
    "jacobian": "diffmem.detect.jacobian",
    "dataset": "diffmem.data.dataset_tool",
    "convert-edm": "diffmem.data.convert_edm",
    "build-lab": "diffmem.data.build_lab",
    "build-tiny": "diffmem.data.build_tiny",
    "prompt-sets": "diffmem.data.prompt_sets",
}


def verb_aliases() -> dict[str, str]:
    """Each CLI's script name also works as its verb (``diffmem detect-mem``, ``diffmem dataset_tool``)."""
    aliases = {}
    for verb, module in VERBS.items():
        stem = module.rsplit(".", 1)[1]
        for name in (stem, stem.replace("_", "-"), verb.replace("-", "_")):
            if name not in VERBS:
                aliases[name] = verb
    return aliases


def summary_line(module: str) -> str:
    """The first paragraph of a CLI module's docstring, without importing the module."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    first = " ".join(doc.split("\n\n", 1)[0].split()).rstrip(".")
    return first if len(first) <= 96 else first[:95].rsplit(" ", 1)[0] + " …"


def usage() -> str:
    from diffmem.common import __version__

    width = max(map(len, VERBS)) + 2
    rows = "\n".join(f"  {verb:<{width}}{summary_line(module)}" for verb, module in VERBS.items())
    return (f"usage: diffmem <verb> [options]   (diffmem {__version__}; also: python -m diffmem)\n\n"
            f"Find, explain and remove memorization in diffusion models.\n\nverbs:\n{rows}\n\n"
            "diffmem <verb> --help shows a verb's options; each CLI's script name works as its verb too.\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        from diffmem.common import __version__

        print(f"diffmem {__version__}")
        return 0
    aliases = verb_aliases()
    verb = aliases.get(argv[0], argv[0])
    if verb not in VERBS:
        close = difflib.get_close_matches(argv[0], [*VERBS, *aliases], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"diffmem: error: unknown verb {argv[0]!r}{hint}; diffmem --help lists them", file=sys.stderr)
        return 2
    # argparse names the program after argv[0]: usage lines and errors then read "diffmem detect".
    sys.argv[0] = f"diffmem {verb}"
    return importlib.import_module(VERBS[verb]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
