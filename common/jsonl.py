"""Reading hand-made or generated jsonl files with one-line ``FILE:LINE: what was expected`` errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from diffmem.common.textfile import read_utf8_lines, surrogate_problem


def _surrogate_in(value, field: str) -> str | None:
    """The problem of the first string in a parsed JSON value (keys too) with a lone surrogate, else None."""
    if isinstance(value, str):
        return surrogate_problem(value, field)
    if isinstance(value, dict):
        for key, item in value.items():
            name = key if not field else f"{field}.{key}"
            problem = surrogate_problem(key, f"a key of {field}" if field else "a key") or _surrogate_in(item, name)
            if problem:
                return problem
    if isinstance(value, list):
        for i, item in enumerate(value):
            problem = _surrogate_in(item, f"{field}[{i}]")
            if problem:
                return problem
    return None


def iter_json_objects(path: str | Path, error: type[Exception]) -> Iterator[tuple[str, int, dict]]:
    """(``FILE:LINE``, line number, object) for each non-blank line; a non-object line or bad byte raises error."""
    # Decoding the whole file first reports a bad byte before any row is used.
    for lineno, text in enumerate(read_utf8_lines(path, error), start=1):
        if not text.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: expected a JSON object, got invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
        # A "\ud800" escape parses to a str no UTF-8 writer or tokenizer takes: refuse it here, at its line.
        problem = _surrogate_in(obj, "")
        if problem:
            raise error(f"{where}: {problem}")
        yield where, lineno, obj


def parse_label(value, where: str, error: type[Exception]) -> int | None:
    """A 0/1 label from 0/1, true/false (bools or strings); None when absent; anything else raises error."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return int(value.strip().lower() in ("1", "true"))
    raise error(f"{where}: expected label 0/1 (or true/false), got {value!r}")
