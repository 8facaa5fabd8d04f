"""detect/evaluate.py end to end through its real entry point, on small hand-written results files."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, run_in_process

SCRIPT = "detect/evaluate.py"

# Positives: VM {5, 4}, TM {3, 0.5}; negatives {2, 1, 0.25, 0}. Worked out by hand:
#   all: 3 positives beat all 4 negatives, 0.5 beats 2 -> AUC 14/16; best τ=3: (3/4 + 1 - 0)/2 = 0.875;
#        the smallest non-zero FPR is 1/4, so every target < 25 % sees FPR 0 only: TPR 3/4.
#   VM:  perfect, AUC 1, accuracy 1, TPR 1.
#   TM:  (4 + 2)/8 = 0.75 AUC; best τ=3: (1/2 + 1)/2 = 0.75; TPR at FPR 0 is 1/2.
POSITIVES = [{"row": 0, "index": 10, "prompt": "a", "type": "VM", "score": 5.0, "text_noise_norm": [[5.0]]},
             {"row": 1, "index": 11, "prompt": "b", "type": "VM", "score": 4},
             {"row": 2, "index": 12, "prompt": "c", "type": "TM", "score": 3.0},
             {"row": 3, "index": 13, "prompt": "d", "type": "TM", "label": 1, "score": 0.5}]
NEGATIVES = [{"row": i, "index": 20 + i, "prompt": "n", "score": s} for i, s in enumerate([2.0, 1.0, 0.25, 0.0])]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    return _write(tmp_path / "mem.jsonl", POSITIVES), _write(tmp_path / "nonmem.jsonl", NEGATIVES)


def test_positive_negative_files_end_to_end(tmp_path, files):
    pos, neg = files
    out = tmp_path / "eval"
    r = run_cli(SCRIPT, "--positive", pos, "--negative", neg, "--out", out)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    splits = summary["splits"]
    assert list(splits) == ["all", "TM", "VM"]
    assert splits["all"]["auc"] == pytest.approx(14 / 16)
    assert splits["all"]["accuracy"] == pytest.approx(0.875)
    assert splits["all"]["accuracy_threshold"] == 3.0
    assert splits["all"]["tpr_at_fpr"] == pytest.approx({"0.1%": 0.75, "1%": 0.75, "3%": 0.75, "5%": 0.75})
    assert (splits["all"]["n_pos"], splits["all"]["n_neg"]) == (4, 4)
    assert splits["all"]["mean_score_pos"] == pytest.approx(12.5 / 4)
    assert splits["all"]["mean_score_neg"] == pytest.approx(3.25 / 4)
    assert splits["VM"]["auc"] == 1.0 and splits["VM"]["accuracy"] == 1.0
    assert (splits["VM"]["n_pos"], splits["VM"]["n_neg"]) == (2, 4)
    assert splits["TM"]["auc"] == pytest.approx(0.75) and splits["TM"]["accuracy"] == pytest.approx(0.75)
    assert splits["TM"]["tpr_at_fpr"]["1%"] == pytest.approx(0.5)
    assert [(i["labels"], i["rows"]) for i in summary["inputs"]] == [("--positive", 4), ("--negative", 4)]
    for png in ("roc.png", "scores_kde.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = r.stdout.splitlines()
    assert table[0].split()[:5] == ["split", "n_pos", "n_neg", "AUC", "acc"]
    assert table[1].split() == ["all", "4", "4", "0.8750", "0.8750", "0.7500", "0.7500", "0.7500", "0.7500"]
    assert [line.split()[0] for line in table[2:4]] == ["TM", "VM"]


def test_labels_from_rows_and_custom_targets(tmp_path, files):
    _, neg = files
    # One positional file holding both classes through its own labels (and Webster's N type on a negative).
    mixed = _write(tmp_path / "mixed.jsonl", [{**row, "label": 1} for row in POSITIVES[:2]]
                   + [{"score": 2.0, "label": 0, "type": "N"}])
    out = tmp_path / "eval"
    r = run_in_process(SCRIPT, mixed, "--negative", neg, "--out", out, "--fpr_targets", "0.01", "0.3")
    assert r.returncode == 0, r.stderr
    splits = json.loads((out / "summary.json").read_text())["splits"]
    assert list(splits) == ["all", "VM"]  # N belongs to a negative: no split of its own
    assert (splits["all"]["n_pos"], splits["all"]["n_neg"]) == (2, 5)
    assert splits["all"]["auc"] == 1.0
    assert set(splits["all"]["tpr_at_fpr"]) == {"1%", "30%"}
    for png in ("roc.png", "scores_kde.png"):  # VM is the 'all' split again: drawn once (next test)
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roc_has_a_log_fpr_axis_the_targets_marked_and_no_split_twice(tmp_path, files):
    from diffmem.common.metrics import (
        evaluate_splits,
        plot_roc,
        read_scored_rows,
        roc_axis_min,
        score_groups,
        spread_labels,
    )

    _, neg = files
    vm = _write(tmp_path / "vm.jsonl", POSITIVES[:2])  # every positive is VM: the VM split is 'all' again
    rows = read_scored_rows(vm, 1, "--positive") + read_scored_rows(neg, 0, "--negative")
    metrics, curves = evaluate_splits(rows, (0.01, 0.3))
    assert list(curves) == ["all", "VM"]
    fig = plot_roc(curves, metrics, tmp_path / "roc.png", fpr_targets=(0.01, 0.3))
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_xlim() == pytest.approx((1e-3, 1))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["all = VM (AUC 1.000)", "chance", "TPR at 1%, 30% FPR (dotted)"]
    # one curve, its TPR@1% and @30% marked at the targets and annotated (a perfect split: 1 at FPR 0)
    marked = [line for line in ax.get_lines() if line.get_marker() == "o" and len(line.get_xdata())]
    assert len(marked) == 1 and list(marked[0].get_xdata()) == [0.01, 0.3] and list(marked[0].get_ydata()) == [1, 1]
    assert [t.get_text() for t in ax.texts] == ["1.00", "1.00"]
    assert list(score_groups(rows)) == ["not memorized (0)", "memorized (1), all VM"]
    # the axis reaches below 0.1 % when a target or the data's smallest FPR does
    assert roc_axis_min({"x": ([0.0, 0.0004, 1.0], [0.0, 1.0, 1.0])}, (0.01,)) == pytest.approx(1e-4)
    assert roc_axis_min({"x": ([0.0, 0.5, 1.0], [0.0, 1.0, 1.0])}, (0.002, 0.05)) == pytest.approx(1e-3)
    # two curves' values at one target, close together: their labels are moved apart, in place otherwise
    assert spread_labels([0.5, 0.49, 0.9], 0.04) == pytest.approx([0.53, 0.49, 0.9])


def _bad_case(tmp_path, name):
    """(argv, the file the error must name, its line or None) for each malformed input."""
    good_neg = _write(tmp_path / "good_neg.jsonl", NEGATIVES)
    good_pos = _write(tmp_path / "good_pos.jsonl", POSITIVES)
    bad = tmp_path / "bad.jsonl"
    row = {"score": 1.0, "label": 1}
    cases = {
        "invalid_json": ([row, "{not json"], "positional", 2),
        "not_an_object": (["[1, 2]"], "positional", 1),
        "missing_score": ([row, "", {"label": 1}], "positional", 3),
        "string_score": ([{"score": "high", "label": 1}], "positional", 1),
        "bool_score": ([{"score": True, "label": 1}], "positional", 1),
        "nan_score": (['{"score": NaN, "label": 1}'], "positional", 1),
        "bad_label": ([row, {"score": 1.0, "label": 2}], "positional", 2),
        "missing_label": ([row, {"score": 1.0}], "positional", 2),
        "label_conflicts_with_option": ([{"score": 1.0}, {"score": 1.0, "label": 1}], "--negative", 2),
        "empty_file": ([], "positional", 1),
        "one_class_only": ([row, row], "positional-alone", None),
    }
    rows, role, line = cases[name]
    _write(bad, rows)
    if role == "positional":
        argv = [bad, "--negative", good_neg]
    elif role == "--negative":
        argv = ["--positive", good_pos, "--negative", bad]
    else:
        argv = [bad]
    return argv, bad, line


@pytest.mark.parametrize("name", ["invalid_json", "not_an_object", "missing_score", "string_score", "bool_score",
                                  "nan_score", "bad_label", "missing_label", "label_conflicts_with_option",
                                  "empty_file", "one_class_only"])
def test_bad_input_one_line_and_exit_2(tmp_path, name):
    argv, bad, line = _bad_case(tmp_path, name)
    out = tmp_path / "eval"
    r = run_in_process(SCRIPT, *argv, "--out", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    message = r.stderr.rstrip("\n")
    assert "\n" not in message and "Traceback" not in message, r.stderr
    assert message.startswith("evaluate: error: " + (f"{bad}:{line}: " if line else f"{bad}: ")), message
    assert not out.exists()  # nothing written before the inputs are known good


def test_missing_file_duplicate_file_and_bad_option(tmp_path, files):
    pos, neg = files
    cases = [([tmp_path / "nope.jsonl", "--negative", neg],
              f"evaluate: error: {tmp_path / 'nope.jsonl'}: no such file"),
             (["--positive", pos, "--negative", pos], f"evaluate: error: {pos}: given more than once"),
             (["--positive", pos, "--negative", neg, "--fpr_targets", "5"], "evaluate: error: expected --fpr_targets"),
             ([pos, "--bogus"], "evaluate: error: unrecognized argument --bogus (see --help)")]
    for argv, start in cases:
        r = run_in_process(SCRIPT, *argv, "--out", tmp_path / "eval")
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith(start), r.stderr


def _detector_files(tmp_path):
    """Three detectors' scores of the same 8 prompts (POSITIVES + NEGATIVES), as --positive/--negative pairs."""
    pos_scores = {"a": [5.0, 4.0, 3.0, 0.5], "b": [9.0, 8.0, 5.0, 4.0], "c": [1.0, 1.0, 1.0, 1.0]}
    neg_scores = {"a": [2.0, 1.0, 0.25, 0.0], "b": [6.0, 2.0, 1.0, 0.0], "c": [1.0, 1.0, 1.0, 1.0]}
    pairs = {}
    for d in "abc":
        pos = _write(tmp_path / f"{d}_mem.jsonl", [{**r, "score": s} for r, s in zip(POSITIVES, pos_scores[d])])
        neg = _write(tmp_path / f"{d}_non.jsonl",
                     [{**r, "prompt": f"n{i}", "score": s} for i, (r, s) in enumerate(zip(NEGATIVES, neg_scores[d]))])
        pairs[d] = (pos, neg)
    return pairs


