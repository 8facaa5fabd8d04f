"""EDM network pickles on every unconditional CLI: the same function as NVlabs' code, converted or not, bit for bit.

The fixtures (tests/fixtures/edm_pickles/) were written by NVlabs/edm's and DiffMemorize's own code with the
embedded module source blanked; each .npz holds inputs and the float32 output their network computed.
"""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import ONE_THREAD, REPO, load_script, run_cli

from diffmem.common.edm.networks.edm_pickle import EDMPickleError, load_edm_pickle

FIXTURES = REPO / "tests" / "fixtures" / "edm_pickles"
CASES = ("edm_vp_ddpmpp", "dm_vp_ddpmpp_masked", "edm_ve_ncsnpp_cond", "edm_edm_adm_cond", "edm_iddpm_adm")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONVERT = load_script("data/convert_edm.py", "convert_edm_cli")
DATASET_TOOL = load_script("data/dataset_tool.py", "dataset_tool_cli")


def cli(name: str, *args) -> int:
    """A CLI's real entry point, in this process (a subprocess per call costs seconds of imports)."""
    args = [str(a) for a in args]
    if name == "convert_edm":
        return CONVERT.main(args)
    if name == "dataset_tool":
        return DATASET_TOOL.main(args)
    module = __import__(f"diffmem.detect.{name}", fromlist=["main"])
    return module.main(args)


def expected(case: str) -> dict:
    with np.load(FIXTURES / f"{case}.npz") as z:
        return {k: torch.from_numpy(z[k]) for k in z.files}


def forward(net, e: dict) -> torch.Tensor:
    labels = e["labels"] if net.label_dim else None
    with torch.no_grad():
        return net(e["x"], e["sigma"], labels)


@pytest.mark.parametrize("case", CASES)
def test_pickle_network_equals_edms_own_forward(case):
    net, snap = load_edm_pickle(FIXTURES / f"{case}.pkl")
    e = expected(case)
    out = forward(net, e)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, e["expected"], rtol=1e-5, atol=1e-5 * e["expected"].abs().max().item())
    assert sum(p.numel() for p in net.parameters()) == int(e["n_params"])
    assert snap.state_dict == {}  # the record gave its tensors to the network


def test_unknown_class_or_argument_is_one_line(tmp_path):
    from diffmem.common.edm.networks.edm_pickle import read_edm_pickle

    # Rename the preconditioner class and add an argument in a re-pickled copy of a fixture's record.
    data = (FIXTURES / "edm_vp_ddpmpp.pkl").read_bytes()
    for old, new, match in [(b"VPPrecond", b"XYPrecond", "XYPrecond"),
                            (b"resample_filter", b"resample_filtex", "resample_filtex")]:
        path = tmp_path / "odd.pkl"
        path.write_bytes(data.replace(old, new))
        assert read_edm_pickle(path).init_kwargs  # the record itself reads
        with pytest.raises(EDMPickleError, match=match) as info:
            load_edm_pickle(path)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ convert and the CLIs


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "vp"
    assert cli("convert_edm", "--network", FIXTURES / "edm_ve_ncsnpp_cond.pkl", "--out", out) == 0
    return out


def test_convert_writes_a_snapshot_folder_of_the_same_network(converted):
    from diffmem.common.edm.networks.snapshot import load_network, read_snapshot_info

    info = read_snapshot_info(converted)
    src = FIXTURES / "edm_ve_ncsnpp_cond.pkl"
    assert info["converted_from"]["sha256"] == __import__("hashlib").sha256(src.read_bytes()).hexdigest()
    assert info["preconditioning"] == "VEPrecond" and info["architecture"] == "SongUNet"
    assert info["converted_from"]["init_kwargs"]["embedding_type"] == "fourier"
    assert info["sampler_defaults"]["num_steps"] == 18
    e = expected("edm_ve_ncsnpp_cond")
    a, b = forward(load_network(converted), e), forward(load_edm_pickle(src)[0], e)
    assert torch.equal(a, b)


