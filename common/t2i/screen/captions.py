"""Reading a training-caption set at scale, normalising and deduplicating it.

Sources: parquet (Webster 2023's ``most_duplicated_metadata.parquet`` and ``membership_attack_top30k.parquet``:
a ``caption`` column and a ``url`` column), jsonl, csv (``,`` or ``;``), txt (one caption per line) and Hugging Face
datasets (a Hub name or a local dataset folder, read in streaming mode). Every reader streams: parquet in row
groups of ``batch_rows``, text files line by line, datasets example by example; so a caption exists as a Python
object only while it passes through. A bad row (not a string, empty, a lone surrogate, a line that is not JSON)
is one line ``FILE:ROW: what was expected``; with ``skip_bad`` it is reported to a callback and skipped.

Normalisation (:func:`normalize_caption`): Unicode NFKC, case-folded, every run of whitespace one space, stripped.
Captions equal after it are one unique caption, scored once. Its latent seed (:func:`caption_seed`) is the first 8
bytes of the SHA-256 of the normalised caption's UTF-8, big-endian, shifted right by 2 (62 bits), so a score depends
on the text and the settings only, never on the order, the sharding or the batch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from diffmem.common.errors import DiffmemError
from diffmem.common.results import file_sha256
from diffmem.common.textfiles import surrogate_problem

CAPTION_COLUMNS = ("caption", "prompt", "text", "TEXT", "Caption", "Prompt")
URL_COLUMNS = ("url", "URL")
FILE_FORMATS = (".parquet", ".jsonl", ".csv", ".txt")
SEED_BITS = 62  # gen_seed + caption seed stays below 2**63, inside torch.Generator.manual_seed's range
KEEP_ROWS = 16  # source rows listed per unique caption; the count is always exact


class CaptionFileError(DiffmemError, ValueError):
    """A caption source that cannot be read; str() is the one-line message."""


@dataclass(frozen=True, slots=True)
class CaptionRow:
    """One row of a caption source: its 0-based position, the caption as given and its url (if a column has one)."""

    row: int
    caption: str
    url: str | None = None


def normalize_caption(text: str) -> str:
    """NFKC, case-folded, whitespace runs collapsed to one space, stripped: the key captions are deduplicated by."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def caption_digest(normalized: str) -> bytes:
    """SHA-256 of a normalised caption's UTF-8 bytes."""
    return hashlib.sha256(normalized.encode("utf-8")).digest()


def caption_seed(normalized: str) -> int:
    """The caption's latent seed: SHA-256's first 8 bytes (big-endian) >> 2, a 62-bit integer."""
    return int.from_bytes(caption_digest(normalized)[:8], "big") >> (64 - SEED_BITS)


class _Bad(str):
    """A row a reader found to be no caption (not JSON, wrong field count), carrying the reason."""


def caption_problem(caption) -> str | None:
    """Why a value cannot be a caption (None: it can)."""
    if isinstance(caption, _Bad):
        return str(caption)
    if not isinstance(caption, str):
        return f"expected the caption to be a string, got {'null' if caption is None else type(caption).__name__}"
    problem = surrogate_problem(caption, "caption")
    if problem:
        return problem
    if not caption.strip():
        return "empty caption"
    return None


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], where: str, what: str,
          required: bool = True) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise CaptionFileError(f"{where}: no {what} column {wanted!r}; columns: {', '.join(columns)}")
        return wanted
    found = next((c for c in defaults if c in columns), None)
    if found is None and required:
        raise CaptionFileError(f"{where}: no {what} column (expected one of {', '.join(defaults)}, or pass "
                               f"--column); columns: {', '.join(columns)}")
    return found


