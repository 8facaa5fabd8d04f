"""Crash-safe jsonl results: append whole lines per batch, cut a torn tail on resume, merge process parts.

A job killed mid-write leaves at most one incomplete last line. Readers ignore it; the process that owns
the file cuts it off before appending again, so a resumed run never produces a torn or duplicated row.
A resumable run records the settings its results depend on (:func:`bind_run_settings`) and refuses to
resume them with other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from diffmem.common.errors import ConfigError, DiffmemError


class ResultsFileError(DiffmemError, ValueError):
    """A results file that is corrupt beyond a torn last line; str() is a one-line message."""


def read_results(path: str | Path, repair: bool = False,
                 hint: str = "remove the line or rerun with --overwrite") -> list[dict]:
    """Complete rows of a jsonl results file ([] if absent); with repair, truncate a torn last line. A corrupt
    complete line raises ResultsFileError; hint says what to do about it."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # bytes after the last newline belong to an interrupted write
    rows = []
    for lineno, line in enumerate(data[:complete].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ResultsFileError(f"{path}:{lineno}: corrupt result line (not JSON); {hint}") from None
    if repair and complete < len(data):
        with open(path, "r+b") as f:
            f.truncate(complete)
    return rows


def append_results(path: str | Path, rows: list[dict]) -> None:
    """Append rows as jsonl lines in one write, flushed and fsynced so a kill cannot lose them."""
    if not rows:
        return
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | Path, obj, jsonl: bool = False) -> None:
    """Write JSON (or a list of rows as jsonl) to a temporary file, then rename it over path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if jsonl:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in obj)
        else:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def merge_rows(row_lists: list[list[dict]], key: str = "row", keep: set | None = None) -> list[dict]:
    """One row per key, sorted by key; the first occurrence wins; restricted to keys in keep if given."""
    merged: dict = {}
    for rows in row_lists:
        for r in rows:
            k = r[key]
            if (keep is None or k in keep) and k not in merged:
                merged[k] = r
    return [merged[k] for k in sorted(merged)]


class _NotRecorded:
    """A setting that a run's config predates (it was written before the setting was bound)."""

    def __repr__(self) -> str:
        return "<not recorded>"

    __str__ = __repr__


NOT_RECORDED = _NotRecorded()


def digest_rows(rows) -> str:
    """SHA-256 of rows (JSON-able dicts) in order: a dataset's identity, whatever file or folder holds it."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def check_rows_match(path: str | Path, done: list[dict], expected: dict[int, dict], retry_hint: str) -> None:
    """Raise ConfigError when a stored result row holds other values (its prompt, its label) than the dataset
    row it is matched to by position: a resume on another dataset would keep the old rows under the new labels.

    expected maps a row number to the fields its stored row must repeat (None: the row carries no such field).
    """
    for r in done:
        want = expected.get(r.get("row"))
        if want is None:
            continue
        for key, value in want.items():
            if r.get(key) != value:
                got = str(r.get(key))[:40]
                raise ConfigError(f"{path}: row {r['row']} holds another {key} ({got!r}; the dataset's is "
                                  f"{str(value)[:40]!r}); pass --overwrite or {retry_hint}")


def check_run_settings(config_file: str | Path, settings: dict, results_exist: bool, retry_hint: str,
                       overwrite_flag: str | None = "--overwrite") -> None:
    """Raise ConfigError when results exist and config_file records settings other than these.

    Settings bind a run only once it has results on disk: a config left by a run that failed before its
    first row (a mistyped model id, a first batch out of memory) describes no result, so it cannot refuse
    the corrected command. retry_hint names the other way out besides overwrite_flag (e.g. "another --out");
    a CLI without such a flag (training: a run's checkpoints are not thrown away) passes None.
    """
    config_file = Path(config_file)
    if not results_exist or not config_file.exists():
        return
    old = json.loads(config_file.read_text())
    diff = {k: (old.get(k, NOT_RECORDED), settings.get(k)) for k in {**old, **settings}
            if old.get(k, NOT_RECORDED) != settings.get(k)}
    if diff:
        what = ", ".join(f"{k}={a if a is NOT_RECORDED else repr(a)} (now {b!r})" for k, (a, b) in diff.items())
        way_out = f"pass {overwrite_flag} or {retry_hint}" if overwrite_flag else retry_hint
        raise ConfigError(f"{config_file}: earlier results of this run used {what}; {way_out}")


def bind_run_settings(config_file: str | Path, settings: dict, results_exist: bool, retry_hint: str,
                      overwrite_flag: str | None = "--overwrite") -> None:
    """Check settings against the results on disk (:func:`check_run_settings`), then record them unless
    earlier results already did; a config without results is replaced."""
    check_run_settings(config_file, settings, results_exist, retry_hint, overwrite_flag)
    if not (results_exist and Path(config_file).exists()):
        write_json_atomic(config_file, settings)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes: a data file or model's identity, whatever path or spec named it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def jsonable(value):
    """value as it reads back from JSON (tuples become lists, numpy scalars numbers, other objects their str), so
    a recorded setting compares equal to a new one."""
    def default(obj):
        item = getattr(obj, "item", None)  # numpy scalars (and 0-d arrays) without importing numpy
        return item() if callable(item) and getattr(obj, "shape", None) == () else str(obj)

    return json.loads(json.dumps(value, default=default))
