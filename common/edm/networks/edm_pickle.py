"""EDM network pickles (NVlabs/edm, DiffMemorize, Zhang et al.) read without running the code they carry.

An EDM snapshot (``network-snapshot-NNNNNN.pkl``) is a ``pickle.dump`` of a dict whose ``ema`` entry is the
preconditioned network. NVlabs' persistence pickles each object of its own classes as a call of
``torch_utils.persistence._reconstruct_persistent_obj`` with the full source text of the defining module, which
their loader executes: so loading needs their code, and a pickle can run anything. Here a restricted unpickler
allows only the globals such a snapshot needs (torch's tensor and parameter rebuilders, storages read back with
``torch.load(weights_only=True)``, ``OrderedDict``, torch's container modules as plain records, numpy scalars and
dtypes) and turns every persistent object into a ``PersistentObject``: its class name and its pickled
``__dict__`` (``_init_kwargs``, ``_parameters``, ``_buffers``, ``_modules``, …). The embedded source is dropped
unread. The network is then rebuilt from the preconditioner's class name and ``_init_kwargs`` with our own
classes (``common.edm.edm_nets.build_from_edm``) and given the pickled state dict.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights

from diffmem.common.edm.networks.edm_preconditioners import build_from_edm
from diffmem.common.errors import DiffmemError
from diffmem.common.results import jsonable
from diffmem.common.safe_load import ESCAPE_CODES, refused_global

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of every released EDM/DiffMemorize pickle

# Bytes of tensor storage allowed per byte of the file, over all storages the file creates (and over all tensors its
# state dict names). torch writes every storage's bytes raw into the file (the legacy record's tail, or a ZIP_STORED
# member), so a genuine file always holds fewer storage bytes than file bytes (EDM's: ~0.75 of the size, the rest
# pickle): 1 needs no slack. More can only come from compression, a storage record loaded twice or one tensor
# named many times: amplification a hostile file uses to turn kilobytes into gigabytes on load or conversion.
MAX_STORAGE_BYTES_PER_FILE_BYTE = 1

# The storage classes torch.save names in a storage record's persistent id (``torch.FloatStorage`` …), with their
# dtypes written out (reading them off torch's classes warns of TypedStorage's deprecation); nothing else is
# needed in a storage record.
_STORAGE_CLASSES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool}
_VIEW_RULE = "EDM's parameters and buffers are contiguous tensors, each over its own storage"


class EDMPickleError(DiffmemError, ValueError):
    """A file that is no readable EDM network pickle, or one that asks for a global we refuse; one line."""


# ------------------------------------------------------------------------------------ records


@dataclass
class PersistentObject:
    """An object of one of NVlabs' persistent classes: its class name and pickled ``__dict__`` (no code)."""

    class_name: str
    state: dict = field(repr=False)

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})


class ModuleRecord:
    """A plain torch container module (``ModuleDict`` …) kept as its class name and pickled ``__dict__``."""

    class_name = "Module"

    def __setstate__(self, state):
        self.state = state


def _module_record(name: str) -> type:
    return type(name + "Record", (ModuleRecord,), {"class_name": name})


class _EasyDict(dict):
    """``dnnlib.util.EasyDict`` as a plain dict (it is one, with attribute access)."""


