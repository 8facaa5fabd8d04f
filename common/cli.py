"""Command-line plumbing shared by every diffmem CLI."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from common.errors import DiffmemError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (plus exit code 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_settings_arguments(parser: argparse.ArgumentParser, settings_class) -> None:
    """One ``--FIELD`` option per field of a settings dataclass, with the dataclass's default and the help (and,
    for an optional field, the type) from the field's metadata, so defaults are written once."""
    import dataclasses

    for f in dataclasses.fields(settings_class):
        default = f.default
        kind = f.metadata.get("type", type(default))
        parser.add_argument(f"--{f.name}", type=kind, default=default, choices=f.metadata.get("choices"),
                            help=f.metadata.get("help"))


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
