"""Detection metrics on score lists whose ROC, AUC, TPR@FPR and balanced accuracy are worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffmem.common.metrics import (
    ResultsFileError,
    auc,
    detection_metrics,
    fpr_key,
    max_balanced_accuracy,
    read_scored_rows,
    roc_points,
    split_rows,
    tpr_at_fpr,
)


def _scores_labels(pos, neg):
    return list(pos) + list(neg), [1] * len(pos) + [0] * len(neg)


def test_perfect_separation():
    s, y = _scores_labels([3.0, 4.0], [1.0, 2.0])
    fpr, tpr, thr = roc_points(s, y)
    assert auc(fpr, tpr) == 1.0
    assert max_balanced_accuracy(fpr, tpr) == 1.0
    assert tpr_at_fpr(fpr, tpr, 0.001) == 1.0
    # Nothing has FPR strictly below 0, not even the (0, 0) start point.
    assert tpr_at_fpr(fpr, tpr, 0.0) == 0.0
    m = detection_metrics(s, y)
    assert m["accuracy_threshold"] == 3.0
    assert m["tpr_at_fpr"] == {"0.1%": 1.0, "1%": 1.0, "3%": 1.0, "5%": 1.0}
    assert (m["n_pos"], m["n_neg"]) == (2, 2)
    assert m["mean_score_pos"] == 3.5 and m["mean_score_neg"] == 1.5


def test_inverted_scores_floor_at_half_accuracy():
    s, y = _scores_labels([1.0, 2.0], [3.0, 4.0])
    m = detection_metrics(s, y)
    assert m["auc"] == 0.0
    # Only the trivial "predict nothing" threshold (+inf, reported as None) reaches 1/2.
    assert m["accuracy"] == 0.5 and m["accuracy_threshold"] is None
    assert m["tpr_at_fpr"]["5%"] == 0.0


def test_ties_share_one_roc_point_and_count_half():
    # positives {1, 2}, negatives {0, 1}: pairs 2>1, 2>0, 1>0 win and 1=1 ties -> (3 + 0.5) / 4.
    s, y = _scores_labels([1.0, 2.0], [0.0, 1.0])
    fpr, tpr, thr = roc_points(s, y)
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(thr[1:], [2.0, 1.0, 0.0])
    assert auc(fpr, tpr) == pytest.approx(0.875)
    # (0.5 + 1 - 0)/2 = 0.75 at τ=2 and (1 + 1 - 0.5)/2 = 0.75 at τ=1.
    assert max_balanced_accuracy(fpr, tpr) == pytest.approx(0.75)
    assert tpr_at_fpr(fpr, tpr, 0.5) == 0.5  # the FPR-0.5 point is not strictly below 0.5
    assert tpr_at_fpr(fpr, tpr, 0.51) == 1.0


def test_collinear_roc_points_are_kept():
    # Cross-class ties at 3, 2 and 1 put every point on the diagonal; each is still a real threshold, and
    # τ=2 (FPR 2/3) is the one that gives TPR 2/3 below FPR 0.7. sklearn's drop_intermediate would drop it.
    s, y = _scores_labels([3.0, 2.0, 1.0], [3.0, 2.0, 1.0])
    fpr, tpr, _ = roc_points(s, y)
    np.testing.assert_allclose(fpr, [0.0, 1 / 3, 2 / 3, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.7) == pytest.approx(2 / 3)


def test_all_scores_tied_is_chance():
    m = detection_metrics([1.0, 1.0, 1.0], [1, 0, 0])
    assert m["auc"] == 0.5 and m["accuracy"] == 0.5


def test_tpr_at_fpr_is_strictly_below_target():
    # 100 negatives scored 0..99; 5 positives at 200 (above all) and 5 at 98.5 (above all but the 99).
    pos = [200.0] * 5 + [98.5] * 5
    neg = [float(i) for i in range(100)]
    m = detection_metrics(*_scores_labels(pos, neg))
    # At τ=98.5 the FPR is exactly 1/100 = 1%: allowed for 3% and 5%, not for 1% (strictly below).
    assert m["tpr_at_fpr"] == {"0.1%": 0.5, "1%": 0.5, "3%": 1.0, "5%": 1.0}
    assert m["auc"] == pytest.approx((5 * 100 + 5 * 99) / 1000)
    assert m["accuracy"] == pytest.approx((1.0 + 1 - 0.01) / 2)
    assert m["accuracy_threshold"] == 98.5


def test_balanced_accuracy_by_hand():
    # τ=0.3 catches all 3 positives and 1 of 4 negatives: (1 + 1 - 1/4)/2 = 0.875, the best threshold.
    s, y = _scores_labels([0.9, 0.8, 0.3], [0.7, 0.2, 0.1, 0.05])
    m = detection_metrics(s, y, fpr_targets=(0.01, 0.3))
    assert m["accuracy"] == pytest.approx(0.875)
    assert m["accuracy_threshold"] == 0.3
    assert m["auc"] == pytest.approx(11 / 12)  # 0.3 loses only to 0.7
    assert m["tpr_at_fpr"] == pytest.approx({"1%": 2 / 3, "30%": 1.0})


def _brute_force(pos, neg, target):
    """Independent of sklearn: every threshold from the data, score >= τ is positive."""
    pos, neg = np.asarray(pos), np.asarray(neg)
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([pos, neg]))])
    tpr = np.array([(pos >= t).mean() for t in thresholds])
    fpr = np.array([(neg >= t).mean() for t in thresholds])
    below = fpr < target
    wins = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    return wins, tpr[below].max() if below.any() else 0.0, ((tpr + 1 - fpr) / 2).max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    pos = np.round(rng.normal(0.5, 1.0, 37), 1)  # rounding makes many ties within and across classes
    neg = np.round(rng.normal(0.0, 1.0, 211), 1)
    m = detection_metrics(*_scores_labels(pos, neg), fpr_targets=(0.01, 0.05, 0.2))
    for target in (0.01, 0.05, 0.2):
        want_auc, want_tpr, want_acc = _brute_force(pos, neg, target)
        assert m["tpr_at_fpr"][fpr_key(target)] == pytest.approx(want_tpr)
    assert m["auc"] == pytest.approx(want_auc)
    assert m["accuracy"] == pytest.approx(want_acc)


def test_fpr_keys():
    assert [fpr_key(t) for t in (0.001, 0.01, 0.03, 0.05, 0.5)] == ["0.1%", "1%", "3%", "5%", "50%"]


@pytest.mark.parametrize("scores,labels,match", [
    ([1.0, 2.0], [1, 1], "both classes"),
    ([1.0, 2.0], [0, 0], "both classes"),
    ([], [], "both classes"),
    ([1.0, 2.0], [1], "differ in length"),
    ([1.0, float("nan")], [1, 0], "finite"),
    ([1.0, 2.0], [1, 2], "0 or 1"),
])
def test_invalid_inputs_raise(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        detection_metrics(scores, labels)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_rows_and_split_by_type(tmp_path):
    f = _write(tmp_path / "r.jsonl", [{"score": 3, "label": 1, "type": "VM"}, "",
                                      {"score": 2.5, "label": "1", "type": "TM"},
                                      {"score": 1, "label": False, "type": "N"},
                                      {"score": 0.5, "memorized": 0}])
    rows = read_scored_rows(f)
    assert [(r.score, r.label, r.type) for r in rows] == [(3.0, 1, "VM"), (2.5, 1, "TM"), (1.0, 0, "N"),
                                                        (0.5, 0, None)]
    assert rows[1].where == f"{f}:3"  # blank lines still count
    splits = split_rows(rows)
    assert list(splits) == ["all", "TM", "VM"]  # N is a negative's type: it makes no split
    np.testing.assert_array_equal(splits["VM"][0], [3.0, 1.0, 0.5])
    np.testing.assert_array_equal(splits["VM"][1], [1, 0, 0])


def test_forced_label_fills_and_conflicts(tmp_path):
    f = _write(tmp_path / "n.jsonl", [{"score": 1.0}, {"score": 2.0, "label": None}])
    assert [r.label for r in read_scored_rows(f, forced_label=0, role="--negative")] == [0, 0]
    g = _write(tmp_path / "m.jsonl", [{"score": 1.0, "label": 0}, {"score": 2.0, "label": 1}])
    with pytest.raises(ResultsFileError, match=rf"^{g}:2: .*--negative"):
        read_scored_rows(g, forced_label=0, role="--negative")


def test_tpr_rules_strict_and_closest():
    # positives {9, 8, 5, 4}, negatives {6, 2, 1, 0}. ROC points (FPR, TPR): (0, 0), (0, 1/4), (0, 1/2),
    # (1/4, 1/2) at τ=6, (1/4, 3/4), (1/4, 1), (1/2, 1), (3/4, 1), (1, 1).
    s, y = _scores_labels([9.0, 8.0, 5.0, 4.0], [6.0, 2.0, 1.0, 0.0])
    fpr, tpr, _ = roc_points(s, y)
    # target 0.2: strictly below -> FPR 0 only -> 1/2; nearest FPR is 1/4 (gap 0.05 < 0.2) -> its best TPR, 1.
    assert tpr_at_fpr(fpr, tpr, 0.2, "strict") == 0.5
    assert tpr_at_fpr(fpr, tpr, 0.2, "closest") == 1.0
    # target 0.1: FPR 0 is nearer (0.1 < 0.15), so both rules read 1/2.
    assert tpr_at_fpr(fpr, tpr, 0.1, "closest") == 0.5 == tpr_at_fpr(fpr, tpr, 0.1)
    # target exactly 1/4: strict excludes it, closest lands on it.
    assert tpr_at_fpr(fpr, tpr, 0.25) == 0.5 and tpr_at_fpr(fpr, tpr, 0.25, "closest") == 1.0
    m = detection_metrics(s, y, fpr_targets=(0.2,), tpr_rule="closest")
    assert m["tpr_at_fpr"] == {"20%": 1.0}
    with pytest.raises(ValueError, match="unknown TPR rule"):
        tpr_at_fpr(fpr, tpr, 0.2, "nearest")


def test_tpr_rules_of_jeon_and_early_detection():
    # The ROC of test_tpr_rules_strict_and_closest. nearest_first is numpy's argmin over |FPR - target| (Jeon et
    # al.'s detect_eval.py): at 0.2 the first point at FPR 1/4 is (1/4, 1/2); closest takes that segment's top.
    s, y = _scores_labels([9.0, 8.0, 5.0, 4.0], [6.0, 2.0, 1.0, 0.0])
    fpr, tpr, _ = roc_points(s, y)
    assert tpr_at_fpr(fpr, tpr, 0.2, "nearest_first") == 0.5
    assert tpr_at_fpr(fpr, tpr, 0.1, "nearest_first") == 0.0  # the first point at FPR 0 is the (0, 0) end
    # at_most keeps FPR <= target: at exactly 1/4 it reaches the segment's top, strict stops below it.
    assert tpr_at_fpr(fpr, tpr, 0.25, "at_most") == 1.0 and tpr_at_fpr(fpr, tpr, 0.2, "at_most") == 0.5
    # Against a direct reading of every threshold for a random ROC: at_most = max TPR over thresholds whose FPR <= x.
    rng = np.random.default_rng(0)
    s, y = np.round(rng.normal(size=60), 1), rng.integers(0, 2, 60)
    fpr, tpr, _ = roc_points(s, y)
    for x in (0.01, 0.05, 0.1, 0.3):
        direct = max((np.mean(s[y == 1] >= t), np.mean(s[y == 0] >= t)) for t in [np.inf, *s]
                     if np.mean(s[y == 0] >= t) <= x)
        assert tpr_at_fpr(fpr, tpr, x, "at_most") == pytest.approx(direct[0])