def test_convert_again_keeps_and_refuses_other_content(converted, capsys):
    assert cli("convert_edm", "--network", FIXTURES / "edm_ve_ncsnpp_cond.pkl", "--out", converted) == 0
    capsys.readouterr()
    assert cli("convert_edm", "--network", FIXTURES / "edm_vp_ddpmpp.pkl", "--out", converted) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_hostile_pickle_through_the_cli_runs_nothing(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": Evil()}))
    res = run_cli("data/convert_edm.py", "--network", evil, "--out", tmp_path / "out", env=ONE_THREAD)
    assert res.returncode == 2 and "refused global posix.system" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()



def test_truncated_pickle_on_generate_is_one_line(tmp_path, capsys):
    cut = tmp_path / "cut.pkl"
    cut.write_bytes((FIXTURES / "edm_vp_ddpmpp.pkl").read_bytes()[:5000])
    assert cli("generate", "--network", cut, "--seeds", "0-1", "--outdir", tmp_path / "g", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "not a complete EDM network pickle" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["edm_vp_ddpmpp", "edm_ve_ncsnpp_cond"])
def test_generate_from_pickle_equals_generate_from_converted_folder(case, tmp_path):
    src = FIXTURES / f"{case}.pkl"
    assert cli("convert_edm", "--network", src, "--out", tmp_path / "net") == 0
    common = ["--seeds", "0-3", "--steps", "4", "--batch", "3", "--device", "cpu", "--npz"]
    for name, network in (("from_pkl", src), ("from_folder", tmp_path / "net")):
        assert cli("generate", "--network", network, "--outdir", tmp_path / name, *common) == 0
    with np.load(tmp_path / "from_pkl" / "images.npz") as a, np.load(tmp_path / "from_folder" / "images.npz") as b:
        assert np.array_equal(a["images"], b["images"]) and a["images"].shape == (4, 8, 8, 3)
        if case.endswith("_cond"):  # labels drawn from each seed's generator, as EDM's generate.py does
            assert np.array_equal(a["labels"], b["labels"]) and a["labels"].shape == (4,)
        assert a["images"].std() > 0


def test_teacher_workflow_generate_then_take_the_first_n(tmp_path):
    """Zhang et al.: sample a pretrained EDM model, then train on the first n samples."""
    assert cli("generate", "--network", FIXTURES / "edm_vp_ddpmpp.pkl", "--seeds", "0-7", "--steps", "3",
               "--batch", "8", "--outdir", tmp_path / "teacher", "--device", "cpu") == 0
    assert cli("dataset_tool", "--source", tmp_path / "teacher", "--dest", tmp_path / "t4.zip",
               "--max_images", "4") == 0
    from diffmem.common.edm.dataset.edm_zip import load_dataset_zip
    from diffmem.common.edm.sampler import image_path, load_png

    images = load_dataset_zip(tmp_path / "t4.zip", progress=False).images
    first = np.stack([load_png(image_path(tmp_path / "teacher", s)) for s in range(4)]).transpose(0, 3, 1, 2)
    assert np.array_equal(images, first)


def test_optimal_denoiser_on_the_networks_sigma_steps(tmp_path):
    from diffmem.common.edm.dataset.edm_zip import write_dataset_zip

    rng = np.random.default_rng(0)
    write_dataset_zip(tmp_path / "d.zip", rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8), progress=False)
    assert cli("generate", "--optimal_denoiser", "--dataset", tmp_path / "d.zip", "--network",
               FIXTURES / "edm_vp_ddpmpp.pkl", "--seeds", "0-1", "--steps", "3", "--outdir", tmp_path / "o",
               "--device", "cpu") == 0
    settings = json.loads((tmp_path / "o" / "generate.json").read_text())
    net = load_edm_pickle(FIXTURES / "edm_vp_ddpmpp.pkl")[0]
    assert settings["sigma_max"] == pytest.approx(min(80.0, net.sigma_max))
    assert settings["sigma_min"] == pytest.approx(max(0.002, net.sigma_min))
    assert settings["sigma_range_of"].endswith("edm_vp_ddpmpp.pkl")


