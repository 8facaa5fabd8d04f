"""Hostile EDM pickles built by hand: amplified or out-of-range tensor views, compressed or oversized nested storage
records, forbidden globals inside a nested storage. Each is refused as one EDMPickleError line naming the file.

Every file here is a few kB, written with pickle/zipfile (and raw pickle opcodes where pickle would not write the
hostile layout); nothing in them is ever run.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script

from diffmem.common.edm.networks import edm_pickle
from diffmem.common.edm.networks.edm_pickle import (
    _HOOK,
    PERSISTENCE_VERSION,
    EDMPickleError,
    RestrictedUnpickler,
    _EDMPickler,
    read_edm_pickle,
)

FIXTURES = REPO / "tests" / "fixtures" / "edm_pickles"
TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's legacy serialization format
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


class _Reduce:
    """An object that pickles as a call of ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _PidPickler(pickle.Pickler):
    """Writes ``("PID", …)`` tuples as persistent ids, the way torch.save names a storage."""

    def persistent_id(self, obj):
        return obj[1:] if isinstance(obj, tuple) and obj[:1] == ("PID",) else None


def _pid_pickle(obj) -> bytes:
    b = io.BytesIO()
    _PidPickler(b, protocol=2).dump(obj)
    return b.getvalue()


def legacy_blob(values, numel: int | None = None, main: bytes | None = None) -> bytes:
    """torch.save's legacy record of one float storage: magic, version, sys info, the storage's persistent id,
    its key list, then the element count and the raw bytes; ``main`` replaces the persistent-id pickle."""
    numel = len(values) if numel is None else numel
    head = b"".join(pickle.dumps(x, protocol=2) for x in (TORCH_MAGIC, 1001, SYS_INFO))
    main = main or _pid_pickle(("PID", "storage", torch.FloatStorage, "0", "cpu", numel, None))
    raw = struct.pack("<q", len(values)) + struct.pack(f"<{len(values)}f", *values)
    return head + main + pickle.dumps(["0"], protocol=2) + raw


