"""Reading prompt sets: jsonl, ';'- or ','-separated CSV (Webster's VM/TM labels), Hugging Face datasets, and the
registry's sets by name (``set:NAME``, common.t2i.prompt_sets: shipped or fetched, SHA-256 checked).

Every file is validated completely before a model is loaded; a bad row raises PromptFileError whose message
is one line ``FILE:LINE: what was expected``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from diffmem.common.errors import DiffmemError
from diffmem.common.t2i.prompt_sets import PromptSetError, read_prompt_set, set_name
from diffmem.common.textfiles import iter_json_objects, parse_label, read_utf8_lines, surrogate_problem

CAPTION_KEYS = ("caption", "prompt", "text", "Prompt", "TEXT", "Caption")
LABEL_KEYS = ("label", "memorized")
INDEX_KEYS = ("index", "Index")
# Webster (2023): MV/RV/TV (matching, retrieval, template verbatim) are kinds of replication, N is none; VM/TM are
# Hintersdorf et al.'s spellings of verbatim and template.
MEMORIZED_TYPES = {"VM", "TM", "MV", "RV", "TV"}
UNMEMORIZED_TYPES = {"N"}


class PromptFileError(DiffmemError, ValueError):
    """A prompt source that cannot be read; str() is the one-line message for the user."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a dataset. ``row`` is its 0-based position, which seeds its latents."""

    row: int
    prompt: str
    index: int | str | None = None
    label: int | None = None
    type: str | None = None
    line: int | None = None  # 1-based line in the source file, for messages


def _parse_index(value):
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None if value == "" else value


def _make_record(row, caption, where, *, index=None, label=None, type_=None, line=None, allow_empty=False):
    if not isinstance(caption, str):
        raise PromptFileError(f"{where}: expected the caption to be a string, got {type(caption).__name__}")
    # jsonl rows are checked as they are read (common.textfiles); a 🤗 dataset's strings come here unchecked.
    problem = surrogate_problem(caption, "caption")
    if problem:
        raise PromptFileError(f"{where}: {problem}")
    if not caption.strip() and not allow_empty:
        raise PromptFileError(f"{where}: empty caption (pass --allow_empty to score the empty prompt)")
    label = parse_label(label, where, PromptFileError)
    if label is None and type_:
        label = 1 if type_ in MEMORIZED_TYPES else 0 if type_ in UNMEMORIZED_TYPES else None
    return PromptRecord(row, caption, _parse_index(index), label, type_ or None, line)


def read_jsonl(path: Path, allow_empty: bool = False) -> list[PromptRecord]:
    """Records of a jsonl file: one JSON object per line with a caption key (see CAPTION_KEYS)."""
    records = []
    for where, lineno, obj in iter_json_objects(path, PromptFileError):
        key = next((k for k in CAPTION_KEYS if k in obj), None)
        if key is None:
            raise PromptFileError(f"{where}: expected a key 'caption' (or {', '.join(CAPTION_KEYS[1:])})")
        label = next((obj[k] for k in LABEL_KEYS if k in obj), None)
        index = next((obj[k] for k in INDEX_KEYS if k in obj), None)
        records.append(_make_record(len(records), obj[key], where, index=index, label=label,
                                    type_=obj.get("type"), line=lineno, allow_empty=allow_empty))
    return records


