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
