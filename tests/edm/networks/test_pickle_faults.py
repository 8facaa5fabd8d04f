"""The faults a hostile-input campaign found in EDM network pickles (issue 31), each refused as one line naming the
file: constructor arguments claiming a huge network or of the wrong type, cyclic or deeply nested structures,
opcodes claiming more bytes than the file holds, integer or non-finite weights, trailing bytes, a BUILD that
would re-point a tensor, and torch's own refusals passed on with its advice to load the file unsafely.

Every file is a few kB, re-pickled from a fixture's record or written opcode by opcode; nothing in them is run.
"""

from __future__ import annotations

import collections
import inspect
import io
import pickle
import struct
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO

from diffmem.common.edm.networks.edm_pickle import (
    _HOOK,
    MAX_NESTING_DEPTH,
    PERSISTENCE_VERSION,
    EDMPickleError,
    _EDMPickler,
    check_nesting,
    edm_init_kwargs,
    load_edm_pickle,
    read_edm_pickle,
)
from diffmem.common.edm.networks.edm_preconditioners import PRECOND_ARGS, PRECOND_CLASSES
from diffmem.common.edm.networks.edm_unets import UNET_ARGS, UNETS
from diffmem.common.edm.networks.snapshot import NetworkLimits, SnapshotError, convert_edm_pickle, load_network
from diffmem.common.safe_load import UnsafeFileError, safe_torch_load

FIXTURES = REPO / "tests" / "fixtures" / "edm_pickles"
VP = FIXTURES / "edm_vp_ddpmpp.pkl"


class _PidPickler(pickle.Pickler):
    """Writes ``("PID", …)`` tuples as persistent ids, the way torch.save names a storage."""

    def persistent_id(self, obj):
        return obj[1:] if isinstance(obj, tuple) and obj[:1] == ("PID",) else None


def storage_pid(legacy: bool) -> bytes:
    """The pickle of torch.save's persistent id for one 1-element float storage (legacy: 6 fields, zip: 5)."""
    out = io.BytesIO()
    _PidPickler(out, protocol=2).dump(("PID", "storage", torch.FloatStorage, "0", "cpu", 1, *([None] * legacy)))
    return out.getvalue()


class _Reduce:
    """An object that pickles as ``func(*args)`` (and, with ``state``, a BUILD of it)."""

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def one_line(path: Path, match: str, **limits) -> str:
    """The refusal of ``load_edm_pickle(path)``: one line, starting with the file, matching ``match``."""
    with pytest.raises(EDMPickleError, match=match) as info:
        load_edm_pickle(path, limits=NetworkLimits(**limits))
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and "\x1b" not in msg, msg
    return msg


