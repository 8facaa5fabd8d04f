"""Evaluate memorization detection scores: AUC, best balanced accuracy and TPR at low FPR, per Webster type.

    python detect/evaluate.py RESULTS.jsonl [MORE.jsonl ...] \
        [--positive MEM.jsonl ...] [--negative NONMEM.jsonl ...] --out DIR [--fpr_targets 0.001 0.01 0.03 0.05]

Inputs are detect_mem results rows (``score``, optional ``label``, optional ``type``). Rows of positional files
must carry their own ``label`` 0/1; every row of a ``--positive`` / ``--negative`` file is labelled 1 / 0 (a row
whose own label disagrees is an error). Higher score = more likely memorized.

Writes DIR/summary.json, DIR/roc.png, DIR/scores_kde.png and prints a table. Bad input: one line on stderr
(``FILE:LINE: what was expected``) and exit code 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import ArgumentParser, run_main
from common.errors import ConfigError
from common.metrics import (
    DEFAULT_FPR_TARGETS,
    ResultsFileError,
    check_both_classes,
    evaluate_splits,
    format_table,
    plot_roc,
    plot_score_kde,
    read_scored_rows,
    score_groups,
)


@dataclass
class EvaluateConfig:
    results: list[Path]
    out: Path
    positive: list[Path] = field(default_factory=list)
    negative: list[Path] = field(default_factory=list)
    fpr_targets: tuple[float, ...] = DEFAULT_FPR_TARGETS

    def sources(self) -> list[tuple[Path, int | None, str]]:
        """(file, forced label or None, the option that gave it) for every input file."""
        return ([(p, None, "") for p in self.results] + [(p, 1, "--positive") for p in self.positive]
                + [(p, 0, "--negative") for p in self.negative])


def parse_args(argv=None) -> EvaluateConfig:
    p = ArgumentParser(prog="evaluate", description=__doc__.split("\n\n")[0],
                       epilog="Put positional files before --positive/--negative: those take every file after them.")
    p.add_argument("results", nargs="*", type=Path, metavar="RESULTS.jsonl",
                   help="results files whose rows carry their own 'label' 0/1 (detect_mem writes it when known)")
    p.add_argument("--positive", nargs="+", action="extend", type=Path, default=[], metavar="FILE",
                   help="results files whose rows are all memorized (label 1)")
    p.add_argument("--negative", nargs="+", action="extend", type=Path, default=[], metavar="FILE",
                   help="results files whose rows are all not memorized (label 0)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder for summary.json and plots")
    p.add_argument("--fpr_targets", nargs="+", type=float, default=list(DEFAULT_FPR_TARGETS), metavar="FPR",
                   help="FPR levels for TPR@FPR (TPR of the best threshold with FPR strictly below)")
    a = p.parse_args(argv)
    return EvaluateConfig(results=a.results, out=a.out, positive=a.positive, negative=a.negative,
                          fpr_targets=tuple(a.fpr_targets))


def validate(cfg: EvaluateConfig) -> None:
    """Argument-level checks; raises ConfigError or ResultsFileError with the one-line message."""
    if not cfg.sources():
        raise ConfigError("expected at least one results file (positional, --positive or --negative)")
    seen = {}
    for path, _, role in cfg.sources():
        key = path.resolve()
        if key in seen:
            raise ResultsFileError(f"{path}: given more than once ({seen[key] or 'positional'} and "
                                  f"{role or 'positional'}); each file may appear once")
        seen[key] = role
    bad = [t for t in cfg.fpr_targets if not 0 < t <= 1]
    if bad:
        raise ConfigError(f"expected --fpr_targets in (0, 1], got {bad[0]}")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ResultsFileError(f"{cfg.out}: expected --out to be a folder, it is a file")


def run(cfg: EvaluateConfig) -> dict:
    """Check every input, then write summary.json and the plots; returns the metrics per split."""
    validate(cfg)
    rows, inputs = [], []
    for path, forced, role in cfg.sources():
        file_rows = read_scored_rows(path, forced, role)
        rows += file_rows
        n_pos = sum(r.label for r in file_rows)
        inputs.append({"path": str(path), "labels": role or "from rows", "rows": len(file_rows),
                       "n_pos": n_pos, "n_neg": len(file_rows) - n_pos})
    check_both_classes(rows, [p for p, _, _ in cfg.sources()])

    metrics, curves = evaluate_splits(rows, cfg.fpr_targets)
    cfg.out.mkdir(parents=True, exist_ok=True)
    summary = {"inputs": inputs, "fpr_targets": list(cfg.fpr_targets),
               "score_direction": "higher score = more likely memorized", "splits": metrics,
               "plots": {"roc": "roc.png", "scores_kde": "scores_kde.png"}}
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_roc(curves, metrics, cfg.out / "roc.png")
    plot_score_kde(score_groups(rows), cfg.out / "scores_kde.png")
    print(format_table(metrics))
    print(f"wrote {cfg.out / 'summary.json'}, roc.png, scores_kde.png")
    return metrics


def main(argv=None) -> int:
    return run_main("evaluate", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
