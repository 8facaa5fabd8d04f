"""detect_mem's 2026 detectors (grad_diff, dsm, broken) and inference_mem's --method broken end to end through their
real entry points in process, on the lab and the tiny Flux: the calibration run, the binding of a calibration to
its settings and to the results, and one-line refusals."""

from __future__ import annotations

import json

import pytest
from conftest import FAMILY_SIZE
from conftest import call_main as _run
from conftest import read_jsonl as _rows

from diffmem.common.resources import lab_dir
from diffmem.detect import detect_mem
from diffmem.mitigate import inference_mem

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")  # small models on shared cores
LAB = lab_dir()
FAST = ["--num_inference_steps", "10", "--num_images_per_prompt", "1", "--model", LAB]




@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """A calibration of 3 unmemorized lab captions at 10 steps (module scope: one calibration run)."""
    out = tmp_path_factory.mktemp("calibration")
    code = detect_mem.main([*map(str, FAST), "--data", str(LAB / "unmemorized.jsonl"), "--end", "3", "--out",
                            str(out), "--run_name", "cal", "--detector", "broken", "--make_calibration",
                            str(out / "cal.json")])
    assert code == 0
    return out


def test_a_calibration_run_writes_the_file_and_rows_without_scores(calibration):
    record = json.loads((calibration / "cal.json").read_text())
    assert record["trajectories"] == 3 and record["prompts"] == 3
    assert record["settings"]["num_inference_steps"] == 10 and record["settings"]["scheduler"] == "ddim"
    rows = _rows(calibration / "cal.jsonl")
    assert all(r["score"] is None and len(r["x_norm"][0]) == 10 for r in rows)


def test_broken_scores_against_a_bound_calibration(calibration, tmp_path, capsys):
    cal = calibration / "cal.json"
    args = [*FAST, "--data", LAB / "memorized.jsonl", "--end", "2", "--out", tmp_path, "--run_name", "b",
            "--detector", "broken"]
    code, err = _run(detect_mem.main, [*args, "--calibration", cal], capsys)
    assert code == 0, err
    rows = _rows(tmp_path / "b.jsonl")
    assert all(r["score"] > 0 and len(r["z_delta_norm"][0]) == 10 and len(r["flag_kind"]) == 1 for r in rows)
    assert (tmp_path / "b.calibration.json").read_bytes() == cal.read_bytes()  # kept beside the results
    before = sorted(p.name for p in tmp_path.iterdir())
    # Another guidance than the calibration's: one line, before anything is written.
    code, err = _run(detect_mem.main, [*args, "--calibration", cal, "--guidance_scale", "5", "--run_name", "b5"],
                     capsys)
    assert code == 2 and len(err) == 1 and "was made with --guidance_scale 7.5, this run has 5.0" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # Another calibration for the same results: refused by the run's binding.
    other = tmp_path / "other.json"
    other.write_text(cal.read_text().replace('"prompts": 3', '"prompts": 4'))
    code, err = _run(detect_mem.main, [*args, "--calibration", other], capsys)
    assert code == 2 and len(err) == 1 and "calibration_sha256" in err[0], err
    assert (tmp_path / "b.calibration.json").read_bytes() == cal.read_bytes()


