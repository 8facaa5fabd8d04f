"""Reading user text as UTF-8: BOM accepted, a bad byte is one FILE:LINE line with its byte column."""

from __future__ import annotations

import re

import pytest

from diffmem.common.errors import DiffmemError
from diffmem.common.t2i.prompts import PromptFileError, read_prompts
from diffmem.common.textfiles import iter_json_objects, read_utf8_lines, read_utf8_text


class TextError(DiffmemError):
    """The error class the readers under test are given."""


def not_utf8(path, line, byte, column):
    return re.escape(f"{path}:{line}: not UTF-8 text (byte {byte} at column {column}); re-save the file as UTF-8")


def test_latin1_cafe_names_its_line_and_byte_column(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes('{"caption": "fine"}\n{"caption": "café"}\n'.encode("latin-1"))
    # '{"caption": "caf' is 16 bytes, so the é (0xe9) is byte 17 of line 2.
    with pytest.raises(TextError, match=f"^{not_utf8(f, 2, '0xe9', 17)}$"):
        read_utf8_lines(f, TextError)
    with pytest.raises(TextError, match=f"^{not_utf8(f, 2, '0xe9', 17)}$"):
        list(iter_json_objects(f, TextError))


def test_line_breaks_are_counted_as_text_mode_counts_them(tmp_path):
    f = tmp_path / "mixed.txt"
    f.write_bytes(b"one\r\ntwo\rth\x93ree\n")  # \r\n, then a lone \r: the bad byte is on line 3
    with pytest.raises(TextError, match=f"^{not_utf8(f, 3, '0x93', 3)}$"):
        read_utf8_text(f, TextError)


def test_bom_is_dropped_and_counts_in_the_first_line_byte_column(tmp_path):
    good = tmp_path / "bom.jsonl"
    good.write_bytes(b"\xef\xbb\xbf" + '{"caption": "café"}\r\n{"caption": "b"}\n'.encode())
    assert read_utf8_lines(good, TextError) == ['{"caption": "café"}\r\n', '{"caption": "b"}\n']
    assert [obj["caption"] for _, _, obj in iter_json_objects(good, TextError)] == ["café", "b"]
    bad = tmp_path / "bom-bad.txt"
    bad.write_bytes(b"\xef\xbb\xbfab\xff")
    with pytest.raises(TextError, match=not_utf8(bad, 1, "0xff", 6)):
        read_utf8_text(bad, TextError)


def test_cp1252_csv_is_one_line_error(tmp_path):
    f = tmp_path / "webster.csv"
    f.write_bytes(";Caption;URL\n0;fine;u\n1;“smart quotes” café;u\n".encode("cp1252"))
    with pytest.raises(PromptFileError, match=f"^{not_utf8(f, 3, '0x93', 3)}$"):
        read_prompts(f)


def test_utf8_bom_csv_header_names_the_caption_column(tmp_path):
    f = tmp_path / "excel.csv"
    f.write_bytes("Caption,Index\r\n“quoted” café,3\r\n\"two\r\nlines\",4\r\n".encode("utf-8-sig"))
    recs = read_prompts(f)
    assert [r.prompt for r in recs] == ["“quoted” café", "two\r\nlines"]
    assert [r.index for r in recs] == [3, 4] and [r.line for r in recs] == [2, 3]
