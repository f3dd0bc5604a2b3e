"""Reads the recipients of `blastd enqueue FILE` from .xlsx, .csv or .json, one row at a time.

Every reader streams: openpyxl's read-only mode yields rows without building the sheet, csv
reads line by line, and a JSON array is decoded element by element from 64 KiB chunks (the
standard library has no streaming JSON reader; json.JSONDecoder.raw_decode decodes one element
at a position, which is all a top-level array needs). A 1M-row file is never held in memory.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from datetime import date, time
from pathlib import Path
from typing import TextIO

import openpyxl
from openpyxl.utils.exceptions import InvalidFileException

from blastd.errors import SourceError

PHONE_COLUMNS = ("phone", "to", "number", "msisdn", "whatsapp", "wa_number", "nomor", "no_hp", "hp")
CSV_DELIMITERS = (",", ";", "\t")  # spreadsheets in comma-decimal locales export ';'
JSON_CHUNK_CHARS = 65_536
MAX_JSON_ELEMENT_CHARS = 1_048_576  # one recipient object; beyond this the file is malformed

Row = dict[str, object]
_NON_SPACE = re.compile(r"[^ \t\r\n]")
_COLUMN_SEPARATORS = re.compile(r"[\s\-]+")


def read_recipients(path: Path) -> Iterator[Row]:
    """Yield {"to": str, "vars": {column: str}} per recipient in an .xlsx, .csv or .json file.

    Raises SourceError naming the file: at once for an unsupported type, else when the
    iteration reaches the problem (a missing phone column is found on the first row).
    """
    readers: dict[str, Callable[[Path], Iterator[Row]]] = {
        ".xlsx": _read_xlsx,
        ".csv": _read_csv,
        ".json": _read_json,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise SourceError(
            f"{path}: unsupported file type {path.suffix!r}; use .xlsx, .csv or .json"
        )
    return reader(path)


def _read_xlsx(path: Path) -> Iterator[Row]:
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError) as exc:
        raise SourceError(f"{path}: not a readable .xlsx file ({type(exc).__name__})") from None
    # Read-only mode keeps the file open until both the row reader and the workbook are closed.
    try:
        with contextlib.closing(workbook.active.iter_rows(values_only=True)) as rows:
            yield from _rows_with_header(path, rows)
    finally:
        workbook.close()


def _read_csv(path: Path) -> Iterator[Row]:
    with path.open(newline="", encoding="utf-8-sig") as file:
        try:
            header_line = file.readline()
            delimiter = max(CSV_DELIMITERS, key=header_line.count)
            rows = csv.reader(itertools.chain([header_line], file), delimiter=delimiter)
            yield from _rows_with_header(path, rows)
        except UnicodeDecodeError:
            raise SourceError(f"{path}: not UTF-8 text") from None
        except csv.Error as exc:
            raise SourceError(f"{path}: unreadable CSV: {exc}") from None


def _rows_with_header(path: Path, rows: Iterator[Sequence[object]]) -> Iterator[Row]:
    """The first row names the columns; one of them is the phone column, the rest are vars."""
    header = next(rows, None)
    if header is None:
        raise SourceError(f"{path}: the file is empty; expected a header row")
    names = [_cell_text(cell) for cell in header]
    keys = [_COLUMN_SEPARATORS.sub("_", name.lower()) for name in names]
    phone = next((index for index, key in enumerate(keys) if key in PHONE_COLUMNS), None)
    if phone is None:
        expected = ", ".join(PHONE_COLUMNS)
        raise SourceError(f"{path}: no phone column in the header; name one of: {expected}")
    # Variables take the normalised column name ('First Name' -> {first_name}), so a
    # placeholder does not depend on how a spreadsheet happened to capitalise its header.
    var_columns = [
        (index, keys[index]) for index, name in enumerate(names) if name and index != phone
    ]
    for cells in rows:
        texts = [_cell_text(cell) for cell in cells]
        if any(texts):  # read-only sheets often end in blank rows
            yield _row(texts, phone, var_columns)


def _row(texts: list[str], phone: int, var_columns: list[tuple[int, str]]) -> Row:
    """Empty cells are left out of vars, so a message using them is skipped, not sent half."""
    to = texts[phone] if phone < len(texts) else ""
    values = {name: texts[i] for i, name in var_columns if i < len(texts) and texts[i]}
    return {"to": to, "vars": values}


def _cell_text(value: object) -> str:
    """Excel keeps numbers as floats: 6281234567890.0 is the number 6281234567890."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, date | time):
        return value.isoformat()
    return str(value).strip()


def _read_json(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig") as file:
        try:
            for index, element in enumerate(_JsonArrayStream(file).items()):
                yield _json_recipient(path, index, element)
        except UnicodeDecodeError:
            raise SourceError(f"{path}: not UTF-8 text") from None
        except ValueError as exc:
            raise SourceError(f"{path}: {exc}") from None


def _json_recipient(path: Path, index: int, element: object) -> Row:
    if _is_phone(element):
        return {"to": str(element), "vars": {}}
    if isinstance(element, dict) and _is_phone(to := element.get("to")):
        values = element.get("vars", {})
        if isinstance(values, dict) and all(_is_scalar(value) for value in values.values()):
            return {"to": str(to), "vars": {str(k): _cell_text(v) for k, v in values.items()}}
    raise SourceError(
        f"{path}: element {index}: expected a number string or "
        '{"to": "...", "vars": {name: string or number}}'
    )


def _is_phone(value: object) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


class _JsonArrayStream:
    """Decodes a top-level JSON array element by element, holding one chunk at a time."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._decoder = json.JSONDecoder()
        self._buffer = ""
        self._pos = 0
        self._at_eof = False

    def items(self) -> Iterator[object]:
        if self._peek() != "[":
            raise ValueError("expected a JSON array of recipients")
        self._pos += 1
        if self._peek() == "]":
            return
        while True:
            yield self._value()
            separator = self._peek()
            self._pos += 1
            if separator == "]":
                return
            if separator != ",":
                raise ValueError(f"invalid JSON: expected ',' or ']' near character {self._pos}")

    def _peek(self) -> str:
        """The next non-space character, reading on as needed; '' at the end of the file."""
        while True:
            found = _NON_SPACE.search(self._buffer, self._pos)
            self._pos = found.start() if found else len(self._buffer)
            if self._pos < len(self._buffer) or not self._read_more():
                return self._buffer[self._pos : self._pos + 1]

    def _value(self) -> object:
        self._peek()  # raw_decode does not skip leading whitespace
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buffer, self._pos)
            except json.JSONDecodeError as exc:  # maybe cut by the chunk's end: read on
                if len(self._buffer) - self._pos > MAX_JSON_ELEMENT_CHARS:
                    raise ValueError("invalid JSON: an element is malformed or too large") from None
                if not self._read_more():
                    raise ValueError(f"invalid JSON: {exc.msg}") from None
                continue
            # A number at the chunk's end may go on in the next chunk: decode it again.
            if end < len(self._buffer) or not self._read_more():
                self._pos = end
                return value

    def _read_more(self) -> bool:
        if self._at_eof:
            return False
        chunk = self._file.read(JSON_CHUNK_CHARS)
        self._at_eof = not chunk
        self._buffer = self._buffer[self._pos :] + chunk
        self._pos = 0
        return bool(chunk)
