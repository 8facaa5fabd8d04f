"""common/t2i/prompt_sets: the registry's hashes and counts against the shipped files, the readers' labels, types
and indices, fetching from a local mirror with the SHA-256 checked, and ground-truth coverage."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import replace

import pytest
from conftest import SHARED_DATA

from diffmem.common.t2i.groundtruth import coverage, coverage_phrase, resolve_gt_root
from diffmem.common.t2i.mitigation.options import MitigationSettings
from diffmem.common.t2i.mitigation.tradeoff import PlannedRun, tradeoff_point
from diffmem.common.t2i.prompt_sets import (
    PROMPT_SETS,
    PromptSetError,
    fetch,
    get_set,
    locate,
    read_prompt_set,
    shipped_dir,
)
from diffmem.common.t2i.prompts import PromptFileError, read_prompts

SHIPPED = [ps for ps in PROMPT_SETS.values() if ps.shipped]
LICENCE_FILE = {"renjie3/MemAttn": "LICENSE.memattn", "rohanasthana/memorization-anisotropy": "LICENSE.asthana",
                "randomnameforicml/icml-2026": "LICENSE.early26"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFMEM_PROMPT_SETS", str(folder))
    return folder


@pytest.mark.parametrize("ps", SHIPPED, ids=lambda ps: ps.name)
def test_shipped_files_match_the_registry(ps):
    path = shipped_dir() / ps.shipped
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ps.sha256
    assert len(read_prompt_set(ps.name)) == ps.rows
    # Shipped only under MIT, with the source's licence text beside the file.
    assert ps.licence == "MIT"
    assert "MIT License" in (shipped_dir() / LICENCE_FILE[ps.repo]).read_text(encoding="utf-8")


def test_every_entry_is_pinned_or_marked_unverified():
    for ps in PROMPT_SETS.values():
        if ps.verified:
            assert re.fullmatch(r"[0-9a-f]{40}", ps.commit) and re.fullmatch(r"[0-9a-f]{64}", ps.sha256), ps.name
            assert ps.url == f"https://raw.githubusercontent.com/{ps.repo}/{ps.commit}/{ps.path}"
            assert ps.rows and ps.licence
        else:
            assert ps.sha256 is None and ps.url is None and ps.notes
    # Files no licence lets us copy are never shipped.
    assert not [ps.name for ps in PROMPT_SETS.values() if ps.shipped and ps.licence != "MIT"]
    assert {"webster_sd1_500", "membench_sd1_final", "cvpr26_extended_mv_458", "cvpr26_non_mem_1500",
            "memattn_sd1_mem345", "memattn_sd2_mem219", "memattn_group_nomem500", "asthana_sd2_mem",
            "asthana_rv_mem"} <= set(PROMPT_SETS)


@pytest.fixture
def nemo_sets(cache):
    """Webster's labels (NeMo's files) fetched into the test's cache from ../shared/data, SHA-256 checked."""
    for name in ("webster_sd1_500_labels", "nemo_laion_nonmem_500"):
        fetch(get_set(name), mirror=SHARED_DATA)
    return cache


def test_webster_labels_types_and_indices(nemo_sets):
    recs = read_prompts("set:webster_sd1_500_labels")
    assert len(recs) == 500 and all(r.label == 1 for r in recs)
    assert Counter(r.type for r in recs) == {"TM": 388, "VM": 112}
    assert recs[0].prompt == "The No Limits Business Woman Podcast" and recs[0].index == 1030727993
    sd2 = read_prompts("set:asthana_sd2_mem")
    # Webster's own spellings (MV, TV): TV, template verbatim, is a memorized type too.
    assert Counter(r.type for r in sd2) == {"TV": 215, "MV": 4} and {r.label for r in sd2} == {1}
    assert all(isinstance(r.index, int) for r in sd2)


def test_line_files_and_a_bom_read_as_prompts(nemo_sets):
    non = read_prompts("set:memattn_group_nomem500")
    assert len(non) == 500 and {r.label for r in non} == {0} and non[0].prompt == "A serene beach at sunrise"
    assert all(r.index is None and r.type is None for r in non)
    early = read_prompt_set("early26_mem_sample")  # the file starts with a UTF-8 BOM
    assert early[0].prompt == "The No Limits Business Woman Podcast" and early[0].line == 1
    # MemAttn's 345 are a subset of Webster's 500.
    webster = {r.prompt for r in read_prompts("set:webster_sd1_500_labels")}
    assert {r.prompt for r in read_prompts("set:memattn_sd1_mem345")} <= webster