class CaptionSource:
    """A caption set to stream: a file (by suffix) or a Hugging Face dataset; ``rows()`` yields CaptionRow."""

    def __init__(self, source: str | Path, *, column: str | None = None, url_column: str | None = None,
                 split: str = "train", batch_rows: int = 65536):
        self.source, self.column, self.url_column = str(source), column, url_column
        self.split, self.batch_rows = split, batch_rows
        path = Path(source).expanduser()
        self.path = path if path.is_file() else None
        if self.path is not None:
            self.kind = self.path.suffix.lower()
            if self.kind not in FILE_FORMATS:
                raise CaptionFileError(f"{path}: expected a {', '.join(FILE_FORMATS)} caption file or a Hugging "
                                       f"Face dataset, got {self.kind or 'no extension'}")
        elif path.is_dir() or (self.source.count("/") == 1 and not self.source.startswith((".", "/", "~"))
                               and path.suffix.lower() not in FILE_FORMATS):
            self.kind = "dataset"
        else:
            raise CaptionFileError(f"{source}: no such file (expected {', '.join(FILE_FORMATS)} or a Hugging Face "
                                   f"dataset name)")

    def identity(self) -> dict:
        """What binds a run to this source: the file's SHA-256 (a moved file still resumes), or the dataset's name."""
        where = {"sha256": file_sha256(self.path)} if self.path is not None else {"dataset": self.source,
                                                                                  "split": self.split}
        return {**where, "column": self.column, "url_column": self.url_column}

    def rows(self, skip_bad: bool = False, on_skip: Callable[[str, str], None] | None = None) -> Iterator[CaptionRow]:
        """Every row in source order; a bad row raises CaptionFileError, or with skip_bad goes to on_skip(where,
        reason) and is left out (its row number is not reused)."""
        reader = {".parquet": self._parquet, ".jsonl": self._jsonl, ".csv": self._csv, ".txt": self._txt,
                  "dataset": self._dataset}[self.kind]
        for row, where, caption, url in reader():
            problem = caption_problem(caption)
            if problem is None and url is not None and not isinstance(url, str):
                url = str(url)
            if problem is not None:
                if not skip_bad:
                    raise CaptionFileError(f"{where}: {problem} (pass --skip_bad_rows to leave such rows out)")
                if on_skip is not None:
                    on_skip(where, problem)
                continue
            yield CaptionRow(row, caption, url)

    # Each reader yields (row, where, caption value, url value) with where = "FILE:LINE" or "FILE:row N".

    def _parquet(self):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
            raise CaptionFileError(f"{self.path}: not a readable parquet file ({type(exc).__name__}: "
                                   f"{(str(exc).splitlines() or [''])[0][:160]})") from None
        names = pf.schema_arrow.names
        col = _pick(names, self.column, CAPTION_COLUMNS, str(self.path), "caption")
        url = _pick(names, self.url_column, URL_COLUMNS, str(self.path), "url", required=self.url_column is not None)
        columns = [col] + ([url] if url else [])
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=self.batch_rows, columns=columns):
                captions = batch.column(0).to_pylist()
                urls = batch.column(1).to_pylist() if url else [None] * len(captions)
                for caption, u in zip(captions, urls):
                    yield row, f"{self.path}:row {row}", caption, u
                    row += 1
        except CaptionFileError:
            raise
        except Exception as exc:  # a corrupt row group is found only when it is read
            raise CaptionFileError(f"{self.path}: unreadable after row {row} ({type(exc).__name__}: "
                                   f"{(str(exc).splitlines() or [''])[0][:160]})") from None

    def _lines(self):
        """(line number, text) of the file, decoded as UTF-8 line by line; a bad byte names its line."""
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise CaptionFileError(f"{self.path}:{lineno}: not UTF-8 text (byte {exc.start})") from None
                if lineno == 1:
                    text = text.removeprefix("\ufeff")
                yield lineno, text.rstrip("\r\n")

    def _jsonl(self):
        row = 0
        for lineno, text in self._lines():
            if not text.strip():
                continue
            where = f"{self.path}:{lineno}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield row, where, _Bad(f"expected a JSON object, got invalid JSON ({exc.msg})"), None
                row += 1
                continue
            if not isinstance(obj, dict):
                yield row, where, _Bad(f"expected a JSON object, got {type(obj).__name__}"), None
                row += 1
                continue
            if row == 0 or self.column is not None:
                key = _pick(list(obj), self.column, CAPTION_COLUMNS, where, "caption", required=False)
            else:
                key = next((k for k in CAPTION_COLUMNS if k in obj), None)
            if key is None:
                yield row, where, _Bad(f"expected a key {self.column or 'caption'!r}"), None
            else:
                url_key = self.url_column or next((k for k in URL_COLUMNS if k in obj), None)
                yield row, where, obj[key], obj.get(url_key) if url_key else None
            row += 1

    def _csv(self):
        lines = self._lines()
        first = next(lines, None)
        if first is None:
            return
        delimiter = ";" if ";" in first[1] else ","
        header = next(csv.reader([first[1]], delimiter=delimiter))
        col = _pick(header, self.column, CAPTION_COLUMNS, f"{self.path}:1", "caption")
        url = _pick(header, self.url_column, URL_COLUMNS, f"{self.path}:1", "url",
                    required=self.url_column is not None)
        ci, ui = header.index(col), header.index(url) if url else None
        row = 0
        for lineno, text in lines:
            if not text.strip():
                continue
            where = f"{self.path}:{lineno}"
            try:
                fields = next(csv.reader(io.StringIO(text), delimiter=delimiter))
            except csv.Error as exc:
                yield row, where, _Bad(f"unreadable CSV line ({exc})"), None
            else:
                if len(fields) != len(header):
                    yield row, where, _Bad(f"expected {len(header)} {delimiter!r}-separated fields like the header, "
                                           f"got {len(fields)}"), None
                else:
                    yield row, where, fields[ci], (fields[ui] or None) if ui is not None else None
            row += 1

    def _txt(self):
        for row, (lineno, text) in enumerate(self._lines()):
            yield row, f"{self.path}:{lineno}", text, None

    def _dataset(self):
        try:
            import datasets

            ds = datasets.load_dataset(self.source, split=self.split, streaming=True)
            names = list(ds.column_names or next(iter(ds)).keys())
        except Exception as exc:  # datasets raises many types (offline, missing split, bad files)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise CaptionFileError(f"{self.source}: cannot load Hugging Face dataset split {self.split!r} "
                                   f"({type(exc).__name__}: {first[:160]})") from None
        col = _pick(names, self.column, CAPTION_COLUMNS, self.source, "caption")
        url = _pick(names, self.url_column, URL_COLUMNS, self.source, "url", required=self.url_column is not None)
        for row, example in enumerate(ds):
            yield row, f"{self.source}[{self.split}]:row {row}", example[col], example.get(url) if url else None


