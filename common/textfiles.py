"""Reading user text files as UTF-8 (a byte-order mark accepted) with a one-line error at the first bad byte.

The error reads ``FILE:LINE: not UTF-8 text (byte 0xNN at column N); re-save the file as UTF-8``: LINE and
column are 1-based, the column counts bytes of the raw line (a BOM counts on line 1), as a hex view shows them.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

BOM = "\ufeff"
# A code point U+D800..U+DFFF in a str is half of a UTF-16 pair with no other half: JSON's "\ud800" escape gives
# one (json.loads joins a complete pair into one code point), as does a bad byte in a command-line argument. It is no
# Unicode text: it cannot be encoded as UTF-8, so a tokenizer or a results file fails on it far from its source.
_SURROGATE = re.compile("[\ud800-\udfff]")


def read_utf8_text(path: str | Path, error: type[Exception]) -> str:
    """The text of a UTF-8 file without its BOM; the first bad byte raises error (message: module docstring)."""
    data = Path(path).read_bytes()
    try:
        # Plain utf-8, not utf-8-sig: error offsets then index the raw bytes, BOM included.
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start]
        # Line breaks as text mode counts them: \n, \r\n and a lone \r.
        line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        column = exc.start - max(before.rfind(b"\n"), before.rfind(b"\r"))
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); "
                    f"re-save the file as UTF-8") from None
    return text[1:] if text.startswith(BOM) else text


def read_utf8_lines(path: str | Path, error: type[Exception]) -> list[str]:
    """Lines of a UTF-8 file (see read_utf8_text), endings kept, split at \\n, \\r\\n or a lone \\r."""
    # Untranslated endings, as open(newline="") gives them, let the csv module read quoted line breaks.
    return io.StringIO(read_utf8_text(path, error), newline="").readlines()


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate of ``text`` as its escape (``\\ud800``), or None when it is valid Unicode text."""
    m = _SURROGATE.search(text)
    return None if m is None else f"\\u{ord(m.group()):04x}"


def surrogate_problem(text: str, what: str) -> str | None:
    """``WHAT holds a lone surrogate \\ud800 (…); expected UTF-8 text`` when ``text`` has one, else None."""
    found = lone_surrogate(text)
    if found is None:
        return None
    return f"{what} holds a lone surrogate {found} (not valid Unicode text); expected UTF-8 text"

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