def test_compare_detectors_one_table_one_roc(tmp_path):
    pairs = _detector_files(tmp_path)
    out = tmp_path / "cmp"
    r = run_in_process(SCRIPT, "--compare", "--positive", *(pairs[d][0] for d in "abc"),
                "--negative", *(pairs[d][1] for d in "abc"), "--names", "wen", "sharp", "flat",
                "--fpr_targets", "0.2", "--out", out)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["methods"]
    assert list(methods) == ["wen", "sharp", "flat"] and summary["tpr_rule"] == "strict"
    assert methods["wen"]["auc"] == pytest.approx(14 / 16)
    # b: 9, 8 beat all four negatives, 5 and 4 beat three -> 14/16; c: all tied -> chance.
    assert methods["sharp"]["auc"] == pytest.approx(14 / 16) and methods["flat"]["auc"] == 0.5
    assert methods["sharp"]["tpr_at_fpr"] == {"20%": 0.5}
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (out / "scores_kde.png").exists()
    table = r.stdout.splitlines()
    assert table[0].split()[0] == "method" and [line.split()[0] for line in table[1:4]] == ["wen", "sharp", "flat"]

    closest = run_in_process(SCRIPT, "--compare", "--positive", *(pairs[d][0] for d in "ab"),
                      "--negative", *(pairs[d][1] for d in "ab"), "--fpr_targets", "0.2", "--tpr_rule", "closest",
                      "--out", tmp_path / "cmp2")
    assert closest.returncode == 0, closest.stderr
    summary = json.loads((tmp_path / "cmp2" / "summary.json").read_text())
    assert list(summary["methods"]) == ["a_mem", "b_mem"]  # default names: the positive files
    assert summary["methods"]["b_mem"]["tpr_at_fpr"] == {"20%": 1.0} and summary["tpr_rule"] == "closest"


