"""Detection metrics for memorization scores: ROC, AUC, TPR at low FPR, best balanced accuracy, and the
reading, splitting and plotting of scored result rows that ``detect/evaluate.py`` (and later evaluators) share.

Convention everywhere: label 1 = memorized (positive), label 0 = not memorized, and a HIGHER score means
"more likely memorized" (Wen et al. 2024's text-noise norm). A threshold τ predicts memorized when score ≥ τ.

Only numpy is imported at module level so that input validation (and its one-line errors) stays fast;
scikit-learn, scipy and matplotlib are imported where they are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from diffmem.common.plotting import new_axes, save_figure_atomic
from diffmem.common.results import ResultsFileError
from diffmem.common.textfiles import iter_json_objects, parse_label

DEFAULT_FPR_TARGETS = (0.001, 0.01, 0.03, 0.05)
TPR_RULES = ("strict", "closest", "nearest_first", "at_most")
LABEL_KEYS = ("label", "memorized")  # detect_mem writes "label"; hand-made files may say "memorized"


# ----------------------------------------------------------------------------------------------------------
# Pure metrics
# ----------------------------------------------------------------------------------------------------------

def _binary_inputs(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """scores as float64 and labels as int arrays, after checking they form a two-class problem."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length ({s.size} vs {y.size})")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite numbers (found NaN or inf)")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(y.tolist()))}")
    y = y.astype(np.int64)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC metrics need both classes: got {n_pos} positive (label 1) and "
                         f"{n_neg} negative (label 0) scores")
    return s, y


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of every distinct threshold, score ≥ τ ⇒ positive (sklearn roc_curve, Fawcett 2006).

    ``drop_intermediate=False`` keeps collinear points: dropping them would change TPR at a fixed FPR.
    The first point is (0, 0) at τ = +inf; tied scores share one point (no threshold can split them).
    """
    from sklearn.metrics import roc_curve

    s, y = _binary_inputs(scores, labels)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thresholds


def auc(fpr, tpr) -> float:
    """Trapezoid area under the ROC = P(s₊ > s₋) + ½·P(s₊ = s₋) (Hanley & McNeil 1982; Wen et al. 2024 report it)."""
    from sklearn.metrics import auc as sk_auc

    return float(sk_auc(np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)))


def tpr_at_fpr(fpr, tpr, target: float, rule: str = "strict") -> float:
    """TPR at an FPR target, read off the ROC points (sorted by FPR, as roc_points returns them) by one of:

    - ``strict``: the largest TPR among points with FPR strictly below the target, 0 if none (Carlini et al. 2022,
      TPR @ low FPR; Wen et al. 2024's notebook);
    - ``closest``: the point whose FPR is nearest the target, the largest TPR among equally near points;
    - ``nearest_first``: the first point whose FPR is nearest the target (numpy's argmin: the smallest TPR among
      equally near points), the code of Jeon et al. 2025 and Asthana & Belagiannis 2026;
    - ``at_most``: the largest TPR among points with FPR ≤ the target (the ICML'26 Early Detection code).
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if rule in ("closest", "nearest_first"):
        gap = np.abs(fpr - target)
        return float(tpr[gap == gap.min()].max() if rule == "closest" else tpr[int(np.argmin(gap))])
    if rule not in ("strict", "at_most"):
        raise ValueError(f"unknown TPR rule {rule!r}; expected one of {', '.join(TPR_RULES)}")
    kept = fpr < target if rule == "strict" else fpr <= target
    return float(tpr[kept].max()) if kept.any() else 0.0


def max_balanced_accuracy(fpr, tpr) -> float:
    """max over thresholds τ of (TPR + 1 − FPR)/2: the "accuracy" MIA papers report (Carlini et al. 2022, S&P).

    It is the accuracy of the best single threshold on a class-balanced set, so it is ≥ 0.5 whenever the ROC
    contains its (0, 0) end point (always true for roc_points), whatever the class ratio of the data.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    return float(np.max((tpr + 1.0 - fpr) / 2.0))


def fpr_key(target: float) -> str:
    """The summary's name of an FPR target: 0.001 -> "0.1%", 0.01 -> "1%"."""
    return f"{target * 100:g}%"


def detection_metrics(scores, labels, fpr_targets: Sequence[float] = DEFAULT_FPR_TARGETS,
                      tpr_rule: str = "strict") -> dict:
    """AUC, best balanced accuracy (and its threshold), TPR at each FPR target, class sizes and mean scores."""
    s, y = _binary_inputs(scores, labels)
    fpr, tpr, thresholds = roc_points(s, y)
    balanced = (tpr + 1.0 - fpr) / 2.0
    best = int(np.argmax(balanced))
    # The +inf threshold of the (0, 0) point is not JSON; None there means "predict nothing memorized".
    best_threshold = float(thresholds[best]) if np.isfinite(thresholds[best]) else None
    return {
        "auc": auc(fpr, tpr),
        "accuracy": max_balanced_accuracy(fpr, tpr),
        "accuracy_threshold": best_threshold,
        "tpr_at_fpr": {fpr_key(t): tpr_at_fpr(fpr, tpr, t, tpr_rule) for t in fpr_targets},
        "n_pos": int(y.sum()),
        "n_neg": int(y.size - y.sum()),
        "mean_score_pos": float(s[y == 1].mean()),
        "mean_score_neg": float(s[y == 0].mean()),
    }


# ----------------------------------------------------------------------------------------------------------
# Scored result rows (detect_mem output)
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoredRow:
    """One scored prompt: its score, its 0/1 label, its Webster type if any, and ``FILE:LINE`` it came from."""

    score: float
    label: int
    type: str | None
    where: str
    prompt: str | None = None


def read_scored_rows(path: Path | str, forced_label: int | None = None, role: str = "") -> list[ScoredRow]:
    """Rows of a detect_mem results jsonl. With ``forced_label`` every row gets that label (``role`` names the
    option that gave it, for messages) and a row whose own label disagrees is an error; without it every row
    must carry its own label."""
    path = Path(path)
    if not path.is_file():
        raise ResultsFileError(f"{path}: no such file (expected a detect_mem results .jsonl)")
    rows: list[ScoredRow] = []
    for where, _, obj in iter_json_objects(path, ResultsFileError):
        if "score" not in obj:
            raise ResultsFileError(f"{where}: expected a 'score' key (a detect_mem results row)")
        score = obj["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ResultsFileError(f"{where}: expected 'score' to be a finite number, got {score!r}")
        own_label = parse_label(next((obj[k] for k in LABEL_KEYS if k in obj), None), where, ResultsFileError)
        if forced_label is not None:
            if own_label is not None and own_label != forced_label:
                raise ResultsFileError(f"{where}: the row says label {own_label} but the file was given with "
                                      f"{role or 'a forced label'} (label {forced_label})")
            label = forced_label
        elif own_label is None:
            raise ResultsFileError(f"{where}: expected a 'label' 0/1 in the row (or give the whole file with "
                                  f"--positive / --negative)")
        else:
            label = own_label
        type_ = obj.get("type")
        if type_ is not None and not isinstance(type_, str):
            raise ResultsFileError(f"{where}: expected 'type' to be a string such as VM or TM, got {type_!r}")
        prompt = obj.get("prompt") if isinstance(obj.get("prompt"), str) else None
        rows.append(ScoredRow(float(score), label, (type_ or "").strip() or None, where, prompt))
    if not rows:
        raise ResultsFileError(f"{path}:1: expected at least one JSON row with a 'score', found none")
    return rows


def check_both_classes(rows: Sequence[ScoredRow], paths: Iterable[Path | str]) -> None:
    """Raise ResultsFileError (naming the files) unless the rows hold both memorized and non-memorized prompts."""
    n_pos = sum(r.label for r in rows)
    n_neg = len(rows) - n_pos
    if n_pos and n_neg:
        return
    names = ", ".join(str(p) for p in paths)
    missing, option = ("label 0 (not memorized)", "--negative") if n_neg == 0 else ("label 1 (memorized)",
                                                                                    "--positive")
    raise ResultsFileError(f"{names}: expected rows of both classes, found no rows with {missing} "
                          f"({len(rows)} rows in all); give such results with {option}")


def split_rows(rows: Sequence[ScoredRow]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"all": (scores, labels), TYPE: ...}: one split per Webster type found among positives (e.g. VM, TM),
    each being the positives of that type against ALL negatives (the types of negatives, e.g. N, split nothing)."""
    negatives = [r for r in rows if r.label == 0]
    splits = {"all": _arrays(rows)}
    for type_ in sorted({r.type for r in rows if r.label == 1 and r.type}):
        splits[type_] = _arrays([r for r in rows if r.label == 1 and r.type == type_] + negatives)
    return splits


def _arrays(rows: Sequence[ScoredRow]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([r.score for r in rows], dtype=np.float64), np.array([r.label for r in rows], dtype=np.int64))


def score_groups(rows: Sequence[ScoredRow]) -> dict[str, np.ndarray]:
    """Scores per class for distribution plots, plus positives per Webster type when there are types."""
    groups = {"not memorized (0)": np.array([r.score for r in rows if r.label == 0]),
              "memorized (1)": np.array([r.score for r in rows if r.label == 1])}
    types = sorted({r.type for r in rows if r.label == 1 and r.type})
    if len(types) == 1 and all(r.type == types[0] for r in rows if r.label == 1):
        # One type holding every positive is the memorized group again: named, not drawn twice.
        groups[f"memorized (1), all {types[0]}"] = groups.pop("memorized (1)")
        return groups
    for type_ in types:
        groups[f"memorized, {type_}"] = np.array([r.score for r in rows if r.label == 1 and r.type == type_])
    return groups


def evaluate_splits(rows: Sequence[ScoredRow], fpr_targets: Sequence[float] = DEFAULT_FPR_TARGETS,
                    tpr_rule: str = "strict") -> tuple[dict[str, dict], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(metrics per split, (fpr, tpr) per split) for the splits of split_rows."""
    metrics, curves = {}, {}
    for name, (scores, labels) in split_rows(rows).items():
        metrics[name] = detection_metrics(scores, labels, fpr_targets, tpr_rule)
        fpr, tpr, _ = roc_points(scores, labels)
        curves[name] = (fpr, tpr)
    return metrics, curves


def format_table(metrics: dict[str, dict], first_column: str = "split") -> str:
    """A fixed-width text table: split (or method), class sizes, AUC, accuracy and every TPR@FPR column."""
    keys = list(next(iter(metrics.values()))["tpr_at_fpr"])
    header = [first_column, "n_pos", "n_neg", "AUC", "acc"] + [f"TPR@{k}FPR" for k in keys]
    lines = [header]
    for name, m in metrics.items():
        lines.append([name, str(m["n_pos"]), str(m["n_neg"]), f"{m['auc']:.4f}", f"{m['accuracy']:.4f}"]
                     + [f"{m['tpr_at_fpr'][k]:.4f}" for k in keys])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in lines)


# ----------------------------------------------------------------------------------------------------------
# Plots (off-screen figures, see common.plotting)
# ----------------------------------------------------------------------------------------------------------

ROC_MIN_FPR = 1e-3  # the log FPR axis starts at 0.1 % (lower when an FPR target or the data's smallest FPR is)
ROC_LABEL_GAP = 0.04  # TPR units between the annotated values at one FPR target (7-pt text on a 5-inch axis)


def spread_labels(values: Sequence[float], gap: float) -> list[float]:
    """Label positions for values on one axis, in the values' order: each at its value, moved up just enough to be
    at least gap above the label below it."""
    out = [float(v) for v in values]
    last = -math.inf
    for i in sorted(range(len(out)), key=lambda i: out[i]):
        out[i] = max(out[i], last + gap)
        last = out[i]
    return out


def fpr_from_key(key: str) -> float:
    """The FPR target of a summary key (:func:`fpr_key`'s inverse): "0.1%" -> 0.001."""
    return float(key.rstrip("%")) / 100


def distinct_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[list[str], np.ndarray,
                                                                                     np.ndarray]]:
    """(names, fpr, tpr) of each different curve, in order: a curve equal to an earlier one is not drawn again but
    joins its names (a Webster type that holds every positive is the ``all`` split over again)."""
    out: list[tuple[list[str], np.ndarray, np.ndarray]] = []
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
        same = next((c for c in out if np.array_equal(c[1], fpr) and np.array_equal(c[2], tpr)), None)
        if same is not None:
            same[0].append(name)
        else:
            out.append(([name], fpr, tpr))
    return out


def roc_axis_min(curves: dict[str, tuple[np.ndarray, np.ndarray]], fpr_targets: Sequence[float]) -> float:
    """The left end of the log FPR axis: a power of ten at or below ROC_MIN_FPR, every target and the smallest
    non-zero FPR of the curves."""
    low = min([ROC_MIN_FPR, *fpr_targets])
    for fpr, _ in curves.values():
        positive = np.asarray(fpr, dtype=np.float64)
        positive = positive[positive > 0]
        if positive.size:
            low = min(low, float(positive.min()))
    return 10.0 ** math.floor(math.log10(low))


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], metrics: dict[str, dict], path: Path | str,
             title: str = "Memorization detection ROC", fpr_targets: Sequence[float] | None = None):
    """ROC curves on a log FPR axis (where TPR at 0.1–5 % FPR is read), AUC in the legend, each curve's TPR at the
    FPR targets marked and annotated (targets None: those of the metrics), chance dashed; a curve that repeats an
    earlier one (another split or method with the same points) is drawn once, its names joined in the legend.
    ROC points at FPR 0 sit on the axis' left edge. Written atomically; returns the figure."""
    if fpr_targets is None:
        fpr_targets = [fpr_from_key(k) for k in next(iter(metrics.values()))["tpr_at_fpr"]]
    low = roc_axis_min(curves, fpr_targets)
    fig, ax = new_axes((6, 5))
    targets = list(dict.fromkeys(fpr_targets))
    for t in targets:
        ax.axvline(t, color="0.6", linestyle=":", linewidth=0.8)
    marks = []  # (target, TPR, colour) of every marked point
    for names, fpr, tpr in distinct_curves(curves):
        m = metrics[names[0]]
        (line,) = ax.plot(np.maximum(fpr, low), tpr, label=f"{' = '.join(names)} (AUC {m['auc']:.3f})")
        ys = [m["tpr_at_fpr"][fpr_key(t)] for t in targets]
        ax.plot(targets, ys, marker="o", markersize=5, linestyle="none", color=line.get_color())
        marks += [(t, y, line.get_color()) for t, y in zip(targets, ys)]
    for t in targets:  # each target's values right of its line, moved apart where curves meet
        here = [(y, colour) for x, y, colour in marks if x == t]
        for (y, colour), at in zip(here, spread_labels([y for y, _ in here], ROC_LABEL_GAP)):
            ax.annotate(f"{y:.2f}", (t, y), xytext=(t * 1.1, at), fontsize=7, color=colour, va="center")
    chance = np.logspace(math.log10(low), 0, 200)
    ax.plot(chance, chance, "k--", linewidth=0.8, label="chance")
    ax.plot([], [], marker="o", linestyle="none", color="0.4",
            label="TPR at " + ", ".join(fpr_key(t) for t in fpr_targets) + " FPR (dotted)")
    ax.set_xscale("log")
    ax.set(xlabel="false positive rate (log scale)", ylabel="true positive rate", xlim=(low, 1), ylim=(0, 1.01),
           title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return fig


def plot_score_kde(groups: dict[str, np.ndarray], path: Path | str, xlabel: str = "score") -> None:
    """Gaussian kernel density (scipy gaussian_kde, Scott's bandwidth) of each group's scores.

    A group with fewer than two distinct values has no density; it is drawn as a vertical line at its value.
    """
    from scipy.stats import gaussian_kde

    values = np.concatenate([g for g in groups.values() if g.size])
    lo, hi = float(values.min()), float(values.max())
    pad = 0.1 * (hi - lo) if hi > lo else max(abs(lo) * 0.1, 0.5)
    grid = np.linspace(lo - pad, hi + pad, 512)
    fig, ax = new_axes((6, 4))
    for name, scores in groups.items():
        if scores.size == 0:
            continue
        label = f"{name}, n={scores.size}"
        if np.unique(scores).size < 2:
            ax.axvline(float(scores[0]), linestyle=":", label=f"{label} (single value)")
        else:
            ax.plot(grid, gaussian_kde(scores)(grid), label=label)
    ax.set(xlabel=xlabel, ylabel="density", title="Score distributions")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