def test_unknown_unfetched_and_unverified_sets_are_one_line(cache):
    with pytest.raises(PromptFileError, match=r"^set:nope: no such prompt set \(known: webster_sd1_500, "):
        read_prompts("set:nope")
    with pytest.raises(PromptFileError) as exc:
        read_prompts("set:membench_sd1_final")
    assert "\n" not in str(exc.value)
    assert "not fetched" in str(exc.value) and "`diffmem-prompt-sets fetch membench_sd1_final`" in str(exc.value)
    with pytest.raises(PromptSetError, match="no public file found"):
        fetch(get_set("early26_nonmem_500"))
    assert not cache.exists()


def _unshipped(name):
    """A shipped set's entry as if it had to be fetched: its real file, hash and commit."""
    return replace(get_set(name), shipped=None)


def test_fetch_from_a_mirror_verifies_and_writes_once(cache, tmp_path):
    ps = _unshipped("memattn_sd2_mem219")
    mirror = tmp_path / "mirror" / "renjie3+MemAttn"
    (mirror / "prompt").mkdir(parents=True)
    (mirror / ps.path).write_bytes((shipped_dir() / get_set(ps.name).shipped).read_bytes())
    path, written = fetch(ps, mirror=tmp_path / "mirror")
    assert written and path == cache / "memattn_sd2_mem219.txt" and locate(ps) == path
    assert len(read_prompt_set(ps)) == 219
    assert fetch(ps, mirror=tmp_path / "mirror") == (path, False)  # already here, intact
    path.write_text("edited\n")  # a cached copy that no longer matches is refused where it is read
    with pytest.raises(PromptSetError, match="sha256 .*, expected 5776ec85cc25fde8"):
        locate(ps)


def test_fetch_refuses_a_mismatch_and_writes_nothing(cache, tmp_path):
    ps = _unshipped("memattn_sd1_mem345")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "sd1_mem345.txt").write_text("The No Limits Business Woman Podcast\n")
    with pytest.raises(PromptSetError) as exc:
        fetch(ps, mirror=tmp_path / "m")
    assert str(exc.value).endswith("expected 70f370c4728aecd18e0db95dc58e9741b0f1a278dbfddb31d7d0754f69f8d069 "
                                   "(set:memattn_sd1_mem345 at renjie3/MemAttn@c66efd22d8ff); nothing written")
    with pytest.raises(PromptSetError, match="nothing written"):
        fetch(ps, url=(tmp_path / "m" / "sd1_mem345.txt").as_uri())
    assert not cache.exists()
    # The same file by URL (file:// here) with the right bytes is taken.
    good = tmp_path / "good.txt"
    good.write_bytes((shipped_dir() / "memattn_sd1_mem345.txt").read_bytes())
    assert fetch(ps, url=good.as_uri())[1] and len(read_prompt_set(ps)) == 345


def test_ground_truth_coverage_counts_what_is_present(tmp_path):
    rows = read_prompt_set("asthana_sd2_mem")
    gt = tmp_path / "gt" / "gt_images"
    (gt / str(rows[0].index)).mkdir(parents=True)
    (gt / str(rows[0].index) / "0.png").write_bytes(b"\x89PNG")
    (gt / str(rows[1].index)).mkdir()  # a folder whose image never downloaded
    report = coverage("asthana_sd2_mem", tmp_path / "gt")
    assert report.root == gt and report.total == 219 and report.present == 1
    assert report.statuses == {"ok": 1, "empty": 1, "missing": 217} and report.lacking[0] == str(rows[1].index)
    assert coverage_phrase("SSCD", 416, 500) == "SSCD over 416 of 500 with ground truth"
    # A registry set lies in the package or the cache: its ground truth is only where --gt_dir says.
    assert resolve_gt_root("set:asthana_sd2_mem") is None


def test_tradeoff_points_carry_the_ground_truth_n():
    over = coverage_phrase("SSCD", 416, 500)
    summary = {"sscd": {"mean": 0.5, "prompts": 416, "over": over}, "clip": {"mean": 0.3}, "cost": {},
               "loss": {"final_mean": None}, "counts": {"prompts": 500}}
    point = tradeoff_point(PlannedRun("none", "none", MitigationSettings()), summary)
    assert (point["sscd_prompts"], point["sscd_over"], point["prompts"]) == (416, over, 500)
