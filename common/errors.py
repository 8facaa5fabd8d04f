"""Errors whose message is one line meant for the user; CLIs print it and exit with code 2."""


class DiffmemError(Exception):
    """Base of user-facing errors: bad input files, unloadable models, inconsistent settings."""


class ConfigError(DiffmemError, ValueError):
    """Command-line settings that contradict each other or earlier results."""