def read_csv(path: Path, allow_empty: bool = False) -> list[PromptRecord]:
    """Records of a CSV file with a Caption column; ';' separates fields when the header has one, else ','."""
    lines = read_utf8_lines(path, PromptFileError)  # the BOM of an Excel "CSV UTF-8" export is dropped here
    delimiter = ";" if lines and ";" in lines[0] else ","
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise PromptFileError(f"{path}:1: expected a header row with a Caption column, got an empty file") from None
    col = {name: i for i, name in enumerate(header)}
    cap = next((k for k in CAPTION_KEYS if k in col), None)
    if cap is None:
        raise PromptFileError(f"{path}:1: expected a header with a 'Caption' (or caption/prompt/text) column, "
                              f"got {delimiter!r}-separated {header}")

    def get(fields, names):
        return next((fields[col[n]] for n in names if n in col), None)

    records = []
    line = reader.line_num + 1
    for fields in reader:
        where = f"{path}:{line}"
        line = reader.line_num + 1
        if not fields:
            continue
        if len(fields) != len(header):
            raise PromptFileError(f"{where}: expected {len(header)} {delimiter!r}-separated fields "
                                  f"like the header, got {len(fields)}")
        records.append(_make_record(len(records), fields[col[cap]], where, index=get(fields, INDEX_KEYS),
                                    label=get(fields, LABEL_KEYS), type_=get(fields, ("type",)),
                                    line=int(where.rsplit(":", 1)[1]), allow_empty=allow_empty))
    return records


def read_hf_dataset(name: str, split: str = "train", column: str | None = None,
                    allow_empty: bool = False) -> list[PromptRecord]:
    """Records of a Hugging Face dataset (Hub name or local folder) split, caption from ``column``."""
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (offline, missing split, bad files)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PromptFileError(f"{name}: cannot load Hugging Face dataset split {split!r} "
                              f"({type(exc).__name__}: {first})") from None
    names = ds.column_names
    col = column or next((k for k in CAPTION_KEYS if k in names), None)
    if col is None or col not in names:
        raise PromptFileError(f"{name}: expected a caption column {column or 'caption'!r}, got columns {names}")
    label_col = next((k for k in LABEL_KEYS if k in names), None)
    index_col = next((k for k in INDEX_KEYS if k in names), None)
    records = []
    for i, example in enumerate(ds):
        records.append(_make_record(i, example[col], f"{name}[{split}]:{i}", index=example.get(index_col),
                                    label=example.get(label_col), type_=example.get("type"),
                                    allow_empty=allow_empty))
    return records


def read_registry_set(name: str, allow_empty: bool = False) -> list[PromptRecord]:
    """Records of a registry set (``set:NAME``): its label, Webster's type and ground-truth index where it has
    them. A set not fetched yet is one line with the command that fetches it."""
    try:
        rows = read_prompt_set(name)
    except PromptSetError as exc:
        raise PromptFileError(str(exc)) from None
    where = f"set:{name}"
    return [_make_record(r.row, r.prompt, f"{where}:{r.line}", index=r.index, label=r.label, type_=r.type,
                         line=r.line, allow_empty=allow_empty) for r in rows]


def read_prompts(source: str | Path, *, split: str = "train", column: str | None = None,
                 allow_empty: bool = False) -> list[PromptRecord]:
    """Records from a .jsonl/.json/.csv file, a registry set ``set:NAME``, or else a Hugging Face dataset name or
    folder."""
    registry_name = set_name(str(source))
    if registry_name is not None:
        return read_registry_set(registry_name, allow_empty)
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            records = read_jsonl(path, allow_empty)
        elif suffix in (".csv", ".txt"):
            records = read_csv(path, allow_empty)
        else:
            raise PromptFileError(f"{path}: expected a .jsonl or .csv prompt file, got {suffix or 'no extension'}")
        if not records:
            raise PromptFileError(f"{path}: expected at least one prompt, found none")
        return records
    name = str(source)
    is_hub_name = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if path.is_dir() or (is_hub_name and path.suffix.lower() not in (".jsonl", ".json", ".csv", ".txt")):
        return read_hf_dataset(name, split, column, allow_empty)
    raise PromptFileError(f"{source}: no such file (expected .jsonl, .csv or a Hugging Face dataset name)")


def select_rows(records: list[PromptRecord], start: int = 0, end: int | None = None,
                default_label: int | None = None) -> list[PromptRecord]:
    """Rows [start, end) of a dataset, with default_label filled in where a row has none."""
    chosen = records[start:end]
    if default_label is None:
        return chosen
    return [r if r.label is not None else PromptRecord(r.row, r.prompt, r.index, default_label, r.type, r.line)
            for r in chosen]
