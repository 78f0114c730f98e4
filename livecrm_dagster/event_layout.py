"""The layout of an event file on a write, worked out one chunk of rows at a time.

A write sends every event to its member block (see `event_files`) and checks that no
event ID occurs twice. Done on whole columns, both would move ten million rows at random
through memory: a broadcast's columns then no longer fit the CPU's caches, and each row
costs more than it did at four million. So both go through the time-ordered rows in
chunks of `CHUNK`. Each chunk's rows are grouped by their block, or by their ID's
bucket, and each block or bucket is then gathered from the chunks and handled on its
own. Every step touches about a chunk's worth of memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# pandas' own counting sort, which its groupby uses: a stable order of dense integer
# codes in linear time. It is not public API, so pandas is pinned and the tests run it.
from pandas._libs.algos import groupsort_indexer

# Rows handled at once.
CHUNK = 1_000_000
# Event IDs per bucket of the uniqueness check: a hash table of this many IDs stays in
# the CPU's caches.
ID_BUCKET = 65_536


def member_blocks(table: pa.Table, block_size: int, position: str) -> Iterator[pa.Table]:
    """Yield the member blocks of a time-ordered table one at a time, each in time order.

    Members are taken in ID order, and a member goes to block n when the events of the
    members before it number from n × `block_size` to (n + 1) × `block_size` - 1. A
    member is never split, so a block passes `block_size` by less than its last member's
    events. Events without a member (empty or missing ID) follow in blocks of
    `block_size`. Each block gains the column `position`: every row's place in `table`.

    Only the row numbers of every block are worked out up front. Each block's rows are
    then gathered from the chunks when it is due, so a writer holds one block at a time.
    """
    chunks = [table.slice(start, CHUNK) for start in range(0, table.num_rows, CHUNK)]
    # One dictionary serves every chunk, so each row's code names its member directly.
    encoded = pc.dictionary_encode(
        pa.chunked_array([_one_array(chunk.column("member_id")) for chunk in chunks], pa.string())
    ).chunks
    block_of_code, member_block_count, member_events = _member_cut(encoded, block_size)
    anonymous_events = table.num_rows - member_events
    block_count = member_block_count + -(-anonymous_events // block_size)

    # For each chunk, the order that groups its rows by block (in time order inside each
    # block), and the bounds of each block's rows in that order.
    routes: list[tuple[np.ndarray, np.ndarray]] = []
    anonymous_seen = 0
    for codes in encoded:
        blocks = block_of_code[codes.indices.fill_null(len(block_of_code) - 1).to_numpy()]
        anonymous = blocks < 0
        ordinal = anonymous_seen + np.cumsum(anonymous) - 1
        blocks[anonymous] = member_block_count + ordinal[anonymous] // block_size
        anonymous_seen += int(anonymous.sum())
        order, sizes = groupsort_indexer(blocks.astype(np.intp), block_count)
        routes.append((order, np.cumsum(sizes)))
    del encoded

    for block in range(block_count):
        parts = []
        for start, chunk, (order, ends) in zip(
            range(0, table.num_rows, CHUNK), chunks, routes, strict=True
        ):
            rows = order[ends[block] : ends[block + 1]]
            if len(rows):
                parts.append(
                    chunk.take(pa.array(rows)).append_column(position, pa.array(start + rows))
                )
        if parts:
            yield pa.concat_tables(parts)


def _one_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Return the values as one array, without a copy when they are one chunk already."""
    if isinstance(values, pa.Array):
        return values
    return values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()


