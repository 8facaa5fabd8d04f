"""The EMM sweep's advice when no size reaches the threshold: extend the grid downwards, or train longer first when
the smallest size's own trajectory says its run was under-trained (common.edm.emm.search.ratio_trend)."""

from __future__ import annotations

import json

import pytest

from diffmem.common.edm.emm.search import EXIT_NOT_BRACKETED, RISE_MIN, estimate, ratio_trend
from diffmem.common.edm.emm.state import SweepSettings, ratio_trajectory, scan_size, size_paths
from diffmem.common.edm.emm.sweep import SweepConfig, write_report


@pytest.mark.parametrize("ratios, trend", [
    ([], None),
    ([0.0], "never"),
    ([0.0, 0.0, 0.0], "never"),
    ([0.5], None),  # one snapshot: nothing to tell
    ([0.1, 0.3, 0.5], "rising"),
    ([0.3, 0.3 + RISE_MIN], "rising"),
    ([0.3, 0.3 + RISE_MIN / 2], None),  # a rise under one percentage point is noise
    ([0.2, 0.6, 0.5], None),  # the maximum came before the end
    ([0.5, 0.5, 0.5], None),  # levelled off
    ([0.0, 0.0, 0.02], "rising"),
])
def test_ratio_trend_on_tiny_trajectories(ratios, trend):
    assert ratio_trend(ratios) == trend


def test_below_grid_says_train_longer_when_the_smallest_size_was_under_trained():
    sizes, results = [16, 32, 64], {16: 0.5}
    plain = estimate(sizes, results, 0.9)
    assert plain.outcome == "below_grid" and "extend --sizes downwards (e.g. 8)" in plain.message
    assert "train longer" not in plain.message

    rising = estimate(sizes, results, 0.9, trajectories={16: [0.1, 0.3, 0.5]})
    assert (rising.outcome, rising.exit_code) == ("below_grid", EXIT_NOT_BRACKETED)
    assert rising.message == ('the grid does not bracket EMM: the smallest size |D|=16 is below 90% (50.0%), but its '
                              'ratio was still rising at its last snapshot (from 30.0% to 50.0%): train longer '
                              '(--train_args "--duration ...", in a new sweep folder) before extending --sizes '
                              'downwards (1 of 3 sizes measured)')

    never = estimate(sizes, {16: 0.0}, 0.9, trajectories={16: [0.0, 0.0]})
    assert never.message.startswith("the grid does not bracket EMM: no sample of the smallest size |D|=16 was "
                                    "memorized at any of its 2 snapshots (0.0%), so its run looks under-trained: "
                                    'train longer (--train_args "--duration ...", in a new sweep folder)')

    levelled = estimate(sizes, results, 0.9, trajectories={16: [0.3, 0.5, 0.5]})
    assert levelled.message == plain.message
    # Only the smallest size's trajectory counts; a bracketed grid is not second-guessed.
    assert estimate(sizes, {16: 0.95, 32: 0.5}, 0.9, trajectories={32: [0.1, 0.5]}).outcome == "bracketed"


def test_the_sweep_reads_each_size_trajectory_into_its_report(tmp_path):
    sweep = tmp_path / "sweep"
    p = size_paths(sweep, 16)
    p.run.mkdir(parents=True)
    rows = [{"snapshot": f"snapshot-{i:09d}", "images_seen": i, "kimg": i / 1000, "ratio": r, "n": 8, "zero_zero": 0}
            for i, r in ((40, 0.0), (80, 0.25), (120, 0.5))]
    (p.run / "mem_ratio_summary.json").write_text(json.dumps(
        {"max_ratio": 0.5, "max_snapshot": rows[-1]["snapshot"], "max_images_seen": 120, "n": 8, "per_snapshot": rows}))
    assert ratio_trajectory(p.run / "mem_ratio_summary.json") == [0.0, 0.25, 0.5]
    assert ratio_trajectory(tmp_path / "absent.json") == []
    assert scan_size(sweep, 16).trajectory == [0.0, 0.25, 0.5]

    cfg = SweepConfig(outdir=sweep, sizes=[16, 32], settings=SweepSettings(source="digits"))
    est, _ = write_report(cfg, 1)
    assert est.outcome == "below_grid" and "still rising at its last snapshot (from 25.0% to 50.0%)" in est.message
    doc = json.loads((sweep / "emm.json").read_text())
    assert doc["message"] == est.message and doc["sizes"][0]["ratio_trajectory"] == [0.0, 0.25, 0.5]
