"""Command-line plumbing shared by every diffmem CLI."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from diffmem.common.errors import ConfigError, DiffmemError
from diffmem.common.settings import extended_float, finite_float


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help; a required option says "(required)" instead of "(default: None)"."""

    def _get_help_string(self, action):
        if action.required and action.option_strings:
            return f"{action.help or ''} (required)".strip()
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (plus exit code 2) instead of the usage block, and whose
    ``--help`` shows every option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def add_settings_groups(parser, groups, exclude=()) -> None:
    """add_settings_arguments for each (title or None, settings dataclass, fields to leave out) of ``groups``: a
    titled one in an argument group of its own."""
    for title, settings_class, leave_out in groups:
        target = parser.add_argument_group(title) if title else parser
        add_settings_arguments(target, settings_class, exclude=(*exclude, *leave_out))


def settings_from_args(settings_class, namespace: argparse.Namespace, **values):
    """The settings dataclass filled from the parsed options of its fields (``values`` take precedence)."""
    given = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(settings_class)
             if hasattr(namespace, f.name)}
    return settings_class(**{**given, **values})


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
