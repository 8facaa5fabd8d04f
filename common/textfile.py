"""Reading user text files as UTF-8 (a byte-order mark accepted) with a one-line error at the first bad byte.

The error reads ``FILE:LINE: not UTF-8 text (byte 0xNN at column N); re-save the file as UTF-8``: LINE and
column are 1-based, the column counts bytes of the raw line (a BOM counts on line 1), as a hex view shows them.
"""

from __future__ import annotations

import io
import re
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
