"""Evaluate memorization detection scores: AUC, best balanced accuracy and TPR at low FPR, per Webster type.

    python detect/evaluate.py RESULTS.jsonl [MORE.jsonl ...] \
        [--positive MEM.jsonl ...] [--negative NONMEM.jsonl ...] --out DIR [--fpr_targets 0.001 0.01 0.03 0.05]

Inputs are detect_mem results rows (``score``, optional ``label``, optional ``type``). Rows of positional files
must carry their own ``label`` 0/1; every row of a ``--positive`` / ``--negative`` file is labelled 1 / 0 (a row
whose own label disagrees is an error). Higher score = more likely memorized.

Comparing detectors on the same prompts (one table row and one ROC curve per detector):

    python detect/evaluate.py A.jsonl B.jsonl C.jsonl --compare --out DIR [--names wen anisotropy sharpness]
    python detect/evaluate.py --compare --positive A_mem B_mem --negative A_non B_non --out DIR

Each positional file is one detector's results, or the i-th --positive file pairs with the i-th --negative one.
``--tpr_rule strict`` (default) reads TPR@x as the largest TPR with FPR strictly below x; ``closest`` takes the
ROC point whose FPR is nearest x, so figures compare with papers that read it that way.

Writes DIR/summary.json, DIR/roc.png (one curve per split or detector on a log FPR axis from 0.1 % or lower, each
curve's TPR at the --fpr_targets marked and annotated; a curve equal to another, such as a Webster type holding every
positive, is drawn once with both names), DIR/scores_kde.png (not with --compare) and prints a table. Bad input:
one line on stderr (``FILE:LINE: what was expected``) and exit code 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, run_main, settings_from_args
from diffmem.common.errors import ConfigError
from diffmem.common.metrics import (
    DEFAULT_FPR_TARGETS,
    TPR_RULES,
    ResultsFileError,
    check_both_classes,
    detection_metrics,
    evaluate_splits,
    format_table,
    plot_roc,
    plot_score_kde,
    read_scored_rows,
    roc_points,
    score_groups,
)
from diffmem.common.results import write_json_atomic
from diffmem.common.settings import float_list, option


@dataclass
class EvaluateConfig:
    out: Path = option(type=Path, metavar="DIR", aliases=("--output_dir",),
                       help="the folder the run writes (summary.json and plots)")
    results: list[Path] = option(default_factory=list, positional=True, nargs="*", type=Path, metavar="RESULTS.jsonl",
                                 help="results files whose rows carry their own 'label' 0/1 (detect_mem writes it "
                                      "when known)")
    positive: list[Path] = option(default_factory=list, nargs="+", type=Path, metavar="FILE",
                                  help="results files whose rows are all memorized (label 1)")
    negative: list[Path] = option(default_factory=list, nargs="+", type=Path, metavar="FILE",
                                  help="results files whose rows are all not memorized (label 0)")
    fpr_targets: tuple[float, ...] = option(DEFAULT_FPR_TARGETS, nargs="+", type=float_list, metavar="FPR",
                                            help="FPR levels for TPR@FPR (see --tpr_rule)")
    tpr_rule: str = option("strict", choices=TPR_RULES,
                           help="strict: largest TPR with FPR strictly below the target; closest: the ROC point "
                                "nearest it")
    compare: bool = option(False, help="each positional file (or --positive/--negative pair) is one detector on the "
                                       "same prompts")
    names: list[str] = option(default_factory=list, nargs="+", metavar="NAME",
                              help="with --compare: one name per detector (empty: the file names)")

    def __post_init__(self):
        self.fpr_targets = tuple(self.fpr_targets)  # the options give a list

    def sources(self) -> list[tuple[Path, int | None, str]]:
        """(file, forced label or None, the option that gave it) for every input file."""
        return ([(p, None, "") for p in self.results] + [(p, 1, "--positive") for p in self.positive]
                + [(p, 0, "--negative") for p in self.negative])

    def validate(self) -> None:
        """Argument-level checks; raises ConfigError or ResultsFileError with the one-line message."""
        if not self.sources():
            raise ConfigError("expected at least one results file (positional, --positive or --negative)")
        seen = {}
        for path, _, role in self.sources():
            key = path.resolve()
            if key in seen:
                raise ResultsFileError(f"{path}: given more than once ({seen[key] or 'positional'} and "
                                      f"{role or 'positional'}); each file may appear once")
            seen[key] = role
        bad = [t for t in self.fpr_targets if not 0 < t <= 1]
        if bad:
            raise ConfigError(f"expected --fpr_targets in (0, 1], got {bad[0]}")
        if self.names and not self.compare:
            raise ConfigError("--names applies to --compare only")
        if self.compare:
            if self.results and (self.positive or self.negative):
                raise ConfigError("--compare takes either positional files or --positive/--negative pairs, not both")
            if len(self.positive) != len(self.negative):
                raise ConfigError(f"--compare pairs the i-th --positive with the i-th --negative file; got "
                                  f"{len(self.positive)} and {len(self.negative)}")
            n = len(self.results) or len(self.positive)
            if self.names and len(self.names) != n:
                raise ConfigError(f"--names gives {len(self.names)} names for {n} compared detectors")
            names = self.names or method_names(self)
            if len(set(names)) != len(names):
                raise ConfigError(f"--compare needs a distinct name per detector, got {names}; pass --names")
        if self.out.exists() and not self.out.is_dir():
            raise ResultsFileError(f"{self.out}: expected --out to be a folder, it is a file")


def parse_args(argv=None) -> EvaluateConfig:
    p = ArgumentParser(prog="evaluate", description=__doc__.split("\n\n")[0],
                       epilog="Put positional files before --positive/--negative: those take every file after them.")
    add_settings_arguments(p, EvaluateConfig)
    return settings_from_args(EvaluateConfig, p.parse_args(argv))


def method_names(cfg: EvaluateConfig) -> list[str]:
    """The default name of each compared detector: its (positive) file's name without .jsonl."""
    return [p.stem for p in (cfg.results or cfg.positive)]