@pytest.mark.parametrize("extra,message", [
    (["--detector", "broken"], "--detector broken needs one of --calibration FILE"),
    (["--detector", "wen", "--dsm_step", "1"], "--dsm_step applies to --detector dsm only, not wen"),
    (["--detector", "dsm", "--dsm_step", "9"], "--dsm_step must lie in 0..8 (--num_inference_steps 10), got 9"),
    (["--detector", "grad_diff", "--calibration", "x.json"], "--calibration applies to --detector broken only"),
    (["--detector", "broken", "--calibration", "missing.json"], "--calibration missing.json: no such file"),
])
def test_bad_detector_settings_are_one_line(tmp_path, capsys, extra, message):
    code, err = _run(detect_mem.main, [*FAST, "--data", LAB / "memorized.jsonl", "--out", tmp_path / "o",
                                       "--run_name", "r", *extra], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_grad_diff_and_dsm_run_on_the_lab(tmp_path, capsys):
    for detector, key in (("grad_diff", "grad_diff"), ("dsm", "dsm")):
        code, err = _run(detect_mem.main, [*FAST, "--data", LAB / "memorized.jsonl", "--end", "2", "--out", tmp_path,
                                           "--run_name", detector, "--detector", detector], capsys)
        assert code == 0, err
        rows = _rows(tmp_path / f"{detector}.jsonl")
        assert [r["detector"] for r in rows] == [detector] * 2 and all(r["score"] == r[key][0] > 0 for r in rows)


def test_where_a_detector_is_undefined_is_one_line(family_dirs, calibration, tmp_path, capsys):
    # x̂₀ and its weight are DDIM's on the UNet families: the lab's own scheduler is refused for broken.
    code, err = _run(detect_mem.main, [*FAST, "--data", LAB / "memorized.jsonl", "--out", tmp_path, "--run_name",
                                       "p", "--detector", "broken", "--make_calibration", tmp_path / "c.json",
                                       "--scheduler", "pipeline", "--end", "2"], capsys)
    assert code == 2 and len(err) == 1 and "x̂₀ is defined here for --scheduler ddim only" in err[0], err
    # dsm takes a guided step: the schnell-like tiny Flux has no guidance to take it with.
    code, err = _run(detect_mem.main, ["--model", family_dirs["flux"], "--data", LAB / "memorized.jsonl", "--end", "1",
                                       "--out", tmp_path, "--run_name", "f", "--detector", "dsm",
                                       "--num_inference_steps", "3", *FAMILY_SIZE["flux"]], capsys)
    assert code == 2 and len(err) == 1 and err[0].endswith("pass --guidance_scale 1"), err
    assert not (tmp_path / "f.jsonl").exists() and not (tmp_path / "p.jsonl").exists()


def test_the_broken_mitigation_checks_its_calibration(calibration, tmp_path, capsys):
    base = ["--model", LAB, "--data", LAB / "memorized.jsonl", "--end", "1", "--num_images_per_prompt", "1",
            "--out", tmp_path / "mit", "--sscd_model", "none", "--skip_clip", "--method", "broken"]
    code, err = _run(inference_mem.main, base, capsys)
    assert code == 2 and len(err) == 1 and "--method broken needs --broken_calibration FILE" in err[0], err
    code, err = _run(inference_mem.main, [*base, "--broken_calibration", calibration / "cal.json"], capsys)
    assert code == 2 and len(err) == 1 and "was made with --num_inference_steps 10, this run has 50" in err[0], err
    assert not (tmp_path / "mit").exists()
    code, err = _run(inference_mem.main, [*base, "--broken_calibration", calibration / "cal.json",
                                          "--num_inference_steps", "10"], capsys)
    assert code == 0, err
    row = _rows(tmp_path / "mit" / "results.jsonl")[0]
    assert row["method"] == "broken" and row["extra_unet_calls"] == [0] and len(row["broken_flag"]) == 1


def test_broken_on_a_flow_family(family_dirs, tmp_path, capsys):
    """SD3: x̂₀ = x − σv and its weight 1 − σ' in FlowMatchEuler's proposal; calibrate, score, mitigate."""
    base = ["--model", family_dirs["sd3"], "--data", LAB / "memorized.jsonl", "--end", "2", "--num_inference_steps",
            "3", "--num_images_per_prompt", "2"]
    code, err = _run(detect_mem.main, [*base, "--out", tmp_path, "--run_name", "cal", "--detector", "broken",
                                       "--make_calibration", tmp_path / "cal.json"], capsys)
    assert code == 0, err
    code, err = _run(detect_mem.main, [*base, "--out", tmp_path, "--run_name", "b", "--detector", "broken",
                                       "--calibration", tmp_path / "cal.json"], capsys)
    assert code == 0, err
    rows = _rows(tmp_path / "b.jsonl")
    # The calibration is these very trajectories: every z-score is within sqrt(N - 1) = sqrt(3) of its mean.
    assert all(0 <= r["score"] <= 3 ** 0.5 + 1e-4 and len(r["z_x0_norm"][0]) == 3 for r in rows)
    code, err = _run(inference_mem.main, [*base, "--out", tmp_path / "mit", "--sscd_model", "none", "--skip_clip",
                                          "--method", "broken", "--broken_calibration", tmp_path / "cal.json"], capsys)
    assert code == 0, err
    assert all(r["broken_flag"] == [None, None] for r in _rows(tmp_path / "mit" / "results.jsonl"))
