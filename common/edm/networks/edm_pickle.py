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
classes (``common.edm.networks.edm_preconditioners.build_from_edm``: the arguments checked against the classes'
signatures, the network built on the meta device and its parameters counted against ``--max_params``) and given
the pickled state dict, each tensor checked for its name, shape, floating-point dtype and finite values.

What the file itself may claim is bounded as it is read: lengths within the bytes left, storages and views within
the file's size, keys hashed only when shallow, containers nested at most MAX_NESTING_DEPTH deep and never in a
cycle, nothing after the pickle's end.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import io
import os
import pickle
import pickletools
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffmem.common.edm.networks.edm_preconditioners import build_from_edm
from diffmem.common.edm.networks.edm_unets import short_repr
from diffmem.common.edm.networks.snapshot import NetworkLimits
from diffmem.common.errors import DiffmemError
from diffmem.common.results import jsonable
from diffmem.common.safe_load import refused_global, torch_failure

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

# How deep the unpickled containers may nest (dicts, lists, tuples, sets, module records). A genuine EDM snapshot
# nests 17 deep (snapshot dict, network, its state, _modules, … a parameter dict); what reads the structure
# afterwards recurses, so a deeper (or cyclic) one would end in RecursionError.
MAX_NESTING_DEPTH = 100
# How deep a tuple used as a dict key or set element may nest: CPython hashes a tuple by recursing in C without
# a depth check, so a key nested 10^6 deep crashes the interpreter. EDM's keys are strings.
MAX_KEY_DEPTH = 4
_OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


class EDMPickleError(DiffmemError, ValueError):
    """A file that is no readable EDM network pickle, or one that asks for a global we refuse; one line."""


class _LengthError(EDMPickleError):
    """A pickle opcode whose length runs past the bytes that follow it: a truncated file, or a hostile length."""


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
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str) \
            or not isinstance(meta.get("state") or {}, dict):
        raise EDMPickleError("a persistent object without EDM's class record (type='class', class_name, state)")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise EDMPickleError(f"persistence version {short_repr(meta.get('version'))} of "
                             f"{meta['class_name'][:80]}; this reader knows version {PERSISTENCE_VERSION}")
    return PersistentObject(meta["class_name"], dict(meta.get("state") or {}))


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise EDMPickleError(f"a numpy scalar of dtype {short_repr(dtype)}; only plain numeric scalars are read")
    return np.frombuffer(data, dtype=dtype, count=1)[0] if data is not None else dtype.type()


def _numpy_dtype(spec, align=False, copy=False):
    """``numpy.dtype`` of a type code ('f8', '<i4'): what EDM's pickles hold; a structured spec (nested lists
    and dicts, which numpy reads by recursion) is refused."""
    if not isinstance(spec, str) or len(spec) > 16:
        raise EDMPickleError(f"a numpy dtype of {short_repr(spec)}; only plain type codes ('f8') are read")
    return np.dtype(spec, bool(align), bool(copy))


def _set(items=()):
    """``set(items)``, its items checked before they are hashed (``_hash_safe``)."""
    items = list(items) if isinstance(items, (list, tuple, set, frozenset)) else None
    if items is None:
        raise EDMPickleError("a set of something other than a list; EDM's pickles hold sets of strings")
    _check_keys(items)
    return set(items)


def _ordered_dict(items=()):
    """``OrderedDict(items)`` (EDM's pickles give none: their items follow as SETITEMS), the keys checked first."""
    if isinstance(items, dict):
        return collections.OrderedDict(items)
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, tuple) and len(i) == 2 for i in items):
        raise EDMPickleError("an OrderedDict of something other than (key, value) pairs")
    _check_keys(k for k, _ in items)
    return collections.OrderedDict(items)


_TORCH_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList", "Identity")

ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _set,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    **{(m, name): _module_record(name) for name in _TORCH_CONTAINERS
       for m in ("torch.nn.modules.container", "torch.nn.modules.linear")},
}


def _one_line(exc: BaseException) -> str:
    """An exception as ``Type: what is wrong``, in one line: torch's weights-only refusals in our words, without
    their escape codes and their advice to load the file unsafely (``common.safe_load.torch_failure``)."""
    return f"{type(exc).__name__}: {torch_failure(exc)}"