def repickled(path: Path, init_kwargs: dict | None = None, edit=None, source: Path = VP) -> Path:
    """A fixture's network written back in EDM's format with other init kwargs, or its weights edited."""
    net, _ = load_edm_pickle(source)
    if edit is not None:
        edit(net)
    with open(path, "wb") as f:
        _EDMPickler(f, net, edm_init_kwargs(net) if init_kwargs is None else init_kwargs).dump(
            dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    return path


def record_file(path: Path, state: dict, class_name: str = "VPPrecond", top=None) -> Path:
    """``{'ema': <a persistence record of class_name with this state>}``, or ``top`` holding the record."""
    meta = dict(type="class", version=PERSISTENCE_VERSION, module_src="", class_name=class_name, state=state)
    record = _Reduce(_HOOK, meta)
    with open(path, "wb") as f:
        _EDMPickler(f, None, {}).dump({"ema": record} if top is None else top(record))
    return path


VP_KWARGS = read_edm_pickle(VP).init_kwargs


# ------------------------------------------------------------------------------------ 1. a huge network


@pytest.mark.parametrize("change,match", [
    (dict(num_blocks=10**6), "num_blocks must be an integer >= 0 and <= 1000, got 1000000"),
    (dict(num_blocks=200, channel_mult=[1, 2, 2]), "3 levels of num_blocks=200 make 1209 residual blocks"),
    (dict(model_channels=10**9), "model_channels must be an integer >= 4 and <= 1048576, got 1000000000"),
    (dict(model_channels=1 << 20), r"describe a VPPrecond of [\d,]+ parameters \(\d+\.\d GiB in float32\), more "
                                   r"than --max_params 2,000,000,000"),
])
def test_constructor_arguments_claiming_a_huge_network_are_refused_before_building(tmp_path, change, match):
    path = record_file(tmp_path / "huge.pkl", {"_init_kwargs": {**VP_KWARGS, **change}})
    t0 = time.perf_counter()
    one_line(path, match)
    assert time.perf_counter() - t0 < 10  # was: built until killed


def test_iddpm_table_of_a_billion_levels_is_refused(tmp_path):
    kwargs = {**read_edm_pickle(FIXTURES / "edm_iddpm_adm.pkl").init_kwargs, "M": 10**9}
    one_line(record_file(tmp_path / "m.pkl", {"_init_kwargs": kwargs}, "iDDPMPrecond"),
             "iDDPMPrecond: M must be an integer >= 1 and <= 10000, got 1000000000")


def test_max_params_is_the_exact_count_of_the_network(tmp_path):
    n_params = sum(p.numel() for p in load_edm_pickle(VP)[0].parameters())
    assert load_edm_pickle(VP, limits=NetworkLimits(max_params=n_params))[0] is not None
    one_line(VP, f"of {n_params:,} parameters .* more than --max_params {n_params - 1:,}", max_params=n_params - 1)


# ------------------------------------------------------------------------------------ 2. cycles and nesting


def test_a_module_record_that_contains_itself_is_refused(tmp_path):
    inner = torch.nn.ModuleDict()
    inner._modules["again"] = inner  # pickled as NEWOBJ, then a BUILD whose state names the record (the memo)
    path = record_file(tmp_path / "cycle.pkl", {"_init_kwargs": VP_KWARGS, "_modules": {"model": inner}})
    one_line(path, "a ModuleDictRecord that contains itself \\(a cycle\\); expected a tree of records")


def test_cyclic_init_kwargs_are_refused(tmp_path):
    loop: list = []
    loop.append(loop)
    one_line(record_file(tmp_path / "loop.pkl", {"_init_kwargs": {**VP_KWARGS, "channel_mult": loop}}),
             "a list that contains itself")


def test_deeply_nested_structures_are_refused_without_recursion(tmp_path):
    deep: list = []
    for _ in range(MAX_NESTING_DEPTH + 10):
        deep = [deep]
    one_line(record_file(tmp_path / "kw.pkl", {"_init_kwargs": {**VP_KWARGS, "channel_mult": deep}}),
             f"containers nested more than {MAX_NESTING_DEPTH} deep")
    # 10^5 nested lists written opcode by opcode (MARK x n, then LIST x n): the walk is iterative, so no
    # RecursionError (pickle itself could not even write such a structure).
    n = 100_000
    path = tmp_path / "deep.pkl"
    path.write_bytes(b"\x80\x02}X\x03\x00\x00\x00ema" + b"(" * n + b"l" * n + b"s.")
    with pytest.raises(EDMPickleError, match=f"{path}: containers nested more than {MAX_NESTING_DEPTH} deep"):
        read_edm_pickle(path)


def test_nesting_walk_visits_a_shared_object_once_and_counts_its_depth():
    shared = [[[[]]]]  # 4 deep, shared by 2**20 paths
    node = shared
    for _ in range(20):
        node = [node, node]
    check_nesting(node, limit=24)  # 20 levels of pairs over 4: 2**20 visits without the memo of finished nodes
    with pytest.raises(EDMPickleError, match="nested more than 23 deep"):
        check_nesting(node, limit=23)


def test_a_deeply_nested_dict_key_is_refused_before_it_is_hashed(tmp_path):
    # CPython hashes a nested tuple by recursing in C without a depth check: a key 10^6 tuples deep crashed the
    # interpreter (SIGSEGV) while the pickle loaded. Shallower here (the refusal is the same, and no crash can
    # take pytest down if the check ever goes).
    path = tmp_path / "key.pkl"
    path.write_bytes(b"\x80\x02}" + b"N" + b"\x85" * 50 + b"K\x01s.")  # {((((None,),),)...): 1}
    with pytest.raises(EDMPickleError, match=f"{path}: a dict key or set element nested more than 4 tuples deep"):
        read_edm_pickle(path)
    path.write_bytes(b"\x80\x04(" + b"N" + b"\x85" * 50 + b"\x91.")  # MARK, such a tuple, FROZENSET
    with pytest.raises(EDMPickleError, match="nested more than 4 tuples deep"):
        read_edm_pickle(path)


# ------------------------------------------------------------------------------------ 3. argument types


@pytest.mark.parametrize("change,match", [
    (dict(model_channels="8"), "SongUNet: model_channels must be an integer >= 4 and <= 1048576, got '8' \\(str\\)"),
    (dict(num_blocks=-1), "num_blocks must be an integer >= 0"),
    (dict(num_blocks=2.0), "num_blocks must be an integer .* got 2.0 \\(float\\)"),
    (dict(channel_mult=True), "channel_mult must be a list of 1 to 16 integers, each >= 1 .* got True \\(bool\\)"),
    (dict(channel_mult=[1, -2]), "channel_mult must be a list"),
    (dict(attn_resolutions="4"), "attn_resolutions must be a list of 0 to 64 integers"),
    (dict(dropout=float("nan")), "dropout must be a finite number >= 0 and <= 1, got nan"),
    (dict(embedding_type=3), "embedding_type must be one of 'positional', 'fourier', got 3 \\(int\\)"),
    (dict(resample_filter=[1, -1]), "resample_filter \\[1, -1\\] sums to 0"),
    (dict(skip_connections=[2, 1, 1, 1]), "skip_connections must be None or a list"),
    (dict(img_resolution=0), "VPPrecond: img_resolution must be an integer >= 1"),
    (dict(img_channels=-3), "VPPrecond: img_channels must be an integer >= 1"),
    (dict(use_fp16="yes"), "VPPrecond: use_fp16 must be a boolean, got 'yes'"),
    (dict(beta_d=float("inf")), "VPPrecond: beta_d must be a finite number"),
    (dict(channel_mult=[1, 1, 1, 1, 1]), "channel_mult has 5 levels, but img_resolution 8 is halved to 1 pixel"),
    (dict(model_type=["SongUNet"]), "VPPrecond: model_type must be one of 'SongUNet', 'DhariwalUNet'"),
])
def test_constructor_arguments_of_the_wrong_type_or_range_are_one_line(tmp_path, change, match):
    one_line(record_file(tmp_path / "odd.pkl", {"_init_kwargs": {**VP_KWARGS, **change}}), match)


def test_ve_and_edm_sigma_ranges_are_checked(tmp_path):
    ve = read_edm_pickle(FIXTURES / "edm_ve_ncsnpp_cond.pkl").init_kwargs
    one_line(record_file(tmp_path / "ve.pkl", {"_init_kwargs": {**ve, "sigma_min": 5.0, "sigma_max": 1.0}},
                         "VEPrecond"), "sigma_min 5 must be below sigma_max 1")
    edm = read_edm_pickle(FIXTURES / "edm_edm_adm_cond.pkl").init_kwargs
    one_line(record_file(tmp_path / "edm.pkl", {"_init_kwargs": {**edm, "sigma_data": 0}}, "EDMPrecond"),
             "EDMPrecond: sigma_data must be a finite number >= 1e-12")
    assert load_edm_pickle(FIXTURES / "edm_edm_adm_cond.pkl")[0].sigma_max == float("inf")  # EDM's default


@pytest.mark.parametrize("name", [*UNETS, *PRECOND_CLASSES])
def test_every_constructor_argument_has_a_rule(name):
    cls, rules = (UNETS[name], UNET_ARGS[name]) if name in UNETS else (PRECOND_CLASSES[name], PRECOND_ARGS[name])
    taken = {p for p, spec in inspect.signature(cls.__init__).parameters.items()
             if p != "self" and spec.kind is not inspect.Parameter.VAR_KEYWORD}
    assert taken - {"model_kwargs"} == set(rules)


# ------------------------------------------------------------------------------------ 4. lengths past the file


@pytest.mark.parametrize("opcode,fmt", [
    (pickle.BINBYTES8, "<Q"), (pickle.FRAME, "<Q"), (pickle.BINUNICODE8, "<Q"), (pickle.BYTEARRAY8, "<Q"),
    (pickle.LONG4, "<i"), (pickle.BINSTRING, "<i"), (pickle.BINBYTES, "<I"), (pickle.BINUNICODE, "<I")])
def test_opcodes_claiming_more_bytes_than_the_file_holds_are_refused(tmp_path, opcode, fmt):
    huge = 10**15 if fmt == "<Q" else 2**31 - 1
    path = tmp_path / "long.pkl"
    path.write_bytes(b"\x80\x05" + opcode + struct.pack(fmt, huge) + b"x" * 10 + b".")
    with pytest.raises(EDMPickleError, match=f"not a complete EDM network pickle \\(pickle opcode .* claims {huge} "
                                             "bytes, more than the 11 that follow it\\)"):
        read_edm_pickle(path)  # was a MemoryError (the 8-byte lengths) or an allocation of 2 GiB


def _legacy_record(main: bytes) -> bytes:
    """torch.save's legacy record of one 1-element float storage whose storage pickle is ``main``."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, sys_info))
    return head + main + pickle.dumps(["0"], protocol=2) + struct.pack("<q", 1) + struct.pack("<f", 1.0)


def test_a_huge_length_inside_a_nested_storage_record_is_refused(tmp_path):
    blob = _legacy_record(b"\x80\x02\x8e" + struct.pack("<Q", 10**15) + b".")
    record_file(tmp_path / "nested.pkl", {"_init_kwargs": VP_KWARGS,
                                          "_parameters": {"w": _Reduce(torch.storage._load_from_bytes, blob)}})
    one_line(tmp_path / "nested.pkl", "a damaged nested tensor storage \\(pickle opcode BINBYTES8 claims")


# ------------------------------------------------------------------------------------ 5, 6. the weights


def test_integer_weights_are_refused_by_name(tmp_path):
    def to_int(net):
        net.model.map_layer0.weight.data = net.model.map_layer0.weight.data.to(torch.int64)

    one_line(repickled(tmp_path / "int.pkl", edit=to_int),
             "model.map_layer0.weight holds int64 values; expected floating-point weights")


@pytest.mark.parametrize("value,count", [(float("nan"), "2 NaN, 0 ±inf"), (float("inf"), "0 NaN, 2 ±inf")])
def test_non_finite_weights_are_refused_unless_allowed(tmp_path, value, count):
    def poison(net):
        net.model.enc["8x8_conv"].bias.data[:2] = value

    path = repickled(tmp_path / "nan.pkl", edit=poison)
    one_line(path, f"model.enc.8x8_conv.bias holds non-finite values \\({count} of 8\\); expected finite weights "
                   "\\(--allow_nonfinite loads it anyway\\)")
    net, _ = load_edm_pickle(path, limits=NetworkLimits(allow_nonfinite=True))
    assert not torch.isfinite(net.model.enc["8x8_conv"].bias).all()


def test_a_weight_of_another_shape_is_refused_by_name(tmp_path):
    def reshape(net):
        net.model.map_layer1.bias.data = torch.zeros(5)

    one_line(repickled(tmp_path / "shape.pkl", edit=reshape),
             "model.map_layer1.bias has shape \\[5\\], but the network its init kwargs describe has \\[32\\]")


# ------------------------------------------------------------------------------------ 7, 8, BUILD


def test_trailing_bytes_after_the_pickle_are_refused(tmp_path):
    path = tmp_path / "trail.pkl"
    path.write_bytes(VP.read_bytes() + b"junk")
    one_line(path, "4 bytes follow the end of the pickle \\(its STOP opcode\\); expected the file to end there")


def test_a_build_that_would_repoint_a_tensor_is_refused(tmp_path):
    # torch.Tensor.__setstate__ calls set_(storage, offset, size, stride) on a 4-tuple: a stride-0 view of 10^9
    # elements over a 1-element storage, past every view check. EDM's pickles BUILD module records and dtypes.
    store = _Reduce(torch.storage._load_from_bytes, _legacy_record(storage_pid(legacy=True)))
    tensor = _Reduce(torch._utils._rebuild_tensor_v2, store, 0, (1,), (1,), False, collections.OrderedDict(),
                     state=(store, 0, (10**9,), (0,)))
    record_file(tmp_path / "build.pkl", {"_init_kwargs": VP_KWARGS, "_parameters": {"w": tensor}})
    one_line(tmp_path / "build.pkl", "pickle opcode BUILD \\(set the state of\\) a Tensor")


def _zip_record(pkl: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", struct.pack("<f", 1.0))
        z.writestr("archive/version", "3\n")
    return out.getvalue()


def test_torchs_refusal_of_a_storage_record_is_said_in_our_words(tmp_path):
    # A POP in the storage's pickle: Python's unpickler takes it, torch's weights-only one refuses it with a
    # paragraph advising weights_only=False; the line names the opcode instead.
    pkl = b"\x80\x02K\x010" + storage_pid(legacy=False)[2:]  # push 1, POP it, then the storage's id
    record_file(tmp_path / "pop.pkl", {"_init_kwargs": VP_KWARGS,
                                       "_parameters": {"w": _Reduce(torch.storage._load_from_bytes, _zip_record(pkl))}})
    msg = one_line(tmp_path / "pop.pkl", "refused pickle opcode 48 \\(POP\\), which a weights file does not use")
    assert "weights_only" not in msg.removeprefix(str(tmp_path)) and "trust" not in msg


def test_a_checkpoint_file_torch_refuses_is_one_line_without_its_advice(tmp_path):
    path = tmp_path / "optimizer.bin"
    path.write_bytes(b"\x80\x02\x82\x01.")  # EXT1: an opcode no torch.save writes
    with pytest.raises(UnsafeFileError) as info:
        safe_torch_load(path)
    msg = str(info.value)
    assert msg == f"{path}: refused pickle opcode 130 (EXT1), which a weights file does not use (pickled code is " \
                  "never run)"


def test_a_snapshot_folder_with_a_hostile_weights_file_is_one_line(tmp_path):
    out, _ = convert_edm_pickle(VP, tmp_path / "snap")
    for f in out.glob("*.safetensors"):
        f.unlink()
    (out / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Reduce(eval, "1"), protocol=2))
    with pytest.raises(UnsafeFileError) as info:
        load_network(out)
    msg = str(info.value)
    assert msg.startswith(f"{out}/diffusion_pytorch_model.bin: refused global builtins.eval") and "\n" not in msg


def test_genuine_pickles_still_read_and_the_limits_travel_through_load_network(tmp_path):
    for case in ("edm_vp_ddpmpp", "dm_vp_ddpmpp_masked", "edm_ve_ncsnpp_cond", "edm_edm_adm_cond", "edm_iddpm_adm"):
        net, _ = load_edm_pickle(FIXTURES / f"{case}.pkl")
        assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])
    with pytest.raises(EDMPickleError, match="more than --max_params 10"):
        load_network(VP, limits=NetworkLimits(max_params=10))


def test_a_snapshot_folder_whose_config_claims_a_huge_network_is_refused_before_building(tmp_path):
    import json

    out, _ = convert_edm_pickle(VP, tmp_path / "snap")
    assert load_network(out) is not None
    config = json.loads((out / "config.json").read_text())
    for change, match in ((dict(num_blocks=10**6), "num_blocks must be an integer >= 0 and <= 1000"),
                          (dict(model_channels=1 << 20), "describes a VPPrecond of [\\d,]+ parameters")):
        (out / "config.json").write_text(json.dumps({**config, "model_kwargs": {**config["model_kwargs"], **change}}))
        with pytest.raises(SnapshotError, match=f"{out}/config.json: .*{match}"):
            load_network(out)


def test_a_float64_weight_whose_sum_overflows_is_still_finite(tmp_path):
    from diffmem.common.edm.networks.edm_pickle import check_weights

    big = torch.full((4,), 1e308, dtype=torch.float64)  # finite values whose sum is inf
    check_weights(tmp_path, {"w": big}, {"w": big})
    big[1] = float("-inf")
    with pytest.raises(EDMPickleError, match="w holds non-finite values \\(0 NaN, 1 ±inf of 4\\)"):
        check_weights(tmp_path, {"w": big}, {"w": big})