def run_compare(cfg: EvaluateConfig) -> dict:
    """One metrics entry and one ROC curve per detector, after checking they scored the same prompts."""
    names = cfg.names or method_names(cfg)
    groups = ([[(p, None, "")] for p in cfg.results] if cfg.results else
              [[(p, 1, "--positive"), (n, 0, "--negative")] for p, n in zip(cfg.positive, cfg.negative)])
    rows_of, inputs = {}, []
    for name, group in zip(names, groups):
        rows = []
        for path, forced, role in group:
            rows += read_scored_rows(path, forced, role)
        check_both_classes(rows, [p for p, _, _ in group])
        rows_of[name] = rows
        inputs.append({"name": name, "paths": [str(p) for p, _, _ in group], "rows": len(rows)})
    check_same_prompts(rows_of, groups)

    metrics, curves = {}, {}
    for name, rows in rows_of.items():
        scores, labels = [r.score for r in rows], [r.label for r in rows]
        metrics[name] = detection_metrics(scores, labels, cfg.fpr_targets, cfg.tpr_rule)
        fpr, tpr, _ = roc_points(scores, labels)
        curves[name] = (fpr, tpr)
    cfg.out.mkdir(parents=True, exist_ok=True)
    summary = {"inputs": inputs, "fpr_targets": list(cfg.fpr_targets), "tpr_rule": cfg.tpr_rule,
               "score_direction": "higher score = more likely memorized", "methods": metrics,
               "plots": {"roc": "roc.png"}}
    write_json_atomic(cfg.out / "summary.json", summary)
    plot_roc(curves, metrics, cfg.out / "roc.png", title="Memorization detectors, same prompts",
             fpr_targets=cfg.fpr_targets)
    print(format_table(metrics, first_column="method"))
    print(f"wrote {cfg.out / 'summary.json'}, roc.png")
    return metrics


def check_same_prompts(rows_of: dict[str, list], groups: list[list]) -> None:
    """Raise ResultsFileError unless every detector scored the same (prompt, label) multiset (or, for rows
    without prompts, the same class sizes): a comparison on different prompts compares nothing."""
    def key(rows):
        if all(r.prompt is not None for r in rows):
            return sorted((r.prompt, r.label) for r in rows)
        return (sum(r.label for r in rows), sum(1 - r.label for r in rows))

    (first, first_rows), first_group = next(iter(rows_of.items())), groups[0]
    for (name, rows), group in zip(rows_of.items(), groups):
        if key(rows) != key(first_rows):
            raise ResultsFileError(f"{group[0][0]}: detector {name!r} scored other prompts than {first!r} "
                                  f"({first_group[0][0]}); --compare needs the same prompts for every detector")


def run(cfg: EvaluateConfig) -> dict:
    """Check every input, then write summary.json and the plots; returns the metrics per split."""
    cfg.validate()
    if cfg.compare:
        return run_compare(cfg)
    rows, inputs = [], []
    for path, forced, role in cfg.sources():
        file_rows = read_scored_rows(path, forced, role)
        rows += file_rows
        n_pos = sum(r.label for r in file_rows)
        inputs.append({"path": str(path), "labels": role or "from rows", "rows": len(file_rows),
                       "n_pos": n_pos, "n_neg": len(file_rows) - n_pos})
    check_both_classes(rows, [p for p, _, _ in cfg.sources()])

    metrics, curves = evaluate_splits(rows, cfg.fpr_targets, cfg.tpr_rule)
    cfg.out.mkdir(parents=True, exist_ok=True)
    summary = {"inputs": inputs, "fpr_targets": list(cfg.fpr_targets), "tpr_rule": cfg.tpr_rule,
               "score_direction": "higher score = more likely memorized", "splits": metrics,
               "plots": {"roc": "roc.png", "scores_kde": "scores_kde.png"}}
    write_json_atomic(cfg.out / "summary.json", summary)
    plot_roc(curves, metrics, cfg.out / "roc.png", fpr_targets=cfg.fpr_targets)
    plot_score_kde(score_groups(rows), cfg.out / "scores_kde.png")
    print(format_table(metrics))
    print(f"wrote {cfg.out / 'summary.json'}, roc.png, scores_kde.png")
    return metrics


def main(argv=None) -> int:
    return run_main("evaluate", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
