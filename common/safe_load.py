"""Reading torch files without running code: ``torch.load(weights_only=True)`` with one-line refusals.

A pickle can name any importable callable and have it called while loading (``builtins.eval`` in a REDUCE), so
every torch/pickle file diffmem reads from a folder a user points it at goes through torch's weights-only
unpickler: tensors, plain containers and numbers load, anything else is refused before it is called. What torch
says when it refuses is a paragraph with terminal escape codes; :func:`refusal_line` keeps what a user needs: the
file and the global that was refused.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from pathlib import Path

from diffmem.common.errors import DiffmemError

# The files Accelerate writes into a checkpoint folder that are pickles (torch.save): optimizer, scheduler,
# grad scaler, sampler and RNG states, and the legacy EMA state of checkpoints written before ema_state.json.
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


class UnsafeFileError(DiffmemError, ValueError):
    """A file that is not the plain tensors-and-numbers pickle it should be; str() is one line."""


# Terminal escape codes: torch's weights-only refusal prints its advice in bold.
ESCAPE_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def refused_global(exc: BaseException) -> str | None:
    """The global torch's weights-only unpickler refused in ``exc`` (``module.name``), or None."""
    # torch says "Unsupported global: GLOBAL m.f" for a global it does not allow, and "Trying to load unsupported
    # GLOBAL posix.system whose module posix is blocked" for one of a module it never allows (os, subprocess...).
    found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", ESCAPE_CODES.sub("", str(exc)))
    if not found:
        return None
    name = found.group(1)
    return name if "." in name else f"builtins.{name}"  # torch prints builtins without their module


# What torch's weights-only unpickler says of an opcode it does not take ("Unsupported operand 130").
_UNSUPPORTED_OPERAND = re.compile(r"Unsupported operand (\d+)")
# Where torch's refusals start advising the reader (to allowlist a global, or to load with weights_only=False).
_ADVICE = re.compile(r"\s*(?:Please use|Please file|Re-running|Check the documentation|if you trust|"
                     r"do those steps|Do it only)", re.IGNORECASE)


def torch_failure(exc: BaseException) -> str:
    """What a torch read failure says is wrong, in one line of our words: the refused global, or the reason
    torch's weights-only unpickler gives, without its terminal escape codes and without its advice to load the
    file with ``weights_only=False`` (which would run the code it refused)."""
    text = ESCAPE_CODES.sub("", str(exc))
    name = refused_global(exc)
    if name:
        return f"refused global {name}"
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.DOTALL)
    if detail or "Weights only load failed" in text:
        reason = " ".join(detail.group(1).split()) if detail else ""
        operand = _UNSUPPORTED_OPERAND.search(reason)
        if operand:
            code = int(operand.group(1))
            op = next((o.name for o in pickletools.opcodes if o.code == chr(code)), None) if code < 256 else None
            if op is None:  # torch reads on past what is no pickle at all
                return f"not a pickle: byte {code} is no pickle opcode"
            return f"refused pickle opcode {code} ({op}), which a weights file does not use"
        reason = _ADVICE.split(reason, maxsplit=1)[0].strip().rstrip(".")
        return f"refused by the weights-only reader: {reason}" if reason else "refused by the weights-only reader"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _ADVICE.split(lines[0], maxsplit=1)[0].strip()[:200] if lines else type(exc).__name__


def refusal_line(path: str | Path, exc: BaseException) -> str:
    """One line for a refused or unreadable torch file: the refused global when torch names one, else what
    ``torch_failure`` makes of torch's message."""
    name = refused_global(exc)
    if name:
        return (f"{path}: refused global {name} (a checkpoint file holds tensors and plain data; pickled code is "
                f"never run)")
    reason = torch_failure(exc)
    if reason.startswith("refused"):
        return f"{path}: {reason} (pickled code is never run)"
    return f"{path}: not a readable torch file ({reason})"


def safe_torch_load(path: str | Path, map_location="cpu", extra_globals=(), mmap: bool = False):
    """``torch.load(path, weights_only=True)``; a refused global or an unreadable file is an UnsafeFileError.

    extra_globals: classes or functions allowed beyond torch's defaults (numpy's RNG-state types for
    Accelerate's random_states files). mmap maps a zip-format file's tensors instead of reading them, for a check.
    """
    import torch

    path = Path(path)
    mmap = mmap and zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be mapped
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError,
            ModuleNotFoundError, ImportError, KeyError, IndexError, zipfile.BadZipFile, OSError) as exc:
        raise UnsafeFileError(refusal_line(path, exc)) from None


def accelerate_safe_globals() -> tuple:
    """What Accelerate itself allows when it loads its checkpoint files (numpy's types in the RNG states)."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    return tuple(TORCH_SAFE_GLOBALS)


def verify_checkpoint_files(folder: str | Path) -> None:
    """Check every pickle-format file of a checkpoint folder (and its model sub-folders) with the weights-only
    unpickler, tensors mapped rather than read; the first refused file is an UnsafeFileError.

    Accelerate loads these files itself (weights-only too, but a refusal surfaces as a traceback from deep inside
    ``load_state``, and an RNG state it cannot read is skipped without a word): checking first turns either into
    one line naming the file, before any state is touched.
    """
    allowed = accelerate_safe_globals()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            safe_torch_load(path, extra_globals=allowed, mmap=True)