def test_jacobian_takes_a_pickle(tmp_path):
    assert cli("jacobian", "--network", FIXTURES / "edm_vp_ddpmpp.pkl", "--seeds", "0-1", "--sigmas", "0.5,5",
               "--out", tmp_path / "jac", "--device", "cpu") == 0
    assert (tmp_path / "jac").is_dir() and any((tmp_path / "jac").iterdir())


def test_mem_ratio_on_a_diffmemorize_run_folder(tmp_path):
    """A run folder of network-snapshot-NNNNNN.pkl: a ratio per snapshot (named by kimg) and the max."""
    from diffmem.common.edm.dataset.edm_zip import write_dataset_zip
    from diffmem.common.edm.sampler import SamplerSettings, generate_images

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURES / "edm_iddpm_adm.pkl", run / "network-snapshot-000000.pkl")
    shutil.copy(FIXTURES / "dm_vp_ddpmpp_masked.pkl", run / "network-snapshot-000010.pkl")
    net = load_edm_pickle(run / "network-snapshot-000010.pkl")[0]
    samples = next(generate_images(net, range(6), 6, SamplerSettings(num_steps=3))).images
    rng = np.random.default_rng(1)
    train = np.concatenate([samples, rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)]).transpose(0, 3, 1, 2)
    write_dataset_zip(tmp_path / "train.zip", train, progress=False)
    assert cli("mem_ratio", "--expdir", run, "--knn_ref", tmp_path / "train.zip", "--seeds", "0-5", "--steps", "3",
               "--batch", "6", "--device", "cpu") == 0
    summary = json.loads((run / "mem_ratio_summary.json").read_text())
    assert summary["snapshots"] == 2 and summary["max_ratio"] == 1.0
    assert (summary["max_snapshot"], summary["max_images_seen"]) == ("network-snapshot-000010", 10_000)
    rows = [json.loads(line) for line in (run / "mem_ratio.jsonl").read_text().splitlines()]
    assert [r["snapshot"] for r in rows] == ["network-snapshot-000010", "network-snapshot-000000"]
    assert rows[1]["kimg"] == 0


def test_written_edm_pickle_reads_back_the_same_network(tmp_path):
    """write_edm_pickle (EDM's snapshot format, blank source) -> reader: same class, kwargs and weights; the
    file holds no global that one written by NVlabs' code does not."""
    from diffmem.common.edm.networks.edm_pickle import read_edm_pickle, write_edm_pickle

    net, _ = load_edm_pickle(FIXTURES / "dm_vp_ddpmpp_masked.pkl")
    path = write_edm_pickle(net, tmp_path / "network-snapshot-000001.pkl", {"path": "d.zip"})
    back, snap = load_edm_pickle(path)
    ref = read_edm_pickle(FIXTURES / "dm_vp_ddpmpp_masked.pkl")
    assert snap.class_name == "VPPrecond" and snap.dataset_kwargs == {"path": "d.zip"}
    assert {k: v for k, v in snap.init_kwargs.items() if k in ref.init_kwargs} == ref.init_kwargs
    e = expected("dm_vp_ddpmpp_masked")
    assert torch.equal(forward(back, e), forward(net, e))

    def globals_of(p):
        from diffmem.common.edm.networks.edm_pickle import RestrictedUnpickler

        found = set()

        class Spy(RestrictedUnpickler):
            def find_class(self, module, name):
                found.add((module, name))
                return super().find_class(module, name)

        with open(p, "rb") as f:
            Spy(f).load()
        return found

    # Ours holds no numpy scalars (our modules keep Python floats); every global it uses, EDM's pickles use too.
    assert globals_of(path) <= globals_of(FIXTURES / "dm_vp_ddpmpp_masked.pkl")


