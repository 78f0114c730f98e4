"""Read file drops (CSV, JSON Lines, Parquet) into frames of strings with file and line.

Every value comes back as a string so the contract checks see exactly what the source
sent: leading zeros stay, and nothing is parsed twice. A line that cannot be read at
all (broken JSON, a CSV row with the wrong number of fields, a NUL character) becomes a
quarantine row instead of stopping the load. A file that cannot be read at all
(an unknown or mixed encoding, a broken CSV header) raises `InputFileError`.

CSV and JSON Lines files are read line by line with at most `MAX_LINE_BYTES` per line,
so one huge line never has to fit in memory.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import pandas as pd

SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")
FILE = "_file"
LINE = "_line"
# The maximum length in bytes of a JSON Lines line and of a CSV line or field. A longer
# JSON line is quarantined and skipped without being read into memory. A longer CSV line
# rejects the file, because where its record ends cannot be trusted.
MAX_LINE_BYTES = 1024 * 1024
# Bytes read at a time while skipping the rest of an over-long line.
_SKIP_CHUNK_BYTES = 64 * 1024
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


class InputFileError(ValueError):
    """A whole file cannot be read; the message names the file and what to do."""


def list_files(folder: Path) -> list[Path]:
    """Return the readable input files under `folder`, recursively, in name order."""
    if not folder.is_dir():
        return []
    files = [path for path in folder.rglob("*") if path.suffix.lower() in SUFFIXES]
    return sorted(path for path in files if path.is_file())


def read_files(paths: Iterable[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every file; return (rows as strings, unreadable lines with a reason)."""
    frames, broken = [], []
    for path in paths:
        frame, bad = read_file(path)
        frames.append(frame)
        broken.append(bad)
    rows = pd.concat(frames, ignore_index=True) if frames else _empty_rows()
    bad_lines = pd.concat(broken, ignore_index=True) if broken else _empty_bad()
    return rows.fillna(""), bad_lines


