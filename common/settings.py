"""What a settings dataclass is made of: ``option()`` fields (each default written once, its help beside it) and
the value types of their command-line form. Library code builds its dataclasses from these alone; the CLI plumbing
that reads them (``common.cli``) is for the CLIs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from diffmem.common.textfiles import surrogate_problem


def finite_float(text: str) -> float:
    """An option type: a float that is finite. NaN compares unequal to itself (an identical rerun would be refused
    as different settings) and is not JSON; an infinity is no usable scale, weight or rate."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def extended_float(text: str) -> float:
    """An option type for the few fields where an infinity is documented to mean something (``option(finite=False)``,
    e.g. the sampler's S_max = inf: no upper bound): any float but NaN, which means nothing anywhere."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number or inf, got {text!r}")
    return value


def prompt_text(text: str) -> str:
    """An option type for a prompt given on the command line: a byte that is not UTF-8 reaches Python as a lone
    surrogate (the surrogateescape of argv), which the tokenizer fails on only after the model has loaded."""
    escaped = next((ord(c) - 0xDC00 for c in text if 0xDC80 <= ord(c) <= 0xDCFF), None)
    if escaped is not None:  # what surrogateescape makes of the byte
        raise argparse.ArgumentTypeError(f"the text holds the byte 0x{escaped:02x}, which is not UTF-8; expected UTF-8 "
                                         f"text")
    problem = surrogate_problem(text, "the text")
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def option(default=dataclasses.MISSING, *, help: str, choices=None, type=None, metavar=None, flag: str | None = None,
           default_factory=dataclasses.MISSING, nargs=None, action: str | None = None, positional: bool = False,
           finite: bool = True):
    """A settings-dataclass field that is also a command-line option: the default is written here once, and
    ``add_settings_arguments`` reads the help, choices, type (needed where the default cannot tell it: None,
    lists) and metavar from the field. ``flag`` renames the option (``--no_progress`` for a True boolean);
    ``nargs`` and ``action`` (e.g. ``extend``) are argparse's, for list fields; ``positional`` makes the field a
    positional argument instead of ``--FIELD``. A float option must be finite (``finite_float``); ``finite=False``
    lets it take ±inf too, for a field whose help says what an infinity means."""
    metadata = {k: v for k, v in dict(help=help, choices=choices, type=type, metavar=metavar, flag=flag, nargs=nargs,
                                      action=action, positional=positional or None,
                                      finite=None if finite else False).items()
                if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def device_option(default: str | None = None, *, indexed: bool = False):
    """The ``--device`` field of a settings dataclass: cpu or cuda, None (not given) for ``resolve_device``'s rule.
    ``indexed``: any name ``resolve_device`` takes (cuda:N, auto too), for the CLIs that have always taken those."""
    if indexed:
        return option(default, type=str, metavar="DEVICE",
                      help="cpu, cuda or cuda:N; auto or None: cuda when available, else cpu")
    return option(default, choices=("cpu", "cuda"), help="None: cuda when available, else cpu")


def int_list(text: str) -> list[int]:
    """An option type: '1,1,0' or '16' -> [1, 1, 0] / [16]."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
