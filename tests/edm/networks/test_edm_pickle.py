"""EDM network pickles read without running their code: the restricted unpickler, hostile and damaged files.

The fixtures in tests/fixtures/edm_pickles/ were written by NVlabs/edm's and DiffMemorize's own code (in a scratch
folder, never in this repo) with their embedded module source blanked; each .npz beside a pickle holds inputs and
the output their network computed for them (float32).
"""

from __future__ import annotations

import pickle
import sys
import types

import pytest
import torch
from conftest import REPO

from diffmem.common.edm.networks.edm_pickle import EDMPickleError, PersistentObject, read_edm_pickle
from diffmem.common.edm.networks.snapshot import edm_snapshot_images, is_edm_pickle_path, list_snapshots, snapshot_label

FIXTURES = REPO / "tests" / "fixtures" / "edm_pickles"
CASES = ("edm_vp_ddpmpp", "dm_vp_ddpmpp_masked", "edm_ve_ncsnpp_cond", "edm_edm_adm_cond", "edm_iddpm_adm")


@pytest.mark.parametrize("case", CASES)
def test_fixture_reads_as_records(case):
    snap = read_edm_pickle(FIXTURES / f"{case}.pkl")
    assert snap.class_name in {"VPPrecond", "VEPrecond", "EDMPrecond", "iDDPMPrecond"}
    assert snap.init_kwargs["img_resolution"] == 8 and snap.init_kwargs["img_channels"] == 3
    assert snap.dataset_kwargs["path"] == "tiny.zip"
    assert all(isinstance(v, torch.Tensor) for v in snap.state_dict.values())
    assert all(k.startswith("model.") or k == "u" for k in snap.state_dict)
    assert len(snap.sha256) == 64


def test_diffmemorize_fork_keeps_its_skip_mask_kwarg():
    snap = read_edm_pickle(FIXTURES / "dm_vp_ddpmpp_masked.pkl")
    assert snap.init_kwargs["skip_connections"] == [1, 0, 1, 0]


def test_iddpm_keeps_its_sigma_table_buffer():
    snap = read_edm_pickle(FIXTURES / "edm_iddpm_adm.pkl")
    assert snap.state_dict["u"].shape == (snap.init_kwargs["M"] + 1,)


def test_state_dict_follows_module_state_dict_rules():
    """Parameters, persistent buffers and nested modules by torch's names; None buffers and non-persistent ones
    left out (checked against torch.nn.Module.state_dict on a module tree of the same shape)."""

    class Leaf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(2, 3))
            self.register_buffer("f", torch.ones(3))
            self.register_buffer("none", None)
            self.register_buffer("scratch", torch.zeros(1), persistent=False)

    root = torch.nn.Module()
    root.a = Leaf()
    root.blocks = torch.nn.ModuleDict({"x": Leaf(), "y": Leaf()})

    def record(m):
        state = dict(m.__dict__)
        state["_modules"] = {k: record(v) for k, v in m._modules.items()}
        return PersistentObject(type(m).__name__, state)

    from diffmem.common.edm.networks.edm_pickle import collect_state_dict

    ours = collect_state_dict(record(root))
    theirs = root.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# ------------------------------------------------------------------------------------ hostile files


class _Reduce:
    """An object that pickles as a call of ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_os_system_global_is_refused_before_anything_runs(tmp_path):
    import os

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": _Reduce(os.system, f"touch {marker}")}))
    with pytest.raises(EDMPickleError, match=r"refused global posix\.system.*nothing was run") as info:
        read_edm_pickle(evil)
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.fixture
def fake_persistence(monkeypatch):
    """A stand-in ``torch_utils.persistence`` module, so a test can write pickles that call its hook as EDM's do."""
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what EDM's hook would do: exec the embedded source
        exec(meta["module_src"], {})

    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return mod


def test_embedded_source_is_never_executed(tmp_path, fake_persistence):
    marker = tmp_path / "pwned"
    src = f"open({str(marker)!r}, 'w').write('ran')\nclass VPPrecond: pass\n"
    conv = torch.nn.Conv2d(1, 1, 1)
    state = {"_parameters": dict(conv._parameters), "_buffers": {}, "_modules": {},
             "_init_kwargs": {"img_resolution": 8, "img_channels": 3}}
    meta = dict(type="class", version=6, module_src=src, class_name="VPPrecond", state=state)
    path = tmp_path / "source.pkl"
    path.write_bytes(pickle.dumps({"ema": _Reduce(fake_persistence._reconstruct_persistent_obj, meta)}))

    # The file is really hostile: EDM's own loading path (exec of module_src) writes the marker ...
    pickle.loads(path.read_bytes())
    assert marker.read_text() == "ran"
    marker.unlink()
    # ... ours reads the record and never runs the source.
    snap = read_edm_pickle(path)
    assert snap.class_name == "VPPrecond" and set(snap.state_dict) == {"weight", "bias"}
    assert not marker.exists()


def test_unknown_persistence_version_is_one_line(tmp_path, fake_persistence):
    meta = dict(type="class", version=5, module_src="", class_name="VPPrecond", state={})
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps({"ema": _Reduce(fake_persistence._reconstruct_persistent_obj, meta)}))
    with pytest.raises(EDMPickleError, match="persistence version 5 of VPPrecond"):
        read_edm_pickle(path)


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_pickle_is_one_line(tmp_path, cut):
    data = (FIXTURES / "edm_vp_ddpmpp.pkl").read_bytes()
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(EDMPickleError, match="not a complete EDM network pickle") as info:
        read_edm_pickle(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"x", b"hello, this is text\n", b"PK\x03\x04zip"])
def test_non_pickle_is_one_line(tmp_path, content):
    path = tmp_path / "text.pkl"
    path.write_bytes(content)
    with pytest.raises(EDMPickleError, match="not a pickle file"):
        read_edm_pickle(path)


def test_pickle_without_network_is_one_line(tmp_path):
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"loss_fn": None}))
    with pytest.raises(EDMPickleError, match="without 'ema'"):
        read_edm_pickle(path)
    path.write_bytes(pickle.dumps({"ema": [1, 2]}))
    with pytest.raises(EDMPickleError, match="not one of EDM's persistent classes"):
        read_edm_pickle(path)


# ------------------------------------------------------------------------------------ run folders


def test_edm_run_folder_snapshots_in_numeric_order(tmp_path):
    for kimg in (0, 200, 1000, 12000):
        (tmp_path / f"network-snapshot-{kimg:06d}.pkl").write_bytes(b"\x80")
    (tmp_path / "network-snapshot-1000000.pkl").write_bytes(b"\x80")  # 7 digits: string order would misplace it
    (tmp_path / "network-snapshot-abc.pkl").write_bytes(b"\x80")
    (tmp_path / "training_options.json").write_text("{}")
    found = list_snapshots(tmp_path)
    assert [n for n, _ in found] == [0, 200_000, 1_000_000, 12_000_000, 1_000_000_000]
    assert snapshot_label(found[1][1]) == "network-snapshot-000200"
    assert edm_snapshot_images(tmp_path / "network-snapshot-1234567.pkl") == 1_234_567_000
    assert is_edm_pickle_path(tmp_path / "x.pkl") and not is_edm_pickle_path(tmp_path)