def test_compare_positional_files_and_its_errors(tmp_path):
    pairs = _detector_files(tmp_path)
    both = []
    for d in "ab":  # one file per detector holding both classes through its rows' labels
        rows = [{**json.loads(line), "label": 1} for line in pairs[d][0].read_text().splitlines()]
        rows += [{**json.loads(line), "label": 0} for line in pairs[d][1].read_text().splitlines()]
        both.append(_write(tmp_path / f"{d}.jsonl", rows))
    r = run_in_process(SCRIPT, *both, "--compare", "--out", tmp_path / "cmp")
    assert r.returncode == 0, r.stderr
    assert list(json.loads((tmp_path / "cmp" / "summary.json").read_text())["methods"]) == ["a", "b"]

    other = _write(tmp_path / "other.jsonl", [{**json.loads(line), "prompt": "something else"}
                                              for line in both[1].read_text().splitlines()])
    cases = [([both[0], other, "--compare"], f"{other}: detector 'other' scored other prompts than 'a'"),
             ([both[0], both[1], "--compare", "--names", "x"], "--names gives 1 names for 2"),
             (["--compare", "--positive", pairs["a"][0], pairs["b"][0], "--negative", pairs["a"][1]],
              "--compare pairs the i-th --positive"),
             ([both[0], "--compare", "--positive", pairs["b"][0], "--negative", pairs["b"][1]], "not both"),
             ([both[0], both[1], "--names", "x", "y"], "--names applies to --compare only")]
    for argv, expected in cases:
        r = run_in_process(SCRIPT, *argv, "--out", tmp_path / "bad")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and expected in r.stderr, (argv, r.stderr)
        assert not (tmp_path / "bad").exists()