# ------------------------------------------------------------------------------------ faults (issue 31)


def _repickled(path, init_change=None, edit=None):
    """The VP fixture's network written back in EDM's format, its init kwargs changed or its weights edited."""
    from diffmem.common.edm.networks.edm_pickle import _EDMPickler, edm_init_kwargs

    net, _ = load_edm_pickle(FIXTURES / "edm_vp_ddpmpp.pkl")
    if edit is not None:
        edit(net)
    with open(path, "wb") as f:
        _EDMPickler(f, net, {**edm_init_kwargs(net), **(init_change or {})}).dump(
            dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    return path


def test_a_pickle_claiming_a_huge_network_is_one_line_on_every_cli(tmp_path, capsys):
    from diffmem.common.edm.dataset.edm_zip import write_dataset_zip

    huge = _repickled(tmp_path / "huge.pkl", {"num_blocks": 10**6})  # built until killed (exit 137) before
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(huge, run / "network-snapshot-000000.pkl")
    write_dataset_zip(tmp_path / "d.zip", np.zeros((2, 3, 8, 8), np.uint8), progress=False)
    calls = {"convert_edm": ["--model", huge, "--out", tmp_path / "out"],
             "generate": ["--model", huge, "--seeds", "0", "--out", tmp_path / "out", "--device", "cpu"],
             "jacobian": ["--model", huge, "--seeds", "0", "--out", tmp_path / "out", "--device", "cpu"],
             "mem_ratio": ["--model", run, "--data", tmp_path / "d.zip", "--seeds", "0", "--out", tmp_path / "out",
                           "--device", "cpu"]}
    for name, args in calls.items():
        assert cli(name, *args) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "num_blocks must be an integer >= 0 and <= 1000, got 1000000" in err
        assert "huge.pkl: " in err or "network-snapshot-000000.pkl: " in err, err
        assert not (tmp_path / "out").exists(), name


def test_max_params_and_allow_nonfinite_on_the_command_line(tmp_path, capsys):
    src = FIXTURES / "edm_vp_ddpmpp.pkl"
    assert cli("generate", "--model", src, "--seeds", "0", "--out", tmp_path / "g", "--device", "cpu",
               "--max_params", "1e3") == 2
    err = capsys.readouterr().err
    assert f"{src}: its init kwargs describe a VPPrecond of " in err and "more than --max_params 1,000" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "g").exists()

    def poison(net):
        net.model.map_layer0.bias.data[0] = float("nan")

    nan = _repickled(tmp_path / "nan.pkl", edit=poison)
    assert cli("convert_edm", "--model", nan, "--out", tmp_path / "c") == 2
    err = capsys.readouterr().err
    assert "model.map_layer0.bias holds non-finite values (1 NaN, 0 ±inf of 32)" in err and "--allow_nonfinite" in err
    assert not (tmp_path / "c").exists()
    assert cli("convert_edm", "--model", nan, "--out", tmp_path / "c", "--allow_nonfinite") == 0
    for bad, why in (("x", "a number of parameters, e.g. 2e9"), ("inf", "a whole number of parameters from 1 to 1e15"),
                     ("nan", "a whole number"), ("0", "a whole number"), ("2.5", "a whole number")):
        with pytest.raises(SystemExit) as exit_info:
            cli("convert_edm", "--model", src, "--out", tmp_path / "d", "--max_params", bad)
        assert exit_info.value.code == 2
        assert f"argument --max_params: expected {why}" in capsys.readouterr().err


def test_trailing_bytes_are_refused_by_the_cli(tmp_path, capsys):
    path = tmp_path / "trail.pkl"
    path.write_bytes((FIXTURES / "edm_vp_ddpmpp.pkl").read_bytes() + b"\0" * 7)
    assert cli("convert_edm", "--model", path, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{path}: 7 bytes follow the end of the pickle" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
