"""Raw viewer events: one columnar Parquet file per broadcast, beside the SQL warehouse.

A large broadcast brings ten million heartbeats or more. As SQL rows they are slow to
write and to read back, and a read turns every ID into a Python string: about 1.6 GB of
memory per million events. In a Parquet file the text columns are dictionary-encoded,
so a member's ID is stored once per row group and each event stores a small integer
code.

The file of a broadcast is replaced whole. The new rows go to a temporary file in the
same folder, which is then renamed over the old one. A reader therefore sees either the
old rows or the new ones, and a failed write leaves the old file in place.

The file is laid out in member blocks. Each block is one row group and holds every event
of a range of members, and the blocks follow member ID order. Events without a member
come last, in blocks of their own. Inside a block the events are in time order (ties in
the order written). The sessions and the viewer summary read one block at a time, so
their work on ten million events is many small pieces that each fit the CPU's caches,
and their time grows in step with the events. A whole read puts the rows back in time
order with a stored position column.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from livecrm_dagster import event_layout
from livecrm_dagster.tables import SCHEMAS

# The table's columns but `broadcast_id`, which names the file.
COLUMNS = [name for name, _ in SCHEMAS["raw_viewer_events"][0] if name != "broadcast_id"]
# Every text column but the event ID repeats values across rows (members, devices,
# types, products, questions), so they are stored as dictionaries. Event IDs are unique.
_DICTIONARY = [name for name in COLUMNS if name not in ("event_id", "occurred_at", "is_correct")]
_DICTIONARY_TYPE = pa.dictionary(pa.int32(), pa.string())


def _schema(text_type: pa.DataType) -> pa.Schema:
    fields = []
    for name in COLUMNS:
        if name == "occurred_at":
            fields.append(pa.field(name, pa.timestamp("us", tz="UTC")))
        elif name == "is_correct":
            fields.append(pa.field(name, pa.bool_()))
        else:
            fields.append(pa.field(name, text_type if name in _DICTIONARY else pa.string()))
    return pa.schema(fields)


# The columns as a read returns them: repeated text as dictionaries.
SCHEMA = _schema(_DICTIONARY_TYPE)
# The columns as written: plain text, which the Parquet writer dictionary-encodes with a
# dictionary per row group of the values in that row group. Parquet writes an Arrow
# dictionary whole into every row group, which repeats all of a broadcast's member IDs
# once per million events, in the file and in every read.
_WRITTEN = _schema(pa.string())
# A row group's dictionary may contain every value of a column, because chat texts are
# mostly distinct. Past this size the writer falls back to plain pages, which a read
# must then hash into a dictionary again.
_DICTIONARY_PAGE_LIMIT = 256 * 1024 * 1024
# Events per member block (one row group), close to pyarrow's default of 1,048,576 rows.
# A block is larger only when one member alone has more events.
_ROW_GROUP = 1_000_000
# The row's place in time order, stored beside the events. A whole read orders by it.
_POSITION = "time_position"
# Files written before the member blocks lack this key, and they are one time-ordered block.
_LAYOUT_KEY = b"livecrm.layout"
_MEMBER_BLOCKS = b"member-blocks"

T = TypeVar("T")


class EventFiles:
    """Reads and replaces the raw viewer events of each broadcast in a folder of files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, broadcast_id: str) -> Path:
        # Broadcast IDs are validated on ingestion; quoting keeps any other ID a plain
        # file name inside the folder all the same.
        return self.folder / f"{quote(broadcast_id, safe='')}.parquet"

    def replace(self, broadcast_id: str, events: pd.DataFrame) -> int:
        """Replace the broadcast's events with `events` atomically, and return the row count.

        Two worker threads help the thread that encodes the file. While it encodes a
        block, one gathers the next block and the other checks that no event ID repeats.
        The check must pass before the new file is renamed over the old one.
        """
        table = _arrow_table(broadcast_id, events)
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(broadcast_id)
        handle, temporary = tempfile.mkstemp(prefix=".writing-", suffix=".parquet", dir=self.folder)
        try:
            # Chat text may carry personal details, so the files are readable by the owner only.
            os.fchmod(handle, 0o600)
            with ThreadPoolExecutor(max_workers=2) as pool:
                checked = pool.submit(event_layout.check_event_ids, table.column("event_id"))
                blocks = event_layout.member_blocks(table, _ROW_GROUP, _POSITION)
                with os.fdopen(handle, "wb") as sink:
                    _write_blocks(sink, _ahead(blocks, pool), checked)
                    sink.flush()
                    os.fsync(sink.fileno())
                checked.result()
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _sync_folder(self.folder)
        return table.num_rows

    def read(
        self,
        broadcast_id: str,
        columns: list[str] | None = None,
        types: str | Iterable[str] | None = None,
        categorical: bool = False,
    ) -> pd.DataFrame:
        """Read a broadcast's events in time order, optionally only some columns and types.

        Text comes back as Python strings (None for a missing value), as from a SQL
        table. `categorical=True` keeps the dictionary columns as pandas categoricals
        instead, which is what a whole large partition needs to fit in memory; the
        analytics accept both.
        """
        requested = _requested(columns)
        stored = [name for name in requested if name != "broadcast_id"]
        # A read of `broadcast_id` alone still needs one stored column for the row count.
        read_columns = stored or ["type"]
        if isinstance(types, str):
            types = [types]
        elif types is not None:
            types = list(types)
        if types is not None and not all(isinstance(kind, str) for kind in types):
            raise ValueError(f"event types must be strings, got {types!r}")
        # One open file serves every step of the read, so a replace that renames a new
        # file over this one during the read cannot mix the two.
        with self._existing(broadcast_id).open("rb") as handle:
            frame = _read_open(handle, read_columns, types, categorical)
        # Arrow keeps freed buffers for reuse; hand them back before the caller's work.
        pa.default_memory_pool().release_unused()
        if "broadcast_id" in requested:
            frame["broadcast_id"] = broadcast_id
        return frame[requested]

    def blocks(
        self, broadcast_id: str, columns: list[str], categorical: bool = False
    ) -> Iterator[pd.DataFrame]:
        """Yield a broadcast's events one member block at a time.

        Each block holds every event of its members, in time order, and no member's events
        are in two blocks. Blocks come in member ID order; events without a member come
        in the last blocks. A categorical block's categories are the values in that block
        alone. A file written before the member blocks is one block, and so is an empty
        partition, so there is always at least one.
        """
        requested = _requested(columns)
        if "broadcast_id" in requested:
            raise ValueError(
                "raw_viewer_events: broadcast_id is not stored in the file, so blocks omit it"
            )
        with self._existing(broadcast_id).open("rb") as handle:
            parquet = pq.ParquetFile(
                handle, read_dictionary=[name for name in requested if name in _DICTIONARY]
            )
            if not _is_blocked(parquet) or parquet.num_row_groups == 0:
                yield _read_open(handle, requested or ["type"], None, categorical)[requested]
                return
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=requested or ["type"])
                yield _pandas(table, categorical)[requested]

    def _existing(self, broadcast_id: str) -> Path:
        path = self.path(broadcast_id)
        if not path.exists():
            # An empty result would look like a broadcast without viewers, but a step that
            # looks in the wrong folder (a worker without LIVECRM_EVENT_STORE) must fail.
            raise FileNotFoundError(
                f"no raw events of broadcast {broadcast_id!r} in {self.folder}: materialize "
                "raw_viewer_events for it, or point LIVECRM_EVENT_STORE at the folder it wrote"
            )
        return path


