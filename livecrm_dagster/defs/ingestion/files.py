"""Read file drops (CSV, JSON Lines, Parquet) into frames of strings with file and line.

Every value comes back as a string so the contract checks see exactly what the source
sent: leading zeros stay, and nothing is parsed twice. A line that cannot be read at
all (broken JSON) becomes a quarantine row instead of stopping the load.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")
FILE = "_file"
LINE = "_line"


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
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path), _empty_bad()
    if suffix in (".jsonl", ".ndjson"):
        return _read_json_lines(path)
    if suffix == ".parquet":
        return _read_parquet(path), _empty_bad()
    raise InputFileError(f"{path}: unsupported file type; use .csv, .jsonl or .parquet")


def decode_text(path: Path) -> str:
    """Decode UTF-8 (with or without a BOM), else CP932 as Japanese shop systems export."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as utf8_error:
        try:
            return data.decode("cp932")
        except UnicodeDecodeError:
            raise InputFileError(
                f"{path}: not valid UTF-8 (first bad byte at offset {utf8_error.start}) nor "
                "CP932; re-export the file in one of these encodings"
            ) from utf8_error


def _read_csv(path: Path) -> pd.DataFrame:
    text = decode_text(path)
    if not text.strip():
        return _empty_rows()
    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    frame.columns = [str(column).strip() for column in frame.columns]
    frame[FILE] = str(path)
    # Line 1 is the header; quoted values spanning lines would shift these numbers.
    frame[LINE] = range(2, len(frame) + 2)
    return frame


def _read_json_lines(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    records, bad = [], []
    for number, line in enumerate(decode_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            bad.append({FILE: str(path), LINE: number, "reason": f"invalid JSON: {error.msg}"})
            continue
        if not isinstance(value, dict):
            bad.append({FILE: str(path), LINE: number, "reason": "line is not a JSON object"})
            continue
        record = {str(key): _to_text(item) for key, item in value.items()}
        record[FILE] = str(path)
        record[LINE] = number
        records.append(record)
    frame = pd.DataFrame.from_records(records) if records else _empty_rows()
    return frame, pd.DataFrame(bad, columns=[FILE, LINE, "reason"])


def _read_parquet(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    for column in frame.columns:
        frame[column] = [_to_text(value) for value in frame[column].tolist()]
    frame[FILE] = str(path)
    frame[LINE] = range(1, len(frame) + 1)
    return frame


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