def _refused_nested(qualname: str) -> EDMPickleError:
    return EDMPickleError(f"refused global {qualname} in a nested tensor storage (pickled code is never run)")


def _damaged_record(why: str) -> EDMPickleError:
    return EDMPickleError(f"a damaged nested tensor storage ({why}); expected torch.save's record of one storage")


def _hash_safe(key) -> bool:
    """Whether hashing ``key`` stays shallow: tuples (hashed by recursion, uncached) nest at most MAX_KEY_DEPTH."""
    stack = [(key, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, tuple):
            if depth > MAX_KEY_DEPTH:
                return False
            stack.extend((item, depth + 1) for item in value)
    return True


def _check_keys(keys) -> None:
    for key in keys:
        if not _hash_safe(key):
            raise EDMPickleError(f"a dict key or set element nested more than {MAX_KEY_DEPTH} tuples deep; "
                                 "EDM's pickles key their dicts by strings")


class _BoundedUnpickler(pickle._Unpickler):
    """Python's own unpickler with the opcodes that trust their operands checked first: a length (BINBYTES8,
    BINUNICODE8, BYTEARRAY8, FRAME, LONG4, BINSTRING, BINBYTES, BINUNICODE) beyond the bytes left in the file is
    refused before anything is allocated (a 20-byte file claiming 10^15 bytes was a MemoryError), a key is hashed
    only when it nests shallowly (``_hash_safe``), items are set on dicts, lists and sets only, and BUILD (an
    object's ``__setstate__``) runs only on the types ``_buildable`` names (torch.Tensor's would re-point a tensor
    at any storage span, past the view checks)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file):
        super().__init__(file)
        self._size = _file_size(file)
        self._tell = getattr(file, "tell", None)
        self._frame_size = 0

    def bytes_left(self) -> int | None:
        """Bytes of the file not yet consumed (those of the current frame included); None for a file of no size."""
        if self._size is None or self._tell is None:
            return None
        left = self._size - self._tell()
        frame = getattr(self, "_unframer", None) and self._unframer.current_frame
        return left + (self._frame_size - frame.tell() if frame else 0)

    def _length(self, fmt: str) -> int:
        """The length operand of the opcode just read, refused when negative or beyond the bytes left."""
        opcode = _OPCODE_NAMES.get(self._opcode, "?")
        (n,) = struct.unpack(fmt, self.read(struct.calcsize(fmt)))
        left = self.bytes_left()
        if n < 0:
            raise _LengthError(f"pickle opcode {opcode} claims a negative length, {n} bytes")
        if left is not None and n > left:
            raise _LengthError(f"pickle opcode {opcode} claims {n} bytes, more than the {left} that follow it")
        return n

    def _buildable(self, inst, state) -> bool:
        return False

    # Each load_* below is the stdlib's, with the check before it (the opcode byte is recorded for the message).
    def load_frame(self):
        self._opcode = pickle.FRAME[0]
        self._frame_size = self._length("<Q")
        self._unframer.load_frame(self._frame_size)

    def _load_bytes(self, fmt: str, opcode: bytes) -> bytes:
        self._opcode = opcode[0]
        return self.read(self._length(fmt))

    def load_binbytes(self):
        self.append(self._load_bytes("<I", pickle.BINBYTES))

    def load_binbytes8(self):
        self.append(self._load_bytes("<Q", pickle.BINBYTES8))

    def load_binunicode(self):
        self.append(str(self._load_bytes("<I", pickle.BINUNICODE), "utf-8", "surrogatepass"))

    def load_binunicode8(self):
        self.append(str(self._load_bytes("<Q", pickle.BINUNICODE8), "utf-8", "surrogatepass"))

    def load_binstring(self):
        self.append(self._decode_string(self._load_bytes("<i", pickle.BINSTRING)))

    def load_long4(self):
        self.append(pickle.decode_long(self._load_bytes("<i", pickle.LONG4)))

    def load_bytearray8(self):
        self._opcode = pickle.BYTEARRAY8[0]
        b = bytearray(self._length("<Q"))
        self.readinto(b)
        self.append(b)

    def _target(self, types: tuple, what: str, marked: bool):
        """The object an item opcode adds to (below the mark, or below the key and value), if of ``types``."""
        target = self.metastack[-1][-1] if marked else self.stack[-3 if what == "SETITEM" else -2]
        if not isinstance(target, types):
            raise EDMPickleError(f"pickle opcode {what} on a {type(target).__name__}; a pickle adds items to "
                                 "dicts, lists and sets only")
        return target

    def load_setitem(self):
        self._target((dict,), "SETITEM", marked=False)
        _check_keys(self.stack[-2:-1])
        super().load_setitem()

    def load_setitems(self):
        self._target((dict,), "SETITEMS", marked=True)
        _check_keys(self.stack[0::2])
        super().load_setitems()

    def load_dict(self):
        _check_keys(self.stack[0::2])
        super().load_dict()

    def load_additems(self):
        self._target((set,), "ADDITEMS", marked=True)
        _check_keys(self.stack)
        super().load_additems()

    def load_frozenset(self):
        _check_keys(self.stack)
        super().load_frozenset()

    def load_append(self):
        self._target((list,), "APPEND", marked=False)
        super().load_append()

    def load_appends(self):
        self._target((list,), "APPENDS", marked=True)
        super().load_appends()

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if not self._buildable(inst, state):
            raise EDMPickleError(f"pickle opcode BUILD (set the state of) a {type(inst).__name__}; EDM's pickles "
                                 "set the state of torch module records and numpy dtypes only")
        super().load_build()


for _name, _op in (("frame", pickle.FRAME), ("binbytes", pickle.BINBYTES), ("binbytes8", pickle.BINBYTES8),
                   ("binunicode", pickle.BINUNICODE), ("binunicode8", pickle.BINUNICODE8),
                   ("binstring", pickle.BINSTRING), ("long4", pickle.LONG4), ("bytearray8", pickle.BYTEARRAY8),
                   ("setitem", pickle.SETITEM), ("setitems", pickle.SETITEMS), ("dict", pickle.DICT),
                   ("additems", pickle.ADDITEMS), ("frozenset", pickle.FROZENSET), ("append", pickle.APPEND),
                   ("appends", pickle.APPENDS), ("build", pickle.BUILD)):
    _BoundedUnpickler.dispatch[_op[0]] = getattr(_BoundedUnpickler, f"load_{_name}")


class _Marker:
    """What the storage-record scan puts for a storage class or a persistent id: a name, never resolved or run."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        # torch.save's records only name their storage class; a call (torch.FloatStorage(10**12)) would allocate.
        raise _damaged_record(f"its pickle calls torch.{self.name}")


class _RecordScan(_BoundedUnpickler):
    """A nested storage record's pickles read before torch reads them: globals refused by name, persistent ids kept."""

    # Why: torch's own refusal is a multi-line message without the global's name, and torch allocates a declared
    # storage before it reads the bytes; this scan names the global and lets the size be checked first. It
    # resolves nothing (storage classes become _Marker names). The bounded Python unpickler, not the C one: the C
    # one hashes a deeply nested key without a depth check, which crashes the interpreter; the record's pickles
    # are a few dozen opcodes.

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
        raise _damaged_record(f"persistent id {short_repr(pid)}")
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
        raise _damaged_record(f"storage keys {short_repr(keys)}, expected [{key!r}]")
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


class RestrictedUnpickler(_BoundedUnpickler):
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
        except _LengthError as exc:
            raise _damaged_record(str(exc)) from None
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
            raise EDMPickleError(f"a tensor view with offset {short_repr(storage_offset)}, not an integer >= 0")
        if not (isinstance(size, tuple) and all(type(n) is int and n >= 0 for n in size)):
            raise EDMPickleError(f"a tensor view with size {short_repr(size)}, not integers >= 0")
        if not (isinstance(stride, tuple) and len(stride) == len(size) and all(type(n) is int and n >= 0
                                                                              for n in stride)):
            raise EDMPickleError(f"a tensor view with stride {short_repr(stride)} for size {size}, not one integer >= 0"
                                 " "
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
        raise EDMPickleError(f"refused persistent id {short_repr(pid)}: an EDM network pickle has none")

    def _buildable(self, inst, state) -> bool:
        # Module records keep their state as data; a numpy dtype's state is a flat tuple (byte order, sizes,
        # flags) unless it is a structured dtype, which EDM never pickles; a dict subclass (EasyDict) takes its
        # attribute dict.
        if isinstance(inst, ModuleRecord):
            return True
        if isinstance(inst, np.dtype):
            return isinstance(state, tuple) and all(isinstance(v, (int, str, bytes, type(None))) for v in state)
        return isinstance(inst, dict) and (state is None or isinstance(state, dict))


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


def _children(node):
    """The contained objects of an unpickled container (a module record's state), () for anything else."""
    if isinstance(node, (PersistentObject, ModuleRecord)):
        return (getattr(node, "state", None),)
    if isinstance(node, dict):
        return (*node.keys(), *node.values())
    if isinstance(node, (list, tuple, set, frozenset)):
        return node
    return ()


def _is_container(node) -> bool:
    return isinstance(node, (PersistentObject, ModuleRecord, dict, list, tuple, set, frozenset))


def check_nesting(top, limit: int = MAX_NESTING_DEPTH) -> None:
    """EDMPickleError when the unpickled structure holds a cycle or nests more than ``limit`` containers deep.

    Iterative (the structure may be deeper than Python's recursion limit): a depth-first walk keeps the path
    from the top, so a container met again on it is a cycle, and remembers each finished container's height, so
    an object shared by many parents (pickle's memo) is walked once."""
    height: dict[int, int] = {}  # id -> containers from it down to its deepest leaf container, itself included
    on_path: set[int] = {id(top)}
    path = [[top, iter(_children(top)), 1]]  # node, its children to walk, its height so far
    while path:
        frame = path[-1]
        child = next(frame[1], frame)  # the frame itself marks the end
        if child is frame:
            path.pop()
            on_path.discard(id(frame[0]))
            height[id(frame[0])] = frame[2]
            if path:
                path[-1][2] = max(path[-1][2], frame[2] + 1)
            continue
        if not _is_container(child):
            continue
        if id(child) in on_path:
            raise EDMPickleError(f"a {type(child).__name__} that contains itself (a cycle); expected a tree of "
                                 "records, as EDM's snapshots are")
        below = height.get(id(child))
        if below is not None:
            frame[2] = max(frame[2], below + 1)
            if len(path) + below > limit:
                break
            continue
        if len(path) >= limit:
            break
        on_path.add(id(child))
        path.append([child, iter(_children(child)), 1])
    else:
        return
    raise EDMPickleError(f"containers nested more than {limit} deep; expected an EDM snapshot, which nests about "
                         "17 deep (its network's modules, their state dicts, their tensors)")


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

    def tell(self) -> int:
        return self.file.tell()

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


def read_edm_pickle(path: str | Path) -> EDMPickle:
    """Unpickle an EDM snapshot (or a pickled network alone) with ``RestrictedUnpickler``; EDMPickleError when
    the file is missing, truncated, not a pickle, refused, followed by other bytes, nested too deep or cyclic
    (``check_nesting``), or holds no EDM network."""
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
        unpickler = RestrictedUnpickler(reader, max_storage_bytes=budget)
        try:
            top = unpickler.load()
            trailing = unpickler.bytes_left()
            if trailing:
                raise EDMPickleError(f"{trailing} bytes follow the end of the pickle (its STOP opcode); expected "
                                     "the file to end there, as pickle.dump writes it")
            check_nesting(top)
        except _LengthError as exc:
            raise EDMPickleError(f"{path}: not a complete EDM network pickle ({exc})") from None
        except EDMPickleError as exc:
            raise EDMPickleError(f"{path}: {exc}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError, AttributeError,
                IndexError, KeyError, struct.error) as exc:
            raise EDMPickleError(f"{path}: not a complete EDM network pickle ({_one_line(exc)})") from None
        sha256 = reader.hexdigest()
    net, dataset_kwargs, extras = top, None, {}
    if isinstance(top, dict):
        if "ema" not in top:
            raise EDMPickleError(f"{path}: a pickled dict without 'ema' (has {short_repr(list(top)) or 'nothing'});"
                                 " expected an EDM training snapshot")
        net = top["ema"]
        dataset_kwargs = dict(top["dataset_kwargs"]) if isinstance(top.get("dataset_kwargs"), dict) else None
        extras = {k: v.class_name for k, v in top.items() if isinstance(v, PersistentObject) and k != "ema"}
    if not isinstance(net, PersistentObject):
        raise EDMPickleError(f"{path}: the network is a {type(net).__name__}, not one of EDM's persistent classes")
    if not isinstance(net.state.get("_init_kwargs") or {}, dict):
        raise EDMPickleError(f"{path}: the network's _init_kwargs is a {type(net.state['_init_kwargs']).__name__}, "
                             "not a dict of constructor arguments")
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


def load_edm_pickle(path: str | Path, device=None, limits: NetworkLimits | None = None):
    """(our network, the pickle's record) for an EDM pickle's ``ema``: the network rebuilt from its class name and
    init kwargs with our classes, its pickled state loaded (the record keeps no tensors), eval mode, no grads.

    Before any weight is put in it: the init kwargs are checked against the classes' signatures
    (``check_edm_arguments``), the network is built on the meta device (nothing allocated) and its parameters
    counted against ``limits.max_params``; every pickled tensor must have the name, shape and a floating-point
    dtype of the network's, and hold only finite values unless ``limits.allow_nonfinite``."""
    limits = limits or NetworkLimits()
    snap = read_edm_pickle(path)
    try:
        # Built on the meta device and then given the unpickled tensors (assign=True): one copy of the weights
        # in memory, and no weight drawn at random that the pickle then replaces.
        with torch.device("meta"):
            net = build_from_edm(snap.class_name, snap.init_kwargs)
    except DiffmemError as exc:
        raise EDMPickleError(f"{snap.path}: {exc}") from None
    count = sum(p.numel() for p in net.parameters())
    if count > limits.max_params:
        raise EDMPickleError(f"{snap.path}: its init kwargs describe a {snap.class_name} of {count:,} parameters "
                             f"({count * 4 / 2**30:.1f} GiB in float32), more than --max_params "
                             f"{limits.max_params:,}; expected a network within the bound (raise --max_params to "
                             "load it)")
    ours = net.state_dict()
    missing, unexpected = _key_mismatch(ours, snap.state_dict)
    if missing or unexpected:
        raise EDMPickleError(f"{snap.path}: the pickled {snap.class_name} state does not fit the network its "
                             f"init kwargs describe (missing {missing[:3]}, unexpected {unexpected[:3]})")
    check_weights(snap.path, snap.state_dict, ours, limits.allow_nonfinite)
    net.load_state_dict(snap.state_dict, strict=True, assign=True)
    if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
        # A tensor the state dict does not carry (a non-persistent buffer): build for real and copy instead.
        net = build_from_edm(snap.class_name, snap.init_kwargs)
        net.load_state_dict(snap.state_dict, strict=True)
    snap.state_dict = {}
    net.eval().requires_grad_(False)
    return (net.to(device) if device is not None else net), snap


def check_weights(path: Path, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
                  allow_nonfinite: bool = False) -> None:
    """EDMPickleError naming the first pickled tensor (in the network's order) whose shape is not the network's,
    whose dtype is not floating point (an integer weight is a damaged or hostile file: load_state_dict would fail
    deep inside torch), or, unless ``allow_nonfinite``, that holds NaN or ±inf (which sample silently as NaN)."""
    for name, mine in ours.items():
        tensor = theirs[name]
        if tuple(tensor.shape) != tuple(mine.shape):
            raise EDMPickleError(f"{path}: {name} has shape {list(tensor.shape)}, but the network its init kwargs "
                                 f"describe has {list(mine.shape)} there")
        if not tensor.is_floating_point():
            raise EDMPickleError(f"{path}: {name} holds {str(tensor.dtype).removeprefix('torch.')} values; "
                                 "expected floating-point weights (EDM stores float32)")
    if allow_nonfinite:
        return
    for name in ours:
        tensor = theirs[name]
        # The float64 sum is finite exactly when every value is (float32/16 values cannot overflow it; NaN and ±inf
        # propagate): one reduction, 4x faster than isfinite().all(), which allocates a mask. Only a float64
        # tensor can overflow its sum, so only there is the mask the judge.
        if bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor).sum())
            raise EDMPickleError(f"{path}: {name} holds non-finite values ({nan} NaN, {int((~finite).sum()) - nan} "
                                 f"±inf of {tensor.numel()}); expected finite weights (--allow_nonfinite loads it "
                                 "anyway)")


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