def _write_blocks(sink, blocks: Iterable[pa.Table], checked: Future) -> None:
    """Write each block as one row group, and stop at the next block once the ID check fails."""
    schema = _WRITTEN.append(pa.field(_POSITION, pa.int64()))
    with pq.ParquetWriter(
        sink,
        schema.with_metadata({_LAYOUT_KEY: _MEMBER_BLOCKS}),
        compression="zstd",
        # Event IDs are unique, so a dictionary would only be built and dropped.
        use_dictionary=_DICTIONARY,
        dictionary_pagesize_limit=_DICTIONARY_PAGE_LIMIT,
        # Positions rise inside a block, so their differences pack small.
        column_encoding={_POSITION: "DELTA_BINARY_PACKED"},
    ) as writer:
        for block in blocks:
            if checked.done():
                checked.result()  # Raises the check's error, if it found one.
            writer.write_table(block, row_group_size=block.num_rows)


# The value `next` returns for an exhausted iterator in `_ahead`.
_DONE = object()


def _ahead(items: Iterator[T], pool: ThreadPoolExecutor) -> Iterator[T]:
    """Yield the items of `items`, each worked out on `pool` while the last is in use."""
    pending = pool.submit(next, items, _DONE)
    while (item := pending.result()) is not _DONE:
        pending = pool.submit(next, items, _DONE)
        yield item


def _requested(columns: list[str] | None) -> list[str]:
    requested = list(columns) if columns is not None else ["broadcast_id", *COLUMNS]
    repeated = sorted({name for name in requested if requested.count(name) > 1})
    if repeated:
        raise ValueError(f"raw_viewer_events: duplicate columns in the read: {repeated}")
    unknown = sorted(set(requested) - set(COLUMNS) - {"broadcast_id"})
    if unknown:
        raise ValueError(f"raw_viewer_events: columns not in the table schema: {unknown}")
    return requested