def read_file(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read one file; return (rows as strings, unreadable lines with a reason).

    An empty file (0 bytes, or a CSV header alone) gives no rows and no error.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputFileError(f"{path}: unsupported file type; use .csv, .jsonl or .parquet")
    if path.stat().st_size == 0:
        return _empty_rows(), _empty_bad()
    if suffix == ".parquet":
        return _read_parquet(path)
    with path.open("rb") as handle:
        lines = _DecodedLines(path, handle)
        if suffix == ".csv":
            return _read_csv(path, lines)
        return _read_json_lines(path, lines)


class _DecodedLines:
    """Iterates over (line number, byte offset, text) of a file, one line at a time.

    The text keeps its line ending. It is None for a line longer than `MAX_LINE_BYTES`,
    whose rest is skipped in chunks. A file is UTF-8 (a BOM is dropped) or CP932, as
    Japanese shop systems export. The first line that is not ASCII decides the encoding,
    and a later line in the other encoding raises `InputFileError` with its byte offset.
    """

    def __init__(self, path: Path, handle: BinaryIO):
        self.path = path
        self.handle = handle
        self.encoding: str | None = None
        self.last_line = 0

    def __iter__(self) -> Iterator[tuple[int, int, str | None]]:
        offset = 0
        number = 0
        while True:
            data = self.handle.readline(MAX_LINE_BYTES + 1)
            if not data:
                return
            number += 1
            self.last_line = number
            start = offset
            offset += len(data)
            if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
                offset += self._skip_rest_of_line()
                yield number, start, None
                continue
            if number == 1:
                data, start = self._drop_byte_order_mark(data)
            yield number, start, self._decode(data, number, start)

    def _skip_rest_of_line(self) -> int:
        skipped = 0
        while True:
            chunk = self.handle.readline(_SKIP_CHUNK_BYTES)
            skipped += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                return skipped

    def _drop_byte_order_mark(self, data: bytes) -> tuple[bytes, int]:
        if data.startswith(_UTF16_BOMS):
            raise InputFileError(
                f"{self.path}: the file is UTF-16 (byte order mark at byte offset 0); "
                "re-export it as UTF-8 or CP932"
            )
        if data.startswith(codecs.BOM_UTF8):
            self.encoding = "utf-8"
            return data[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
        return data, 0

    def _decode(self, data: bytes, number: int, offset: int) -> str:
        if data.isascii():
            return data.decode("ascii")
        try:
            utf8_text: str | None = data.decode("utf-8")
            utf8_error = None
        except UnicodeDecodeError as error:
            utf8_text, utf8_error = None, error
        if self.encoding is None and utf8_text is not None:
            self.encoding = "utf-8"
        if self.encoding == "utf-8":
            if utf8_text is not None:
                return utf8_text
            byte_offset = offset + utf8_error.start
            raise InputFileError(
                f"{self.path}: mixed encodings: line {number} has byte "
                f"0x{data[utf8_error.start]:02X} at byte offset {byte_offset}, which is not "
                "UTF-8, but the lines before it are UTF-8; re-export the file in one encoding"
            )
        if self.encoding == "cp932" and utf8_text is not None:
            # NOTE: a CP932 line can be valid UTF-8 by accident, but only rarely, because
            # CP932 lead bytes 0x81-0x9F can never start a UTF-8 character.
            raise InputFileError(
                f"{self.path}: mixed encodings: line {number} (byte offset {offset}) is "
                "UTF-8, but the lines before it are CP932; re-export the file in one encoding"
            )
        try:
            cp932_text = data.decode("cp932")
        except UnicodeDecodeError as cp932_error:
            first_bad = min(utf8_error.start, cp932_error.start)
            raise InputFileError(
                f"{self.path}: line {number} is not valid UTF-8 nor CP932 (byte "
                f"0x{data[first_bad]:02X} at byte offset {offset + first_bad}); re-export "
                "the file in one of these encodings"
            ) from cp932_error
        self.encoding = "cp932"
        return cp932_text


def _too_long(number: int) -> str:
    return f"line {number} is longer than {MAX_LINE_BYTES} bytes"


def _read_csv(path: Path, lines: _DecodedLines) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a CSV file with a header line; a row with the wrong field count is quarantined."""

    def texts() -> Iterator[str]:
        for number, _offset, line in lines:
            if line is None:
                raise InputFileError(
                    f"{path}: {_too_long(number)}; split the file or fix the line's quoting"
                )
            yield line

    previous_limit = csv.field_size_limit(MAX_LINE_BYTES)
    try:
        # strict: a quote left open at the end of the file is an error, not one long field.
        reader = csv.reader(texts(), strict=True)
        header: list[str] | None = None
        records, bad = [], []
        while True:
            # The reader has consumed exactly the lines of the records before this one.
            number = lines.last_line + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                raise InputFileError(
                    f"{path}: line {number}: invalid CSV ({error}); check the quoting of that line"
                ) from error
            if not fields:
                continue
            if header is None:
                header = _csv_header(path, fields)
                continue
            reason = _csv_row_problem(header, fields)
            if reason is not None:
                bad.append({FILE: str(path), LINE: number, "reason": reason})
                continue
            record = dict(zip(header, fields, strict=True))
            record[FILE] = str(path)
            record[LINE] = number
            records.append(record)
    finally:
        csv.field_size_limit(previous_limit)
    if header is None:
        return _empty_rows(), _empty_bad()
    frame = pd.DataFrame.from_records(records, columns=[*header, FILE, LINE])
    return frame, pd.DataFrame(bad, columns=[FILE, LINE, "reason"])


def _csv_header(path: Path, fields: list[str]) -> list[str]:
    names = [field.strip() for field in fields]
    if any("\x00" in name for name in names):
        raise InputFileError(
            f"{path}: line 1: the header contains a NUL character; the file may be UTF-16, "
            "re-export it as UTF-8 or CP932"
        )
    # An empty name, as a trailing comma leaves, gets a placeholder as pandas gives it.
    names = [name or f"Unnamed: {position}" for position, name in enumerate(names)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputFileError(
            f"{path}: line 1: column {repeated[0]!r} appears more than once in the header; "
            "give every column one name"
        )
    return names


def _csv_row_problem(header: list[str], fields: list[str]) -> str | None:
    if len(fields) != len(header):
        return f"line has {len(fields)} fields but the header has {len(header)}"
    for name, value in zip(header, fields, strict=True):
        if "\x00" in value:
            return f"{name} contains a NUL character"
    return None


class _InvalidJsonValue(ValueError):
    pass


def _reject_constant(name: str) -> object:
    raise _InvalidJsonValue(f"{name} is not a JSON number")


def _object_without_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        keys = [key for key, _ in pairs]
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise _InvalidJsonValue(f"key {repeated!r} appears more than once in the object")
    return value


def _parse_json_line(line: str) -> tuple[dict | None, str | None]:
    """Return (record of strings, None) or (None, reason the line is unusable)."""
    if "\x00" in line:
        return None, "line contains a NUL character"
    try:
        value = json.loads(
            line,
            object_pairs_hook=_object_without_repeated_keys,
            parse_constant=_reject_constant,
        )
    except json.JSONDecodeError as error:
        return None, f"invalid JSON: {error.msg} (column {error.colno})"
    except _InvalidJsonValue as error:
        return None, f"invalid JSON: {error}"
    except RecursionError:
        return None, "invalid JSON: arrays or objects are nested too deeply"
    except ValueError:
        # Python 3.11 raises ValueError for an integer literal of more than 4300 digits.
        return None, "invalid JSON: a number has more digits than Python reads (4300)"
    if not isinstance(value, dict):
        return None, "line is not a JSON object"
    record = {}
    for key, item in value.items():
        if isinstance(item, dict) or (
            isinstance(item, list) and any(isinstance(part, dict | list) for part in item)
        ):
            return None, (
                f"{key} is a nested JSON value; use a string, number, boolean, null "
                "or an array of these"
            )
        text = _to_text(item)
        if "\x00" in text or "\x00" in key:
            return None, f"{key} contains a NUL character"
        if not _is_encodable(text) or not _is_encodable(key):
            # A JSON escape of half a surrogate pair (half an emoji) decodes to a string
            # that no UTF-8 store or Arrow column accepts.
            return None, f"{key[:40]!r} contains a lone surrogate escape (half an emoji)"
        record[str(key)] = text
    return record, None


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_json_lines(path: Path, lines: _DecodedLines) -> tuple[pd.DataFrame, pd.DataFrame]:
    records, bad = [], []
    for number, _offset, line in lines:
        if line is None:
            bad.append({FILE: str(path), LINE: number, "reason": _too_long(number)})
            continue
        if not line.strip():
            continue
        record, reason = _parse_json_line(line)
        if reason is not None:
            bad.append({FILE: str(path), LINE: number, "reason": reason})
            continue
        record[FILE] = str(path)
        record[LINE] = number
        records.append(record)
    frame = pd.DataFrame.from_records(records) if records else _empty_rows()
    return frame, pd.DataFrame(bad, columns=[FILE, LINE, "reason"])


def _read_parquet(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    # NOTE: a Parquet file is read whole, so MAX_LINE_BYTES does not bound its memory.
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise InputFileError(
            f"{path}: not a readable Parquet file ({str(error)[:200]}); re-export it"
        ) from error
    for column in frame.columns:
        frame[column] = [_to_text(value) for value in frame[column].tolist()]
    frame.columns = [str(column) for column in frame.columns]
    frame[FILE] = str(path)
    frame[LINE] = range(1, len(frame) + 1)
    values = frame.drop(columns=[FILE, LINE])
    nul_columns = values.apply(lambda column: column.str.contains("\x00", regex=False))
    has_nul = nul_columns.any(axis=1)
    bad = pd.DataFrame(
        {
            FILE: str(path),
            LINE: frame.loc[has_nul, LINE],
            "reason": [
                f"{nul_columns.columns[row.argmax()]} contains a NUL character"
                for row in nul_columns.loc[has_nul].to_numpy()
            ],
        },
        columns=[FILE, LINE, "reason"],
    )
    return frame.loc[~has_nul].reset_index(drop=True), bad.reset_index(drop=True)


def _to_text(value: object) -> str:
    # Parquet nulls arrive as pd.NA (nullable integers) or pd.NaT (timestamps).
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ";".join(_to_text(item) for item in value)
    if hasattr(value, "tolist") and not isinstance(value, str):
        return _to_text(value.tolist())
    if isinstance(value, float) and value != value:
        return ""
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return str(value)


def _empty_rows() -> pd.DataFrame:
    return pd.DataFrame({FILE: pd.Series(dtype=object), LINE: pd.Series(dtype="int64")})


def _empty_bad() -> pd.DataFrame:
    return pd.DataFrame(columns=[FILE, LINE, "reason"])
