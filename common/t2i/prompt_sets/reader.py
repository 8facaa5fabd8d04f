"""Reading a registry set's file into typed rows: the prompt, the set's label, Webster's type and the ground-truth
index where the set has them, each row with its line for messages.

The registry says how each file reads (``jsonl`` key, ``csv`` column and delimiter, or ``lines``: one prompt per
line), so a set reads the same whatever its source called its columns. ``common.t2i.prompts.read_prompts`` turns
these rows into the harness's PromptRecords (``--data set:NAME``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from diffmem.common.t2i.prompt_sets.registry import SET_PREFIX, PromptSet
from diffmem.common.t2i.prompt_sets.store import PromptSetError, get_set, locate
from diffmem.common.textfiles import iter_json_objects, read_utf8_lines


@dataclass(frozen=True)
class SetRow:
    """One prompt of a set: ``row`` its 0-based position, ``label`` the set's class (1 memorized, 0 not), ``type``
    Webster's replication type (VM/TM/MV/TV/RV) and ``index`` the ground-truth index where the set has them."""

    row: int
    prompt: str
    label: int
    line: int
    type: str | None = None
    index: int | str | None = None


def _index(value):
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None if value in ("", None) else value


def _jsonl_rows(ps: PromptSet, path: Path) -> list[SetRow]:
    rows = []
    for where, lineno, obj in iter_json_objects(path, PromptSetError):
        if ps.caption_column not in obj:
            raise PromptSetError(f"{where}: expected a key {ps.caption_column!r} ({SET_PREFIX}{ps.name})")
        rows.append(SetRow(len(rows), obj[ps.caption_column], ps.label, lineno,
                           obj.get(ps.type_column) if ps.type_column else None,
                           _index(obj.get(ps.index_column)) if ps.index_column else None))
    return rows


def _csv_rows(ps: PromptSet, path: Path) -> list[SetRow]:
    reader = csv.reader(read_utf8_lines(path, PromptSetError), delimiter=ps.delimiter)
    header = next(reader, None) or []
    col = {name: i for i, name in enumerate(header)}
    for needed in (ps.caption_column, ps.type_column, ps.index_column):
        if needed is not None and needed not in col:
            raise PromptSetError(f"{path}:1: expected a column {needed!r} ({SET_PREFIX}{ps.name}), got {header}")
    rows = []
    line = reader.line_num + 1
    for fields in reader:
        lineno, line = line, reader.line_num + 1
        if not fields:
            continue
        if len(fields) != len(header):
            raise PromptSetError(f"{path}:{lineno}: expected {len(header)} {ps.delimiter!r}-separated fields like "
                                 f"the header, got {len(fields)}")
        rows.append(SetRow(len(rows), fields[col[ps.caption_column]], ps.label, lineno,
                           fields[col[ps.type_column]] or None if ps.type_column else None,
                           _index(fields[col[ps.index_column]]) if ps.index_column else None))
    return rows


def _line_rows(ps: PromptSet, path: Path) -> list[SetRow]:
    rows = []
    for lineno, text in enumerate(read_utf8_lines(path, PromptSetError), start=1):
        prompt = text.rstrip("\r\n")
        if prompt.strip():
            rows.append(SetRow(len(rows), prompt, ps.label, lineno))
    return rows


READERS = {"jsonl": _jsonl_rows, "csv": _csv_rows, "lines": _line_rows}


def read_set_file(ps: PromptSet, path: str | Path) -> list[SetRow]:
    """The rows of a file in the set's format (the file's hash is the caller's business)."""
    rows = READERS[ps.format](ps, Path(path))
    if not rows:
        raise PromptSetError(f"{path}: expected the prompts of {SET_PREFIX}{ps.name}, found none")
    return rows


def read_prompt_set(name: str | PromptSet, cache: str | Path | None = None) -> list[SetRow]:
    """The rows of a registry set (``NAME`` or ``set:NAME``), from its shipped or fetched file, hash checked."""
    ps = name if isinstance(name, PromptSet) else get_set(name)
    return read_set_file(ps, locate(ps, cache))