@dataclass(slots=True)
class UniqueCaption:
    """One normalised caption: its first spelling, how many source rows carry it and (the first KEEP_ROWS of) which."""

    id: int  # order of first appearance
    caption: str
    count: int = 1
    rows: list[int] = field(default_factory=list)
    url: str | None = None

    def record(self) -> dict:
        """The row of captions.jsonl."""
        row = {"id": self.id, "caption": self.caption, "count": self.count, "rows": self.rows,
               "rows_complete": self.count <= len(self.rows)}
        if self.url is not None:
            row["url"] = self.url
        return row


def deduplicate(rows: Iterable[CaptionRow], keep_rows: int = KEEP_ROWS) -> tuple[list[UniqueCaption], int]:
    """Unique captions in order of first appearance and the number of rows read.

    The table is keyed by the normalised caption's 16-byte digest rather than the string itself, so a caption
    is held once, as its first spelling (the normalised form is recomputed where needed).
    """
    table: dict[bytes, UniqueCaption] = {}
    n = 0
    for r in rows:
        n += 1
        key = caption_digest(normalize_caption(r.caption))[:16]
        u = table.get(key)
        if u is None:
            table[key] = UniqueCaption(len(table), r.caption, 1, [r.row], r.url)
        else:
            u.count += 1
            if len(u.rows) < keep_rows:
                u.rows.append(r.row)
            if u.url is None and r.url is not None:
                u.url = r.url
    return list(table.values()), n


def read_unique(path: str | Path, wanted: Callable[[int], bool] | None = None) -> Iterator[dict]:
    """Rows of a captions.jsonl written by a prepare stage, streamed; only ids wanted(id) when given."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a torn last line: the prepare stage had not finished (its marker says so)
            row = json.loads(line)
            if wanted is None or wanted(row["id"]):
                yield row
