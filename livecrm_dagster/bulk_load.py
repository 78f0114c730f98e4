"""Bulk loading of warehouse rows: PostgreSQL's COPY and SQLite's `executemany`.

Both paths first convert the frame to Arrow with the table schema's types. The checks
(times must carry a zone, integers must be whole) and the NULL rules (None, NaN, NA and
NaT are NULL) are therefore the same on both databases. On PostgreSQL, Arrow and numpy
then encode whole columns, so no Python code runs per row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pa_compute
from psycopg.copy import QueuedLibpqWriter
from sqlalchemy.engine import Connection

from livecrm_dagster.tables import BOOL, FLOAT, INT, TEXT, TIME

_ARROW_TYPES = {
    TIME: pa.timestamp("us", tz="UTC"),
    TEXT: pa.large_string(),
    INT: pa.int64(),
    FLOAT: pa.float64(),
    BOOL: pa.bool_(),
}

# Rows converted at a time. On PostgreSQL, encoded chunks wait in psycopg's write queue
# until the server takes them, so at worst the whole frame is held once more, encoded. On
# SQLite a chunk's Python values (20,000 rows of 9 columns, about 10 MB) stay in the
# CPU's cache while sqlite3 binds them. Converting a whole table of 150,000 rows first
# made the write about 5 % slower, and it grew faster than the rows.
CHUNK_ROWS = 20_000

# PostgreSQL's binary COPY format starts with a signature, 32-bit flags and a 32-bit
# header-extension length (both 0). Each row is a 16-bit field count, then per field a
# 32-bit byte length (-1 for NULL) and the value in its type's binary form. A field count
# of -1 ends the data. All integers are big-endian.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"

# A timestamptz is sent as microseconds since 2000-01-01 00:00 UTC.
_POSTGRES_EPOCH_US = 946_684_800_000_000

# The binary form of each kind: big-endian int8, float8 and timestamptz, a 0/1 byte.
_BINARY_DTYPES = {INT: ">i8", FLOAT: ">f8", TIME: ">i8", BOOL: "u1"}

_EMPTY = pa.scalar(b"", pa.large_binary())


def copy_rows(
    connection: Connection, table_name: str, frame: pd.DataFrame, kinds: Mapping[str, str]
) -> None:
    """Load `frame` with COPY in binary format, inside the connection's open transaction.

    The columns must have the types `create_tables` gives them (bigint, double precision,
    boolean, timestamptz, text). Binary COPY does not convert types, so PostgreSQL rejects
    any other column type with "incorrect binary data format".
    """
    columns = ", ".join(f'"{column}"' for column in frame.columns)
    driver_connection = connection.connection.driver_connection
    encoding = driver_connection.info.encoding
    cursor = driver_connection.cursor()
    statement = f'COPY "{table_name}" ({columns}) FROM STDIN WITH (FORMAT binary)'
    # psycopg's queued writer sends from a thread, so the next chunk is encoded meanwhile.
    with cursor.copy(statement, writer=QueuedLibpqWriter(cursor)) as copy:
        copy.write(_COPY_HEADER)
        for start in range(0, len(frame), CHUNK_ROWS):
            chunk = _arrow_table(frame.iloc[start : start + CHUNK_ROWS], kinds)
            copy.write(_binary_rows(chunk, kinds, encoding))
        copy.write(_COPY_TRAILER)


def _binary_rows(table: pa.Table, kinds: Mapping[str, str], encoding: str) -> memoryview:
    """Encode a table's rows in COPY's binary format, one row after another.

    Each column becomes one length-prefixed field per row, and the fields of a row are
    joined with Arrow, so no Python code runs per row.
    """
    field_count = np.full(table.num_rows, table.num_columns, dtype=">i2")
    fields = [_fixed_size_binary(field_count)]
    for column in table.column_names:
        values = table[column].combine_chunks()
        if kinds[column] == TEXT:
            payload = _text_bytes(values, encoding)
        else:
            payload = _fixed_size_binary(_binary_numbers(values, kinds[column]))
            if values.null_count:
                payload = pa_compute.if_else(
                    values.is_null(), pa.scalar(None, payload.type), payload
                )
        fields.append(_length_prefixed(payload))
    rows = pa_compute.binary_join_element_wise(*fields, _EMPTY)
    offsets = np.frombuffer(rows.buffers()[1], dtype=np.int64)[rows.offset :]
    return memoryview(rows.buffers()[2])[offsets[0] : offsets[len(rows)]]


def _binary_numbers(values: pa.Array, kind: str) -> np.ndarray:
    """Return a numeric column in its big-endian binary form, with zero in the null slots."""
    if kind == TIME:
        microseconds = values.cast(pa.int64()).fill_null(0).to_numpy()
        return (microseconds - _POSTGRES_EPOCH_US).astype(_BINARY_DTYPES[TIME])
    filled = values.fill_null(False if kind == BOOL else 0)
    return filled.to_numpy(zero_copy_only=False).astype(_BINARY_DTYPES[kind])


def _text_bytes(values: pa.Array, encoding: str) -> pa.Array:
    """Return text as bytes in the client encoding, which a binary COPY of text expects."""
    if encoding == "utf-8":
        return values.cast(pa.large_binary())
    # Other client encodings are rare, so this path encodes value by value in Python.
    encoded = [None if text is None else text.encode(encoding) for text in values.to_pylist()]
    return pa.array(encoded, type=pa.large_binary())


def _fixed_size_binary(values: np.ndarray) -> pa.Array:
    """View each element of a 1-D array as one binary value of its bytes."""
    values = np.ascontiguousarray(values)
    width = values.dtype.itemsize
    fixed = pa.Array.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(values)])
    return fixed.cast(pa.large_binary())


def _length_prefixed(payload: pa.Array) -> pa.Array:
    """Prefix each value with its 32-bit byte length, and write a NULL as length -1."""
    lengths = pa_compute.binary_length(payload).fill_null(-1)
    prefix = _fixed_size_binary(lengths.to_numpy().astype(">i4"))
    return pa_compute.binary_join_element_wise(prefix, payload.fill_null(b""), _EMPTY)


def insert_rows(
    connection: Connection, table_name: str, frame: pd.DataFrame, kinds: Mapping[str, str]
) -> None:
    """Insert `frame` on SQLite with an `executemany` of plain tuples per chunk of rows.

    Values are stored as SQLAlchemy's SQLite types store them: times as UTC text
    `YYYY-MM-DD HH:MM:SS.ffffff` and booleans as 1 and 0. Reads and time comparisons
    through SQLAlchemy therefore treat these rows like rows it inserted itself.
    """
    columns = ", ".join(f'"{column}"' for column in frame.columns)
    marks = ", ".join("?" for _ in frame.columns)
    statement = f'INSERT INTO "{table_name}" ({columns}) VALUES ({marks})'
    for start in range(0, len(frame), CHUNK_ROWS):
        chunk = _arrow_table(frame.iloc[start : start + CHUNK_ROWS], kinds)
        values = [_python_values(chunk[column], kinds[column]) for column in frame.columns]
        connection.exec_driver_sql(statement, list(zip(*values, strict=True)))


def _arrow_table(frame: pd.DataFrame, kinds: Mapping[str, str]) -> pa.Table:
    """Convert a frame to Arrow with the schema's types, with None, NaN, NA and NaT as null.

    A value that does not fit its column's type raises ValueError naming the column.
    """
    arrays = []
    for column in frame.columns:
        try:
            arrays.append(_arrow_column(frame[column], kinds[column]))
        except (TypeError, ValueError, OverflowError, UnicodeError, pa.ArrowException) as error:
            raise ValueError(f"column {column!r} ({kinds[column]}): {error}") from error
    return pa.Table.from_arrays(arrays, names=list(frame.columns))


def _arrow_column(series: pd.Series, kind: str) -> pa.Array:
    if kind == TIME:
        series = _utc_microseconds(series)
    elif kind == INT:
        series = series.astype("Int64")
    elif kind == FLOAT:
        # The nullable dtype, because float64 refuses pd.NA in an object column.
        series = series.astype("Float64")
    elif kind == BOOL:
        series = series.astype("boolean")
    else:
        return _arrow_text(series)
    return pa.array(series, type=_ARROW_TYPES[kind], from_pandas=True)


def _arrow_text(series: pd.Series) -> pa.Array:
    try:
        text = pa.array(series, type=_ARROW_TYPES[TEXT], from_pandas=True)
    except pa.ArrowException:
        # Values that are not strings, such as numbers or booleans, are stored as str().
        strings = series.astype(str).where(series.notna(), None)
        text = pa.array(strings, type=_ARROW_TYPES[TEXT], from_pandas=True)
    # PostgreSQL's text cannot hold NUL, so both databases reject it alike.
    if pa_compute.any(pa_compute.match_substring(text, "\x00")).as_py():
        raise ValueError("text contains a NUL character, which PostgreSQL cannot store")
    return text


def _utc_microseconds(series: pd.Series) -> pd.Series:
    """Return a time column in UTC at microsecond precision, and raise on times without a zone.

    Nanoseconds are floored, because PostgreSQL and SQLite store microseconds.
    """
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        times = series.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_dtype(series.dtype):
        if series.notna().any():
            raise ValueError(
                f"cannot store times without a zone in {series.name!r}. "
                "Localize them first with Series.dt.tz_localize."
            )
        times = series.dt.tz_localize("UTC")
    else:
        for value in series[series.notna()]:
            if not isinstance(value, dt.datetime) or value.tzinfo is None:
                raise ValueError(
                    f"cannot store {value!r} in {series.name!r}: expected a datetime with a zone"
                )
        times = pd.to_datetime(series, utc=True)
    if times.dt.unit == "ns":
        times = times.dt.floor("us")
    return times.dt.as_unit("us")


def _utc_text(times: pa.ChunkedArray) -> pa.ChunkedArray:
    """Render UTC timestamps as `YYYY-MM-DD HH:MM:SS.ffffff`, always with six digits.

    The zone is dropped before the cast because pyarrow 26 renders zoned timestamps about
    30 times slower than naive ones. The values are UTC already.
    """
    return times.cast(pa.timestamp("us")).cast(pa.string())


def _python_values(values: pa.ChunkedArray, kind: str) -> list:
    """Return one column as the Python values sqlite3 binds, with None for NULL."""
    if kind == TIME:
        values = _utc_text(values)
    values = values.combine_chunks()
    if kind in (TIME, TEXT) or values.null_count == 0:
        return values.to_numpy(zero_copy_only=False).tolist()
    # Arrow turns integers with nulls into floats, so fill the nulls, then put None back.
    filled = values.fill_null(False if kind == BOOL else 0).to_numpy(zero_copy_only=False)
    filled = filled.astype(object)
    filled[values.is_null().to_numpy(zero_copy_only=False)] = None
    return filled.tolist()