def zip_blob(data: bytes, numel: int, method=zipfile.ZIP_STORED, pkl: bytes | None = None) -> bytes:
    """torch.save's zip record of one float storage (data.pkl with its persistent id, data/0 its bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pkl or _pid_pickle(("PID", "storage", torch.FloatStorage, "0", "cpu", numel)))
        z.writestr("archive/byteorder", "little")
        z.writestr(zipfile.ZipInfo("archive/data/0"), data, compress_type=method)
        z.writestr("archive/version", "3\n")
    return out.getvalue()


def storage(blob: bytes) -> _Reduce:
    return _Reduce(torch.storage._load_from_bytes, blob)


def view(store, offset, size, stride) -> _Reduce:
    return _Reduce(torch._utils._rebuild_tensor_v2, store, offset, tuple(size), tuple(stride), False,
                   collections.OrderedDict())


def edm_file(path: Path, parameters: dict) -> Path:
    """A tiny EDM snapshot: ``{'ema': <VPPrecond persistence record>}`` whose ``_parameters`` are the given views."""
    state = {"_parameters": parameters, "_buffers": {}, "_modules": {},
             "_init_kwargs": {"img_resolution": 8, "img_channels": 3}}
    meta = dict(type="class", version=PERSISTENCE_VERSION, module_src="", class_name="VPPrecond", state=state)
    with open(path, "wb") as f:
        _EDMPickler(f, None, {}).dump({"ema": _Reduce(_HOOK, meta)})
    return path


def refused(path: Path, match: str) -> str:
    with pytest.raises(EDMPickleError, match=match) as info:
        read_edm_pickle(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and "\x1b" not in msg
    return msg


# ------------------------------------------------------------------------------------ the builders are sound


@pytest.mark.parametrize("kind", ["legacy", "zip"])
def test_hand_built_storage_records_read(tmp_path, kind):
    """The builders write what torch.save writes: both record formats read, views of disjoint parts of one
    storage too (EDM's own pickles give each tensor its own storage; disjoint sharing is harmless)."""
    values = [float(i) for i in range(8)]
    blob = legacy_blob(values) if kind == "legacy" else zip_blob(struct.pack("<8f", *values), 8)
    store = storage(blob)
    path = edm_file(tmp_path / "ok.pkl", {"weight": view(store, 0, (2, 2), (2, 1)), "bias": view(store, 4, (4,), (1,))})
    snap = read_edm_pickle(path)
    assert snap.state_dict["weight"].tolist() == [[0, 1], [2, 3]] and snap.state_dict["bias"].tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("case", ["edm_vp_ddpmpp", "edm_iddpm_adm"])
def test_genuine_pickles_fit_the_storage_budget(case):
    """EDM's own pickles hold fewer storage bytes than file bytes: the budget is the file size, no slack."""
    path = FIXTURES / f"{case}.pkl"
    with open(path, "rb") as f:
        unpickler = RestrictedUnpickler(f)
        unpickler.load()
    assert 0 < unpickler.storage_bytes <= path.stat().st_size * edm_pickle.MAX_STORAGE_BYTES_PER_FILE_BYTE


# ------------------------------------------------------------------------------------ 5: amplification


def test_stride_zero_view_is_refused(tmp_path):
    """One float stored, a million read: a stride-0 view would make a 4 MB tensor of a 1 kB file."""
    path = edm_file(tmp_path / "s0.pkl", {"weight": view(storage(legacy_blob([1.0])), 0, (1000, 1000), (0, 0))})
    refused(path, r"stride 0 .*size \(1000, 1000\), stride \(0, 0\).*contiguous")


def test_self_overlapping_view_is_refused(tmp_path):
    """Strides (1, 1) over 19 stored floats read 100 elements: each storage element at most once."""
    path = edm_file(tmp_path / "ov.pkl", {"weight": view(storage(legacy_blob([0.0] * 19)), 0, (10, 10), (1, 1))})
    refused(path, r"elements overlap")


@pytest.mark.parametrize("spans", [[(0, 8), (4, 4)], [(0, 4), (8, 4), (2, 4)], [(8, 4), (0, 4), (6, 4)],
                                   [(4, 4), (0, 12)]])
def test_views_sharing_storage_elements_are_refused(tmp_path, spans):
    """(offset, length) views of one 12-float storage, the last overlapping an earlier one."""
    store = storage(legacy_blob([0.0] * 12))
    path = edm_file(tmp_path / "share.pkl", {f"w{i}": view(store, o, (n,), (1,)) for i, (o, n) in enumerate(spans)})
    refused(path, r"two tensor views over the same storage elements")
    ok = edm_file(tmp_path / "apart.pkl", {f"w{i}": view(store, o, (2,), (1,)) for i, o in enumerate([6, 0, 10, 2])})
    assert len(read_edm_pickle(ok).state_dict) == 4


def test_one_tensor_under_many_names_is_refused(tmp_path):
    """One stored tensor named 8 times holds 8× the file's bytes in the state dict (and in a conversion)."""
    tensor = view(storage(legacy_blob([0.0] * 1024)), 0, (1024,), (1,))
    path = edm_file(tmp_path / "names.pkl", {f"w{i}": tensor for i in range(8)})
    refused(path, r"state dict holds 32768 bytes of tensors, more than the file's \d+ bytes")


def test_reused_storage_record_beyond_file_size_is_refused(tmp_path):
    """Raw opcodes: one storage record memoized out of reach of the memo clean-up, loaded 3 times into 3 storages
    (3× the file's bytes): the total of all storages is bounded by the file size."""
    blob = legacy_blob([0.0] * 1024)
    junk = b"".join(b"N" + pickle.BINPUT + bytes([2 + i]) + b"0" for i in range(8))  # memo slots 2..9, popped
    load = b"h\x00h\x01\x85R"  # BINGET 0 (_load_from_bytes), BINGET 1 (the blob), TUPLE1, REDUCE
    data = (b"\x80\x02" + b"ctorch.storage\n_load_from_bytes\nq\x00" + b"B" + struct.pack("<I", len(blob)) + blob
            + b"q\x01" + b"00" + junk + b"}X\x03\x00\x00\x00ema]" + b"(" + load * 3 + b"es.")
    path = tmp_path / "reuse.pkl"
    path.write_bytes(data)
    refused(path, r"tensor storages hold more than the file's \d+ bytes")


def test_storage_record_declaring_more_than_it_holds_is_refused(tmp_path):
    """A legacy record declaring 10 M floats but holding 4: refused before torch allocates the 40 MB."""
    path = edm_file(tmp_path / "big.pkl", {"weight": view(storage(legacy_blob([0.0] * 4, numel=10_000_000)), 0,
                                                          (4,), (1,))})
    refused(path, r"declares 40000000 bytes of float32 storage but holds 16")


def test_deflated_zip_record_is_refused_before_inflating(tmp_path, monkeypatch):
    """4 MB of zeros DEFLATE-compressed to 4 kB: torch.save writes ZIP_STORED only, so the record is refused from
    the zip's central directory, before torch (or zipfile) inflates anything."""
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    blob = zip_blob(bytes(4_000_000), 1_000_000, method=zipfile.ZIP_DEFLATED)
    assert len(blob) < 10_000
    path = edm_file(tmp_path / "deflate.pkl", {"weight": view(storage(blob), 0, (1_000_000,), (1,))})
    refused(path, r"compressed record archive/data/0 \(deflate, 4000000 bytes when inflated\).*ZIP_STORED only")
    assert loads == []


def test_zip_record_shorter_than_declared_is_refused(tmp_path):
    path = edm_file(tmp_path / "short.pkl", {"weight": view(storage(zip_blob(bytes(16), 1000)), 0, (4,), (1,))})
    refused(path, r"declares 4000 bytes of float32 storage but holds 16")


# ------------------------------------------------------------------------------------ 6: views out of range


@pytest.mark.parametrize("offset, size", [(2, (4,)), (1_000_000, (1,)), (0, (5,)), (4, (2, 0, 3))])
def test_view_past_its_storage_is_refused(tmp_path, offset, size):
    """torch would grow the 4-float storage with uninitialised heap memory that ends up in the weights."""
    stride = tuple(1 for _ in size)
    path = edm_file(tmp_path / "oob.pkl", {"weight": view(storage(legacy_blob([1.0] * 4)), offset, size, stride)})
    if 0 in size:  # an empty view needs no elements, but its offset must still lie within the storage
        snap = read_edm_pickle(path)
        assert snap.state_dict["weight"].shape == size
        return
    refused(path, r"tensor view past the end of its storage \(offset \d+ \+ extent \d+ > 4 elements\)")


@pytest.mark.parametrize("offset, size, stride", [(-1, (1,), (1,)), (0, (2,), (-1,)), (0, (-2,), (1,)),
                                                  (0.5, (1,), (1,)), (0, (2, 2), (1,))])
def test_malformed_view_is_refused(tmp_path, offset, size, stride):
    path = edm_file(tmp_path / "bad.pkl", {"weight": view(storage(legacy_blob([1.0] * 4)), offset, size, stride)})
    refused(path, r"a tensor view with (offset|size|stride)")


# ------------------------------------------------------------------------------------ 12a: nested globals


def _calls_os_system(cmd: str) -> bytes:
    """A protocol-2 pickle of ``os.system(cmd)`` written by hand (GLOBAL 'os system', as a hostile file names it)."""
    arg = cmd.encode()
    return b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(arg)) + arg + b"\x85R."