def _member_cut(encoded: list[pa.DictionaryArray], block_size: int) -> tuple[np.ndarray, int, int]:
    """Return each code's member block, the number of member blocks and their events.

    The chunks in `encoded` share one dictionary. The returned array has one more entry
    than the dictionary, for a missing ID. The empty ID and a missing one get -1.
    """
    if not encoded:
        return np.full(1, -1, dtype=np.int64), 0, 0
    dictionary = encoded[0].dictionary
    events = np.zeros(len(dictionary), dtype=np.int64)
    for codes in encoded:
        events += np.bincount(codes.indices.drop_null().to_numpy(), minlength=len(dictionary))
    in_id_order = pc.sort_indices(dictionary).to_numpy()
    # The empty ID sorts first and belongs to no member.
    if len(in_id_order) and dictionary[int(in_id_order[0])].as_py() == "":
        in_id_order = in_id_order[1:]
    member_events = events[in_id_order]
    block_of_member, block_count = _cut(member_events, block_size)
    block_of_code = np.full(len(dictionary) + 1, -1, dtype=np.int64)
    block_of_code[in_id_order] = block_of_member
    return block_of_code, block_count, int(member_events.sum())


def _cut(events: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """Return each member's block (members in ID order) and the number of blocks."""
    events_before = np.cumsum(events) - events
    # Renumber so the blocks are 0, 1, 2, ...: a member with many events skips numbers.
    used, blocks = np.unique(events_before // block_size, return_inverse=True)
    return blocks, len(used)


def check_event_ids(event_ids: pa.Array | pa.ChunkedArray) -> None:
    """Raise ValueError unless every event has a non-empty ID and no ID occurs twice."""
    empty = pc.sum(pc.equal(event_ids, "")).as_py() or 0
    missing = event_ids.null_count + empty
    if missing:
        raise ValueError(
            f"raw_viewer_events: event_id is missing on {missing} events; "
            "validation quarantines such rows before they are stored"
        )
    bucket_count = max(1, -(-len(event_ids) // ID_BUCKET))
    pieces: list[list[pa.Array]] = [[] for _ in range(bucket_count)]
    for start in range(0, len(event_ids), CHUNK):
        chunk = _one_array(event_ids.slice(start, CHUNK))
        order, sizes = groupsort_indexer(_buckets(chunk, bucket_count), bucket_count)
        grouped = chunk.take(pa.array(order))
        offset = 0
        for bucket, size in enumerate(sizes[1:]):
            if size:
                pieces[bucket].append(grouped.slice(offset, size))
                offset += size
    for parts in pieces:
        if parts:
            _check_unique(pa.concat_arrays(parts))


def _buckets(event_ids: pa.StringArray, count: int) -> np.ndarray:
    """Return a bucket per ID from its length and last eight bytes, so equal IDs share one."""
    _, offsets_buffer, data_buffer = event_ids.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)
    offsets = offsets[event_ids.offset : event_ids.offset + len(event_ids) + 1].astype(np.int64)
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer else np.zeros(0, np.uint8)
    first = offsets[0]
    # Eight zero bytes go in front, so that every ID's last eight bytes can be read as
    # one little-endian word. The bytes of a shorter ID are the word's highest ones.
    padded = np.concatenate([np.zeros(8, np.uint8), data[first : offsets[-1]]])
    words = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
    lengths = np.diff(offsets)
    tail_lengths = np.minimum(lengths, 8).astype(np.uint64)
    shifts = (np.uint64(8) - tail_lengths) * np.uint64(8) % np.uint64(64)
    tails = words[offsets[1:] - first] >> shifts
    tails[tail_lengths == 0] = 0
    mixed = (tails ^ lengths.astype(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(count)).astype(np.intp)


def _check_unique(event_ids: pa.Array) -> None:
    encoded = pc.dictionary_encode(event_ids)
    if len(encoded.dictionary) == len(event_ids):
        return
    codes = pd.Series(encoded.indices.to_numpy())
    repeated = codes.loc[codes.duplicated()].iloc[0]
    copies = int((codes == repeated).sum())
    value = encoded.dictionary[int(repeated)].as_py()
    excerpt = value if len(value) <= 80 else value[:80] + "…"
    raise ValueError(f"raw_viewer_events: event_id {excerpt!r} appears {copies} times in one write")