def _is_blocked(parquet: pq.ParquetFile) -> bool:
    metadata = parquet.schema_arrow.metadata or {}
    return metadata.get(_LAYOUT_KEY) == _MEMBER_BLOCKS


def _read_open(
    handle, columns: list[str], types: list[str] | None, categorical: bool
) -> pd.DataFrame:
    """Read the columns of an open event file in time order, only `types` if given."""
    if types == []:
        return _pandas(SCHEMA.empty_table().select(columns), categorical)
    parquet = pq.ParquetFile(handle)
    blocked = _is_blocked(parquet)
    table = pq.read_table(
        handle,
        columns=columns + ([_POSITION] if blocked else []),
        filters=[("type", "in", types)] if types is not None else None,
        read_dictionary=[name for name in columns if name in _DICTIONARY],
    )
    in_time = _time_order(table, parquet.metadata.num_rows) if blocked else None
    frame = _pandas(table.select(columns), categorical)
    del table
    if in_time is not None:
        frame = frame.take(in_time).reset_index(drop=True)
    return frame


def _time_order(table: pa.Table, rows_in_file: int) -> np.ndarray:
    """Return the order that puts read rows back in time order, from their positions."""
    positions = table.column(_POSITION).to_numpy()
    place = np.full(rows_in_file, -1, dtype=np.int64)
    place[positions] = np.arange(len(positions))
    return place[place >= 0]


def _arrow_table(broadcast_id: str, events: pd.DataFrame) -> pa.Table:
    """Check the frame against the schema and turn it into a time-ordered Arrow table."""
    unknown = sorted(set(events.columns) - set(COLUMNS) - {"broadcast_id"})
    if unknown:
        raise ValueError(f"raw_viewer_events: columns not in the table schema: {unknown}")
    if "event_id" not in events.columns:
        raise ValueError("raw_viewer_events: the event_id column is missing")
    if "broadcast_id" in events.columns and not (events["broadcast_id"] == broadcast_id).all():
        raise ValueError(
            f"raw_viewer_events: rows outside broadcast_id={broadcast_id!r} in a write for it"
        )
    occurred = events["occurred_at"] if "occurred_at" in events.columns else None
    naive = occurred is not None and pd.api.types.is_datetime64_dtype(occurred.dtype)
    if naive or (occurred is not None and occurred.notna().any()):
        if not isinstance(occurred.dtype, pd.DatetimeTZDtype):
            raise ValueError("refusing to store times without a zone in 'occurred_at'")
    if occurred is not None and not occurred.is_monotonic_increasing:
        events = events.iloc[np.argsort(occurred.array.asi8, kind="stable")]
    # A chunk at a time (see `event_layout`), so that no conversion copies a whole column.
    chunk = event_layout.CHUNK
    pieces = [events.iloc[start : start + chunk] for start in range(0, len(events), chunk)]
    table = pa.concat_tables(
        pa.Table.from_arrays([_arrow_column(piece, field) for field in _WRITTEN], schema=_WRITTEN)
        for piece in pieces or [events]
    )
    return table


def _arrow_column(events: pd.DataFrame, field: pa.Field) -> pa.Array:
    if field.name not in events.columns:
        return pa.nulls(len(events), field.type)
    column = events[field.name]
    try:
        if field.name == "occurred_at":
            return pa.array(column.dt.tz_convert("UTC").astype("datetime64[us, UTC]"), field.type)
        if field.name == "is_correct":
            return pa.array(column.astype("boolean"), pa.bool_())
        if isinstance(column.dtype, pd.CategoricalDtype):
            return pa.array(column.astype(object), pa.string(), from_pandas=True)
        return pa.array(column, pa.string(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as error:
        raise ValueError(
            f"raw_viewer_events: column {field.name!r} cannot be stored as {field.type}: {error}"
        ) from error


def _pandas(table: pa.Table, categorical: bool) -> pd.DataFrame:
    """Convert to pandas with nullable booleans; text as categoricals or Python strings."""
    if not categorical:
        plain = [
            pa.field(field.name, pa.string()) if field.type == _DICTIONARY_TYPE else field
            for field in table.schema
        ]
        table = table.cast(pa.schema(plain))
    frame = table.to_pandas(types_mapper={pa.bool_(): pd.BooleanDtype()}.get)
    for name in frame.columns:
        if pa.types.is_string(table.schema.field(name).type):
            frame[name] = frame[name].astype(object).where(frame[name].notna(), None)
    return frame


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable, so a crash cannot bring the old file back."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
