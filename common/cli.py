"""Command-line plumbing shared by every diffmem CLI."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable

from diffmem.common.errors import ConfigError, DiffmemError
from diffmem.common.textfile import surrogate_problem


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (plus exit code 2) instead of the usage block, and whose
    ``--help`` shows every option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def add_settings_arguments(parser, settings_class, exclude=(), only=None, defaults=None) -> None:
    """One ``--FIELD`` option per field of a settings dataclass (except ``exclude``; with ``only``, those fields
    alone, e.g. the two of a mutually exclusive group), with the dataclass's default,
    so defaults are written once: a field without a default is a required option, a boolean a switch (its
    ``flag``, e.g. ``--no_progress``, turns a True default off), the type from the field's metadata or else its
    default's (a float one parsed by ``finite_float``, or ``extended_float`` for ``finite=False``). ``defaults``
    gives a CLI's own default for a field of a library dataclass whose default suits its other callers (or that
    has none)."""
    defaults = defaults or {}
    for f in dataclasses.fields(settings_class):
        if f.name in exclude or (only is not None and f.name not in only):
            continue
        md = f.metadata
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        required = (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                    and f.name not in defaults)
        common = dict(help=md.get("help"))
        if md.get("positional"):
            names = [f.name]
        else:
            names = [md.get("flag", f"--{f.name}")]
            common["dest"] = f.name
        if isinstance(default, bool) and "action" not in md:
            parser.add_argument(*names, action="store_false" if default else "store_true", default=default, **common)
            continue
        kind = md.get("type", type(default) if default is not None and not isinstance(default, (list, tuple))
                      else None)
        if kind is None and (default is not None or required):
            kind = str
        if kind is float:  # nan/inf would pass float() and reach the run (NaN scores, a refused identical rerun)
            kind = extended_float if md.get("finite") is False else finite_float
        extra = {k: md[k] for k in ("nargs", "action") if k in md}
        if not md.get("positional"):
            extra["required"] = required
        parser.add_argument(*names, type=kind, default=default, choices=md.get("choices"), metavar=md.get("metavar"),
                            **extra, **common)


def settings_from_args(settings_class, namespace: argparse.Namespace, **values):
    """The settings dataclass filled from the parsed options of its fields (``values`` take precedence)."""
    given = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(settings_class)
             if hasattr(namespace, f.name)}
    return settings_class(**{**given, **values})


def device_option(default: str | None = None, *, indexed: bool = False):
    """The ``--device`` field of a settings dataclass: cpu or cuda, None (not given) for ``resolve_device``'s rule.
    ``indexed``: any name ``resolve_device`` takes (cuda:N, auto too), for the CLIs that have always taken those."""
    if indexed:
        return option(default, type=str, metavar="DEVICE",
                      help="cpu, cuda or cuda:N; auto or None: cuda when available, else cpu")
    return option(default, choices=("cpu", "cuda"), help="None: cuda when available, else cpu")


def resolve_device(name: str | None) -> str:
    """The torch device a CLI runs on: ``cuda`` when available where none is named (None or ``auto``); a named
    ``cuda`` without a GPU, or a name torch has no device for, is a ConfigError (one line), not a traceback later."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if not (name == "cpu" or name.startswith(("cuda", "mps", "xpu"))):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return name


def quiet_hub_logging() -> None:
    """Silence the per-component loading bars and warnings of diffusers/transformers (our own bars remain)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def run_main(prog: str, body: Callable[..., object], *args) -> int:
    """Run a CLI's body: 0 when it returns; a DiffmemError becomes one line ``prog: error: …`` and exit code 2."""
    try:
        body(*args)
    except DiffmemError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def int_list(text: str) -> list[int]:
    """An option type: '1,1,0' or '16' -> [1, 1, 0] / [16]."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
