"""data/prompt_sets.py end to end: list, show, fetch from a local mirror (SHA-256 checked, a mismatch refused with
nothing written), groundtruth; and ``--data set:NAME`` in a text-to-image CLI."""

from __future__ import annotations

from dataclasses import replace

from conftest import load_script, run_cli, run_in_process

from diffmem.common.t2i.prompt_sets import PROMPT_SETS, get_set, shipped_dir


def test_list_show_and_a_refused_mismatch(tmp_path):
    env = {"DIFFMEM_PROMPT_SETS": str(tmp_path / "cache")}
    listed = run_cli("data/prompt_sets.py", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert set(PROMPT_SETS) <= set(lines)
    assert " shipped " in lines["memattn_sd1_mem345"] and " not fetched " in lines["membench_sd1_final"]
    assert " unverified " in lines["early26_nonmem_500"]

    shown = run_in_process("data/prompt_sets.py", "show", "set:asthana_sd2_mem", "--rows", "2", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "sha256:      fc2f6553f676e8fb94bf5b2eddfef80915131aeca23fa44e49c54edd6968ca74" in shown.stdout
    assert "  row 1 type=TV index=1229082887: Shaw Floors SFA Awesome 4 Linen 00104_E0741" in shown.stdout

    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "SD1_final.csv").write_text(",prompt,urls\n0,not the file,[]\n")
    refused = run_in_process("data/prompt_sets.py", "fetch", "membench_sd1_final", "--mirror", tmp_path / "mirror",
                             env=env)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith(f"prompt_sets: error: {tmp_path}/mirror/")
    assert "expected 8c41867a67ea184c4f7f3c9765eeb55faa3b5058d1552e014616de9198d110c7" in refused.stderr
    assert refused.stderr.rstrip().endswith("nothing written") and not (tmp_path / "cache").exists()

    bad = run_in_process("data/prompt_sets.py", "fetch", "nope", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("prompt_sets: error: set:nope: no such prompt set")


def test_fetch_from_a_mirror_then_groundtruth(tmp_path, monkeypatch, capsys):
    cli = load_script("data/prompt_sets.py", "prompt_sets_cli")
    # A shipped set as if it had to be fetched: its real file and SHA-256, read from a mirror of its repository.
    entry = replace(get_set("memattn_sd2_mem219"), name="memattn_sd2_unshipped", shipped=None)
    monkeypatch.setitem(PROMPT_SETS, entry.name, entry)
    mirror = tmp_path / "mirror" / "prompt"
    mirror.mkdir(parents=True)
    (mirror / "sd2_mem219.txt").write_bytes((shipped_dir() / "memattn_sd2_mem219.txt").read_bytes())
    cache = tmp_path / "cache"
    assert cli.main(["fetch", entry.name, "--mirror", str(tmp_path / "mirror"), "--cache_dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert out == f"set:{entry.name}: {cache / 'memattn_sd2_unshipped.txt'} (fetched, sha256 verified; 219 rows)\n"

    gt = tmp_path / "gt"
    for row in ("0", "5"):
        (gt / row).mkdir(parents=True)
        (gt / row / "a.jpg").write_bytes(b"\xff\xd8")
    assert cli.main(["groundtruth", entry.name, "--gt_dir", str(gt), "--cache_dir", str(cache)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"set:{entry.name}: 2 of 219 prompts have ground-truth images under {gt} (missing 217)"
    assert out[1].startswith("lacking: 1, 2, 3, 4, 6,")
    assert cli.main(["groundtruth", entry.name]) == 2
    assert capsys.readouterr().err == ("prompt_sets: error: groundtruth: expected --gt_dir DIR, the folder of the "
                                       "ground-truth images\n")


def test_a_cli_takes_a_registry_set_and_names_the_fetch_command(tmp_path):
    run = run_in_process("detect/detect_mem.py", "--model", "data/lab", "--data", "set:cvpr26_extended_mv_458",
                  "--run_name", "r", "--out", tmp_path / "out", env={"DIFFMEM_PROMPT_SETS": str(tmp_path / "c")})
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert run.stderr.startswith("detect_mem: error: set:cvpr26_extended_mv_458: not fetched")
    assert "run `diffmem-prompt-sets fetch cvpr26_extended_mv_458`" in run.stderr
    assert not (tmp_path / "out").exists()