@pytest.mark.parametrize("kind", ["legacy", "zip"])
def test_forbidden_global_in_a_nested_storage_is_one_clean_line(tmp_path, kind):
    marker = tmp_path / "ran"
    evil = _calls_os_system(f"touch {marker}")
    blob = legacy_blob([0.0], main=evil) if kind == "legacy" else zip_blob(bytes(4), 1, pkl=evil)
    path = edm_file(tmp_path / "nested.pkl", {"weight": view(storage(blob), 0, (1,), (1,))})
    msg = refused(path, "refused global")
    assert msg == f"{path}: refused global os.system in a nested tensor storage (pickled code is never run)"
    assert not marker.exists()


def test_forbidden_global_in_a_nested_storage_through_the_cli(tmp_path, capsys):
    marker = tmp_path / "ran"
    blob = legacy_blob([0.0], main=_calls_os_system(f"touch {marker}"))
    path = edm_file(tmp_path / "nested.pkl", {"weight": view(storage(blob), 0, (1,), (1,))})
    convert = load_script("data/convert_edm.py", "convert_edm_cli")
    assert convert.main(["--network", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "\x1b" not in err
    assert "refused global os.system in a nested tensor storage" in err and str(path) in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("main, why", [
    (pickle.dumps([1, 2], protocol=2), r"its pickle holds 0 storages and a list"),
    # torch.FloatStorage(10**9) called in the record: torch's weights-only loader would allocate 4 GB
    (b"\x80\x02ctorch\nFloatStorage\nJ\x00\xca\x9a\x3b\x85R.", r"its pickle calls torch\.FloatStorage"),
], ids=["list", "call"])
def test_nested_storage_that_is_no_storage_is_refused(tmp_path, main, why):
    """A nested record must hold exactly one storage named by its persistent id, as torch.save writes it."""
    path = edm_file(tmp_path / "odd.pkl", {"weight": view(storage(legacy_blob([0.0], main=main)), 0, (1,), (1,))})
    refused(path, rf"a damaged nested tensor storage \({why}\); expected torch\.save's record of one storage")