def _persistent_object(meta: dict) -> PersistentObject:
    """Stands in for ``_reconstruct_persistent_obj``: keeps the class name and state, never the module source."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or "class_name" not in meta:
        raise EDMPickleError("a persistent object without EDM's class record (type='class', class_name, state)")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise EDMPickleError(f"persistence version {meta.get('version')!r} of {meta['class_name']}; "
                             f"this reader knows version {PERSISTENCE_VERSION}")
    return PersistentObject(str(meta["class_name"]), dict(meta.get("state") or {}))


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise EDMPickleError(f"a numpy scalar of dtype {dtype!r}; only plain numeric scalars are read")
    return np.frombuffer(data, dtype=dtype, count=1)[0] if data is not None else dtype.type()


_TORCH_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList", "Identity")

ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    **{(m, name): _module_record(name) for name in _TORCH_CONTAINERS
       for m in ("torch.nn.modules.container", "torch.nn.modules.linear")},
}


def _one_line(exc: BaseException) -> str:
    """An exception as ``Type: first line``, terminal escape codes removed (torch's messages carry some)."""
    text = ESCAPE_CODES.sub("", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _refused_nested(qualname: str) -> EDMPickleError:
    return EDMPickleError(f"refused global {qualname} in a nested tensor storage (pickled code is never run)")


def _damaged_record(why: str) -> EDMPickleError:
    return EDMPickleError(f"a damaged nested tensor storage ({why}); expected torch.save's record of one storage")


class _Marker:
    """What the storage-record scan puts for a storage class or a persistent id: a name, never resolved or run."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        # torch.save's records only name their storage class; a call (torch.FloatStorage(10**12)) would allocate.
        raise _damaged_record(f"its pickle calls torch.{self.name}")


class _RecordScan(pickle.Unpickler):
    """A nested storage record's pickles read before torch reads them: globals refused by name, persistent ids kept."""

    # Why: torch's own refusal is a multi-line message without the global's name, and torch allocates a declared
    # storage before it reads the bytes; this scan names the global and lets the size be checked first. It
    # resolves nothing (storage classes become _Marker names), so the fast C unpickler is safe here.

    def __init__(self, file):
        super().__init__(file)
        self.pids: list[tuple] = []

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_CLASSES:
            return _Marker(name)
        raise _refused_nested(f"{module}.{name}")

    def persistent_load(self, pid):
        self.pids.append(pid)
        return _Marker("<persistent id>")


def _declared_storage(scan: _RecordScan, result, pid_len: int) -> tuple[str, torch.dtype, int]:
    """(key, dtype, bytes) of the one storage a record's pickle declares; refused unless it is exactly that."""
    if len(scan.pids) != 1 or not isinstance(result, _Marker) or result.name != "<persistent id>":
        raise _damaged_record(f"its pickle holds {len(scan.pids)} storages and a {type(result).__name__}")
    pid = scan.pids[0]
    ok = (isinstance(pid, tuple) and len(pid) == pid_len and pid[0] in ("storage", b"storage")
          and isinstance(pid[1], _Marker) and pid[1].name in _STORAGE_CLASSES
          and type(pid[4]) is int and pid[4] >= 0 and (pid_len == 5 or pid[5] is None))
    if not ok:
        raise _damaged_record(f"persistent id {pid!r:.80}")
    dtype = _STORAGE_CLASSES[pid[1].name]
    return str(pid[2]), dtype, pid[4] * torch._utils._element_size(dtype)


def _scan_legacy_record(blob: bytes) -> tuple[torch.dtype, int, int]:
    """(dtype, declared bytes, raw bytes present) of a legacy ``torch.save`` record of one storage."""
    # Layout: magic, version and system-info pickles, the storage's pickle, its key list, then per key an int64
    # element count and the raw bytes.
    f = io.BytesIO(blob)  # shares the bytes: no copy
    for _ in range(3):
        _RecordScan(f).load()
    scan = _RecordScan(f)
    key, dtype, nbytes = _declared_storage(scan, scan.load(), 6)
    keys = _RecordScan(f).load()
    if keys != [key]:
        raise _damaged_record(f"storage keys {keys!r:.80}, expected [{key!r}]")
    return dtype, nbytes, max(0, len(blob) - f.tell() - 8)


def _scan_zip_record(blob: bytes) -> tuple[torch.dtype, int, int]:
    """(dtype, declared bytes, raw bytes present) of a zip ``torch.save`` record, read without inflating anything."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        # The central directory first: torch.save writes ZIP_STORED members only, and a compressed one (a few kB
        # that inflate to gigabytes) is refused before torch or zipfile inflates a byte of it.
        infos = z.infolist()
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                method = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                          zipfile.ZIP_LZMA: "lzma"}.get(info.compress_type, f"method {info.compress_type}")
                raise EDMPickleError(f"a nested tensor storage with a compressed record {info.filename} ({method}, "
                                     f"{info.file_size} bytes when inflated); torch.save writes ZIP_STORED only")
        if not infos:
            raise _damaged_record("an empty zip")
        prefix = infos[0].filename.split("/", 1)[0]  # torch's reader takes the first member's folder
        members = {info.filename: info for info in infos}
        if f"{prefix}/data.pkl" not in members:
            raise _damaged_record(f"no {prefix}/data.pkl")
        scan = _RecordScan(io.BytesIO(z.read(f"{prefix}/data.pkl")))
        key, dtype, nbytes = _declared_storage(scan, scan.load(), 5)
        record = members.get(f"{prefix}/data/{key}")
        return dtype, nbytes, (min(record.file_size, len(blob)) if record is not None else 0)


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that resolves only ``ALLOWED_GLOBALS``; anything else is refused before it runs.

    Why the pure-Python unpickler: each storage arrives as a nested ``torch.save`` blob that pickle also keeps in
    its memo; here the memo entry is dropped once the blob is read, so the raw bytes and the tensors are not
    both held to the end (peak memory about one file size, not two). Its opcode loop costs little: the bulk of
    an EDM pickle is those few hundred blobs."""

    def __init__(self, file, *, max_storage_bytes: int | None = None):
        super().__init__(file)
        # Storages and tensor views are checked as they are built, so a hostile file is refused before it costs
        # memory: all storages together hold at most max_storage_bytes (default: the file's size times
        # MAX_STORAGE_BYTES_PER_FILE_BYTE), every view lies within its storage, reads each element once, and
        # keeps apart from the other views of the same storage.
        if max_storage_bytes is None:
            size = _file_size(file)
            max_storage_bytes = None if size is None else size * MAX_STORAGE_BYTES_PER_FILE_BYTE
        self.max_storage_bytes = max_storage_bytes
        self.storage_bytes = 0  # bytes of all storages made so far
        # id(storage) -> (storage, sorted [(start, end)] element spans of its views); the storage is kept so its id
        # cannot be reused by another while this unpickler runs.
        self._views: dict[int, tuple[object, list[tuple[int, int]]]] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self._storage_from_bytes
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._tensor_view
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise EDMPickleError(f"refused global {module}.{name}: an EDM network pickle needs only torch's "
                                 "tensor rebuilders, OrderedDict, torch containers, numpy scalars and EDM's "
                                 "persistence record; nothing was run") from None

    def _storage_from_bytes(self, blob: bytes):
        """Stands in for ``torch.storage._load_from_bytes``: one nested storage record, scanned, then weights only."""
        if not isinstance(blob, (bytes, bytearray)):
            raise EDMPickleError(f"a storage given as {type(blob).__name__}, not bytes")
        blob = bytes(blob)  # bytes stay as they are; a bytearray is copied once
        try:
            dtype, nbytes, present = (_scan_zip_record if blob[:4] == b"PK\x03\x04" else _scan_legacy_record)(blob)
        except EDMPickleError:
            raise
        except Exception as exc:  # any damage the scan meets (it builds nothing, so nothing else can happen)
            raise _damaged_record(_one_line(exc)) from None
        if nbytes > present:
            raise EDMPickleError(f"a nested tensor storage that declares {nbytes} bytes of "
                                 f"{str(dtype).removeprefix('torch.')} storage but holds {present}")
        if self.max_storage_bytes is not None and self.storage_bytes + nbytes > self.max_storage_bytes:
            raise EDMPickleError(f"its tensor storages hold more than the file's {self.max_storage_bytes} bytes "
                                 f"(at {self.storage_bytes + nbytes}): torch stores every storage byte in the "
                                 "file, so the excess is a storage record loaded twice")
        try:
            storage = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
        except Exception as exc:  # torch's weights-only refusals and damage, as one line without escape codes
            name = refused_global(exc)
            raise (_refused_nested(name) if name else _damaged_record(_one_line(exc))) from None
        if not isinstance(storage, torch.storage.TypedStorage) or storage.dtype != dtype \
                or storage._untyped_storage.nbytes() != nbytes:
            raise _damaged_record(f"torch read a {type(storage).__name__}, not the {nbytes}-byte storage declared")
        self.storage_bytes += nbytes
        # The blob and its argument tuple (blob,) were memoized just before this call: let both go now.
        top = len(self.memo)
        for key in range(top - 1, max(top - 6, -1), -1):
            value = self.memo.get(key)
            if value is blob or (isinstance(value, tuple) and any(v is blob for v in value)):
                self.memo[key] = None
        return storage

    def _tensor_view(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
        """Stands in for ``torch._utils._rebuild_tensor_v2``: a view that reads its own part of its storage once."""
        # Why: torch grows a storage too small for the view with uninitialised heap memory (which would end up
        # in the weights), and stride 0 or overlapping views turn a few stored bytes into a large network.
        if not isinstance(storage, torch.storage.TypedStorage):
            raise EDMPickleError(f"a tensor view of a {type(storage).__name__}, not a storage")
        if type(storage_offset) is not int or storage_offset < 0:
            raise EDMPickleError(f"a tensor view with offset {storage_offset!r:.40}, not an integer >= 0")
        if not (isinstance(size, tuple) and all(type(n) is int and n >= 0 for n in size)):
            raise EDMPickleError(f"a tensor view with size {size!r:.80}, not integers >= 0")
        if not (isinstance(stride, tuple) and len(stride) == len(size) and all(type(n) is int and n >= 0
                                                                              for n in stride)):
            raise EDMPickleError(f"a tensor view with stride {stride!r:.80} for size {size}, not one integer >= 0 "
                                 "per dimension")
        elements = storage._untyped_storage.nbytes() // torch._utils._element_size(storage.dtype)
        extent = 0  # elements from the first to one past the last the view reads
        if all(size):
            # Ascending strides: each must step past everything the smaller ones reach, so no element is read
            # twice (size-1 dims read nothing twice whatever their stride).
            reach = 0
            for n, s in sorted(((n, s) for n, s in zip(size, stride) if n > 1), key=lambda d: d[1]):
                if s == 0:
                    raise EDMPickleError(f"a tensor view with stride 0 (size {size}, stride {stride}): it repeats "
                                         f"one stored element; {_VIEW_RULE}")
                if s <= reach:
                    raise EDMPickleError(f"a tensor view whose elements overlap (size {size}, stride {stride}); "
                                         f"{_VIEW_RULE}")
                reach += (n - 1) * s
            extent = reach + 1
        if storage_offset + extent > elements or storage_offset > elements:
            raise EDMPickleError(f"a tensor view past the end of its storage (offset {storage_offset} + extent "
                                 f"{extent} > {elements} elements); {_VIEW_RULE}")
        if extent:
            # Sorted disjoint spans: a new one is checked against its two neighbours only (many views of one
            # storage cost n log n, not n²).
            _, spans = self._views.setdefault(id(storage), (storage, []))
            start, end = storage_offset, storage_offset + extent
            i = bisect.bisect_left(spans, (start, end))
            for a, b in spans[max(i - 1, 0):i + 1]:
                if start < b and a < end:
                    raise EDMPickleError(f"two tensor views over the same storage elements ({max(a, start)} to "
                                         f"{min(b, end) - 1}); {_VIEW_RULE}")
            spans.insert(i, (start, end))
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                               backward_hooks, metadata)

    def persistent_load(self, pid):
        raise EDMPickleError(f"refused persistent id {pid!r}: an EDM network pickle has none")


def _file_size(file) -> int | None:
    """The size of an open file (or of the file a ``_HashingReader`` reads), None when it has none."""
    inner = getattr(file, "file", file)
    try:
        return os.fstat(inner.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    try:
        return inner.getbuffer().nbytes
    except (AttributeError, ValueError):
        return None


# ------------------------------------------------------------------------------------ reading


@dataclass
class EDMPickle:
    """What an EDM snapshot holds: the network's preconditioner class, its init kwargs and state dict."""

    path: Path
    sha256: str
    class_name: str  # VPPrecond, VEPrecond, iDDPMPrecond or EDMPrecond
    init_kwargs: dict
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    dataset_kwargs: dict | None = None
    extras: dict = field(default_factory=dict)  # other snapshot entries (loss_fn, augment_pipe): class names

    def metadata(self) -> dict:
        """JSON-able provenance: the file, its SHA-256, the classes and init kwargs, the dataset kwargs."""
        return {"source": str(self.path), "sha256": self.sha256, "class_name": self.class_name,
                "model_type": self.init_kwargs.get("model_type", "SongUNet"),
                "init_kwargs": jsonable(self.init_kwargs), "dataset_kwargs": jsonable(self.dataset_kwargs),
                "extras": self.extras}


def collect_state_dict(obj, where: str = "ema") -> dict[str, torch.Tensor]:
    """The state dict (``_parameters`` and persistent ``_buffers``, recursively through ``_modules``) of a record,
    with the names ``torch.nn.Module.state_dict`` gives the original object."""
    out: dict[str, torch.Tensor] = {}

    def visit(node, prefix: str):
        if isinstance(node, (PersistentObject, ModuleRecord)):
            state = node.state
        else:
            raise EDMPickleError(f"{where}.{prefix.rstrip('.') or '<root>'} is a {type(node).__name__}, "
                                 "not a module record")
        skip = set(state.get("_non_persistent_buffers_set") or ())
        for kind in ("_parameters", "_buffers"):
            for name, value in (state.get(kind) or {}).items():
                if value is None or (kind == "_buffers" and name in skip):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise EDMPickleError(f"{where}.{prefix}{name} is a {type(value).__name__}, not a tensor")
                out[prefix + name] = value.detach()
        for name, child in (state.get("_modules") or {}).items():
            if child is not None:
                visit(child, f"{prefix}{name}.")

    visit(obj, "")
    return out


class _HashingReader:
    """A binary file whose every byte read also goes into a SHA-256: one pass gives the objects and the hash."""

    def __init__(self, file):
        self.file, self.hash = file, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(n)
        self.hash.update(data)
        return data

    def readline(self) -> bytes:
        data = self.file.readline()
        self.hash.update(data)
        return data

    def hexdigest(self) -> str:
        self.hash.update(self.file.read())  # anything after the pickle's STOP belongs to the file too
        return self.hash.hexdigest()


def read_edm_pickle(path: str | Path) -> EDMPickle:
    """Unpickle an EDM snapshot (or a pickled network alone) with ``RestrictedUnpickler``; EDMPickleError when
    the file is missing, truncated, not a pickle, refused, or holds no EDM network."""
    path = Path(path)
    if not path.is_file():
        raise EDMPickleError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(2)
        if len(head) < 2 or head[0] != 0x80:
            raise EDMPickleError(f"{path}: not a pickle file (expected an EDM network-snapshot-*.pkl)")
        f.seek(0)
        reader = _HashingReader(f)
        budget = path.stat().st_size * MAX_STORAGE_BYTES_PER_FILE_BYTE
        try:
            top = RestrictedUnpickler(reader, max_storage_bytes=budget).load()
        except EDMPickleError as exc:
            raise EDMPickleError(f"{path}: {exc}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError, AttributeError,
                IndexError, KeyError) as exc:
            raise EDMPickleError(f"{path}: not a complete EDM network pickle ({_one_line(exc)})") from None
        sha256 = reader.hexdigest()
    net, dataset_kwargs, extras = top, None, {}
    if isinstance(top, dict):
        if "ema" not in top:
            raise EDMPickleError(f"{path}: a pickled dict without 'ema' (has {', '.join(map(str, top)) or 'nothing'});"
                                 " expected an EDM training snapshot")
        net = top["ema"]
        dataset_kwargs = dict(top["dataset_kwargs"]) if isinstance(top.get("dataset_kwargs"), dict) else None
        extras = {k: v.class_name for k, v in top.items() if isinstance(v, PersistentObject) and k != "ema"}
    if not isinstance(net, PersistentObject):
        raise EDMPickleError(f"{path}: the network is a {type(net).__name__}, not one of EDM's persistent classes")
    try:
        state_dict = collect_state_dict(net)
    except EDMPickleError as exc:
        raise EDMPickleError(f"{path}: {exc}") from None
    # One stored tensor may be named under many keys (pickle's memo): bound the named bytes as the stored ones.
    named = sum(t.numel() * t.element_size() for t in state_dict.values())
    if named > budget:
        raise EDMPickleError(f"{path}: its state dict holds {named} bytes of tensors, more than the file's {budget} "
                             "bytes (a stored tensor named more than once); EDM names each tensor once")
    return EDMPickle(path=path, sha256=sha256, class_name=net.class_name, init_kwargs=net.init_kwargs,
                     state_dict=state_dict, dataset_kwargs=dataset_kwargs, extras=extras)


def load_edm_pickle(path: str | Path, device=None):
    """(our network, the pickle's record) for an EDM pickle's ``ema``: the network rebuilt from its class name and
    init kwargs with our classes, its pickled state loaded (the record keeps no tensors), eval mode, no grads."""
    snap = read_edm_pickle(path)
    try:
        # Parameters made on the meta device and then given the unpickled tensors (assign=True): one copy of
        # the weights in memory. Buffers (small: filters, σ tables) are built for real.
        with init_empty_weights(include_buffers=False):
            net = build_from_edm(snap.class_name, snap.init_kwargs)
    except DiffmemError as exc:
        raise EDMPickleError(f"{snap.path}: {exc}") from None
    missing, unexpected = _key_mismatch(net.state_dict(), snap.state_dict)
    if missing or unexpected:
        raise EDMPickleError(f"{snap.path}: the pickled {snap.class_name} state does not fit the network its "
                             f"init kwargs describe (missing {missing[:3]}, unexpected {unexpected[:3]})")
    net.load_state_dict(snap.state_dict, strict=True, assign=True)
    if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
        # A tensor the state dict does not carry (a non-persistent buffer): build for real and copy instead.
        net = build_from_edm(snap.class_name, snap.init_kwargs)
        net.load_state_dict(snap.state_dict, strict=True)
    snap.state_dict = {}
    net.eval().requires_grad_(False)
    return (net.to(device) if device is not None else net), snap


def _key_mismatch(ours: dict, theirs: dict) -> tuple[list[str], list[str]]:
    return sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))


# ------------------------------------------------------------------------------------ writing


class _PersistenceHook:
    """Pickles as the global ``torch_utils.persistence._reconstruct_persistent_obj`` (without importing it)."""

    def __call__(self, meta):
        raise EDMPickleError("EDM's persistence hook is only written here, never called")

    def __reduce__(self):
        return "_reconstruct_persistent_obj"


_HOOK = _PersistenceHook()
_STATE_KEYS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training")


class _EDMPickler(pickle._Pickler):
    """Writes modules as EDM's persistence records (class name + state, blank module source); torch's containers
    and tensors as a plain pickler does, which is how EDM's snapshots hold them."""

    def __init__(self, file, top, init_kwargs: dict):
        super().__init__(file, protocol=4)
        self.top, self.init_kwargs = top, init_kwargs

    def reducer_override(self, obj):
        if not isinstance(obj, torch.nn.Module) or type(obj).__module__.startswith("torch.nn"):
            return NotImplemented
        state = {k: v for k, v in obj.__dict__.items()
                 if k in _STATE_KEYS or isinstance(v, (bool, int, float, str, type(None)))}
        if obj is self.top:
            state["_init_kwargs"] = self.init_kwargs
        meta = dict(type="class", version=PERSISTENCE_VERSION, module_src="", class_name=type(obj).__name__,
                    state=state)
        return _HOOK, (meta,)

    def save_global(self, obj, name=None):
        if obj is _HOOK:
            self.save("torch_utils.persistence")
            self.save("_reconstruct_persistent_obj")
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)


def edm_init_kwargs(net) -> dict:
    """The ``_init_kwargs`` EDM would record for one of our preconditioned networks (its config, flattened)."""
    config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    return {**{k: v for k, v in config.items() if k != "model_kwargs"}, **(config.get("model_kwargs") or {})}


def write_edm_pickle(net, path: str | Path, dataset_kwargs: dict | None = None) -> Path:
    """Write one of our preconditioned networks in EDM's snapshot format (``{'ema': net, …}``), with blank
    module source: what our reader takes (tests, benches, run folders); NVlabs' own loader cannot rebuild it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        _EDMPickler(f, net, edm_init_kwargs(net)).dump(
            dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dict(dataset_kwargs or {})))
    tmp.replace(path)
    return path
