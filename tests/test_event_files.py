"""Raw viewer events in one Parquet file per broadcast: round trips, atomic replaces, reads."""

from __future__ import annotations

import stat

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from livecrm_dagster import event_files, event_layout
from livecrm_dagster.event_files import EventFiles
from livecrm_dagster.warehouse import Warehouse, default_events_folder

TEXTS = [
    'a "quoted" word',
    "comma, and\nnewline",
    "back\\slash",
    "保湿クリーム　最高！",
    "",
    None,
]


def _events(*rows: tuple[str, str, str | None]) -> pd.DataFrame:
    """Return validated events from (event_id, occurred_at, text) tuples."""
    frame = pd.DataFrame(rows, columns=["event_id", "occurred_at", "text"])
    frame["occurred_at"] = pd.to_datetime(frame["occurred_at"], utc=True, format="ISO8601")
    frame["member_id"] = "m1"
    frame["device_id"] = ""
    frame["type"] = "chat"
    return frame


@pytest.fixture
def files(tmp_path) -> EventFiles:
    return EventFiles(tmp_path / "events")


def test_text_and_missing_values_round_trip(files):
    rows = [(f"e{number}", "2024-06-10T11:00:00Z", text) for number, text in enumerate(TEXTS)]
    files.replace("b1", _events(*rows))

    stored = files.read("b1")

    assert stored["text"].tolist() == TEXTS
    assert stored["product_id"].tolist() == [None] * len(TEXTS)
    assert stored["text"].dtype == object


def test_instants_come_back_in_utc_and_time_order(files):
    rows = [
        ("late", "2024-06-11T00:00:01+09:00", ""),
        ("early", "2024-06-10T07:00:00-04:00", ""),
        ("tie-b", "2024-06-10T11:00:00Z", ""),
        ("tie-a", "2024-06-10T11:00:00Z", ""),
    ]
    files.replace("b1", _events(*rows))

    stored = files.read("b1", columns=["event_id", "occurred_at"])

    # Rows are ordered by time; rows at the same instant keep the order they were written in.
    assert stored["event_id"].tolist() == ["early", "tie-b", "tie-a", "late"]
    assert str(stored["occurred_at"].dt.tz) == "UTC"
    assert stored["occurred_at"].iloc[-1] == pd.Timestamp("2024-06-10T15:00:01Z")


def test_answers_keep_missing_flags(files):
    events = _events(("e1", "2024-06-10T11:00:00Z", ""), ("e2", "2024-06-10T11:00:01Z", ""))
    events["is_correct"] = pd.array([True, pd.NA], dtype="boolean")
    files.replace("b1", events)

    flags = files.read("b1")["is_correct"]

    assert flags.dtype == "boolean"
    assert flags[0]
    assert pd.isna(flags[1])


def test_categorical_read_holds_the_same_values(files):
    rows = [(f"e{number}", "2024-06-10T11:00:00Z", text) for number, text in enumerate(TEXTS)]
    files.replace("b1", _events(*rows))

    plain = files.read("b1")
    coded = files.read("b1", categorical=True)

    assert isinstance(coded["member_id"].dtype, pd.CategoricalDtype)
    for column in plain.columns:
        left = plain[column].astype(object).where(plain[column].notna(), None)
        right = coded[column].astype(object).where(coded[column].notna(), None)
        assert left.tolist() == right.tolist(), column


def _interleaved() -> pd.DataFrame:
    """Eight events of three members and two anonymous viewers, one second apart."""
    rows = [(f"e{number}", f"2024-06-10T11:00:0{number}Z", "") for number in range(8)]
    members = ["m2", "m1", "", "m2", "m3", "m1", None, "m3"]
    return _events(*rows).assign(member_id=members)


def test_blocks_hold_whole_members_in_id_order(files, monkeypatch):
    # Each block is one row group holding every event of a range of members. Its dictionary
    # contains only its own IDs, not every member of the broadcast, or a read would decode
    # all members once per block.
    monkeypatch.setattr(event_files, "_ROW_GROUP", 2)
    files.replace("b1", _interleaved())

    parquet = pq.ParquetFile(files.path("b1"), read_dictionary=["member_id"])
    dictionaries = [
        parquet.read_row_group(group, columns=["member_id"]).column(0).chunk(0).dictionary
        for group in range(parquet.num_row_groups)
    ]
    assert [dictionary.to_pylist() for dictionary in dictionaries] == [
        ["m1"], ["m2"], ["m3"], [""],
    ]  # fmt: skip
    blocks = list(files.blocks("b1", columns=["event_id", "member_id"], categorical=True))
    assert [block["event_id"].tolist() for block in blocks] == [
        ["e1", "e5"], ["e0", "e3"], ["e4", "e7"], ["e2", "e6"],
    ]  # fmt: skip
    assert isinstance(blocks[0]["member_id"].dtype, pd.CategoricalDtype)
    assert blocks[0]["member_id"].cat.categories.tolist() == ["m1"]
    # A whole read puts the rows back in time order.
    whole = files.read("b1", columns=["event_id", "member_id"], categorical=True)
    assert whole["event_id"].tolist() == [f"e{number}" for number in range(8)]
    assert whole["member_id"].astype(object).where(whole["member_id"].notna(), None).tolist() == [
        "m2", "m1", "", "m2", "m3", "m1", None, "m3",
    ]  # fmt: skip


def test_large_member_stays_in_one_block(files, monkeypatch):
    monkeypatch.setattr(event_files, "_ROW_GROUP", 2)
    members = ["m1", "m2", "m2", "m2", "m2", "m3", "m1", "m3"]
    files.replace("b1", _interleaved().assign(member_id=members))

    blocks = list(files.blocks("b1", columns=["member_id", "occurred_at"]))

    assert [block["member_id"].tolist() for block in blocks] == [
        ["m1", "m1"], ["m2"] * 4, ["m3", "m3"],
    ]  # fmt: skip
    assert all(block["occurred_at"].is_monotonic_increasing for block in blocks)


def test_type_filter_keeps_time_order_across_blocks(files, monkeypatch):
    monkeypatch.setattr(event_files, "_ROW_GROUP", 2)
    events = _interleaved()
    events["type"] = ["chat", "like", "chat", "like", "chat", "chat", "like", "chat"]
    files.replace("b1", events)

    chats = files.read("b1", columns=["event_id"], types="chat")

    assert chats["event_id"].tolist() == ["e0", "e2", "e4", "e5", "e7"]


def test_blocks_of_an_empty_partition(files):
    files.replace("b1", _events().astype({"occurred_at": "datetime64[us, UTC]"}))

    (block,) = files.blocks("b1", columns=["member_id", "occurred_at"])
    assert block.empty
    assert str(block["occurred_at"].dtype) == "datetime64[us, UTC]"
    assert files.read("b1", columns=["member_id"]).empty


def test_blocks_reject_broadcast_id_and_unknown_columns(files):
    files.replace("b1", _interleaved())

    with pytest.raises(ValueError, match="broadcast_id is not stored"):
        next(files.blocks("b1", columns=["broadcast_id", "member_id"]))
    with pytest.raises(ValueError, match="not in the table schema"):
        next(files.blocks("b1", columns=["member"]))


def test_file_without_member_blocks_is_one_block(files):
    # Files written before the member blocks are in time order with no layout key.
    files.replace("b1", _interleaved())
    current = files.read("b1")
    table = pq.read_table(files.path("b1"))
    in_time = pc.sort_indices(table.column(event_files._POSITION))
    old = table.take(in_time).drop_columns([event_files._POSITION])
    pq.write_table(old.replace_schema_metadata(None), files.path("b1"))

    pd.testing.assert_frame_equal(files.read("b1"), current)
    (block,) = files.blocks("b1", columns=["event_id", "member_id"])
    pd.testing.assert_frame_equal(block, current[["event_id", "member_id"]])


def test_old_dictionary_file_reads_same(files):
    # Files written before the row groups kept their own dictionaries store one Arrow
    # dictionary for the whole column; they must read back unchanged.
    rows = [(f"e{number}", "2024-06-10T11:00:00Z", text) for number, text in enumerate(TEXTS)]
    files.replace("b1", _events(*rows))
    current = files.read("b1")
    table = pq.read_table(files.path("b1"))
    encoded = table.set_column(
        table.schema.get_field_index("text"), "text", pc.dictionary_encode(table["text"])
    )
    pq.write_table(encoded, files.path("b1"))

    assert pq.read_schema(files.path("b1")).field("text").type == pa.dictionary(
        pa.int32(), pa.string()
    )
    pd.testing.assert_frame_equal(files.read("b1"), current)


def test_replace_swaps_the_whole_partition(files):
    files.replace("b1", _events(("e1", "2024-06-10T11:00:00Z", "")))
    files.replace("b2", _events(("e9", "2024-06-12T11:00:00Z", "")))
    files.replace(
        "b1", _events(("e2", "2024-06-10T11:01:00Z", ""), ("e3", "2024-06-10T11:02:00Z", ""))
    )

    assert files.read("b1")["event_id"].tolist() == ["e2", "e3"]
    assert files.read("b2")["event_id"].tolist() == ["e9"]


def test_failed_write_keeps_previous_file(files, monkeypatch):
    files.replace("b1", _events(("e1", "2024-06-10T11:00:00Z", "")))

    def broken_disk(writer, table, **options):
        raise OSError("no space left on device")

    # The writer has opened the temporary file and written the header when this fails.
    monkeypatch.setattr(pq.ParquetWriter, "write_table", broken_disk)
    with pytest.raises(OSError, match="no space left"):
        files.replace("b1", _events(("e2", "2024-06-10T11:01:00Z", "")))
    monkeypatch.undo()

    assert files.read("b1")["event_id"].tolist() == ["e1"]
    assert [path.name for path in files.folder.iterdir()] == ["b1.parquet"]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        # The same event twice in one write: validation drops repeated deliveries first.
        (
            _events(("e2", "2024-06-10T11:01:00Z", ""), ("e2", "2024-06-10T11:02:00Z", "")),
            "event_id 'e2' appears 2 times",
        ),
        # The repeat is found among many unique IDs, wherever it sits.
        (
            _events(
                *[(f"e{number}", "2024-06-10T11:01:00Z", "") for number in range(1000)],
                ("e500", "2024-06-10T11:03:00Z", ""),
            ),
            "event_id 'e500' appears 2 times",
        ),
        # An event without an ID cannot be checked for repeats, and "" is no ID either.
        (
            _events(("e2", "2024-06-10T11:01:00Z", "")).assign(event_id=None),
            "event_id is missing on 1 events",
        ),
        (
            _events(("e2", "2024-06-10T11:01:00Z", ""), ("", "2024-06-10T11:02:00Z", "")),
            "event_id is missing on 1 events",
        ),
        (
            _events(("e2", "2024-06-10T11:01:00Z", "")).drop(columns="event_id"),
            "the event_id column is missing",
        ),
        # A value of the wrong type names its column.
        (
            _events(("e2", "2024-06-10T11:01:00Z", "")).assign(event_id=[7]),
            "column 'event_id' cannot be stored as string",
        ),
        # A row of another broadcast in this broadcast's write.
        (
            _events(("e2", "2024-06-10T11:01:00Z", "")).assign(broadcast_id="b2"),
            "rows outside broadcast_id='b1'",
        ),
        # A column the table does not have.
        (
            _events(("e2", "2024-06-10T11:01:00Z", "")).assign(colour="red"),
            r"columns not in the table schema: \['colour'\]",
        ),
        # A time without a zone cannot be placed on the timeline.
        (
            _events(("e2", "2024-06-10T11:01:00Z", "")).assign(
                occurred_at=pd.Timestamp("2024-06-10T11:01:00")
            ),
            "without a zone",
        ),
    ],
)
def test_bad_write_is_refused_and_keeps_previous_rows(files, frame, message):
    files.replace("b1", _events(("e1", "2024-06-10T11:00:00Z", "")))

    with pytest.raises(ValueError, match=message):
        files.replace("b1", frame)

    assert files.read("b1")["event_id"].tolist() == ["e1"]
    assert [path.name for path in files.folder.iterdir()] == ["b1.parquet"]


def test_failed_block_keeps_previous_file(files, monkeypatch):
    files.replace("b1", _events(("e1", "2024-06-10T11:00:00Z", "")))
    written_blocks = event_layout.member_blocks

    def failing_blocks(table, block_size, position):
        # Blocks are gathered on a worker thread, and its error must reach the caller.
        yield next(written_blocks(table, block_size, position))
        raise MemoryError("out of memory while gathering a block")

    monkeypatch.setattr(event_layout, "member_blocks", failing_blocks)
    with pytest.raises(MemoryError, match="gathering a block"):
        files.replace("b1", _events(("e2", "2024-06-10T11:01:00Z", "")))
    monkeypatch.undo()

    assert files.read("b1")["event_id"].tolist() == ["e1"]
    assert [path.name for path in files.folder.iterdir()] == ["b1.parquet"]


def test_read_filters_types_and_columns(files):
    events = _events(
        ("e1", "2024-06-10T11:00:00Z", ""),
        ("e2", "2024-06-10T11:00:01Z", ""),
        ("e3", "2024-06-10T11:00:02Z", ""),
    )
    events["type"] = ["heartbeat", "product_click", "answer"]
    files.replace("b1", events)

    clicks = files.read("b1", columns=["broadcast_id", "event_id"], types=["product_click"])

    assert clicks.to_dict("records") == [{"broadcast_id": "b1", "event_id": "e2"}]
    assert files.read("b1", types=[]).empty


def test_reading_a_broadcast_without_a_file_fails():
    files = EventFiles("/nonexistent/events")

    with pytest.raises(FileNotFoundError, match="no raw events of broadcast 'b1' in /nonexistent"):
        files.read("b1")


def test_files_are_readable_by_owner_only(files):
    files.replace("b1", _events(("e1", "2024-06-10T11:00:00Z", "chat text")))

    mode = stat.S_IMODE(files.path("b1").stat().st_mode)

    assert mode == 0o600


def test_broadcast_id_stays_inside_the_folder(files):
    files.replace("../escape", _events(("e1", "2024-06-10T11:00:00Z", "")))

    assert files.path("../escape").parent == files.folder
    assert files.read("../escape")["event_id"].tolist() == ["e1"]


def test_warehouse_reads_and_replaces_events_by_broadcast(warehouse_url, tmp_path):
    store = Warehouse(warehouse_url, events_folder=tmp_path / "events")
    events = _events(("e1", "2024-06-10T11:00:00Z", ""), ("e2", "2024-06-10T11:00:01Z", ""))
    events["type"] = ["heartbeat", "answer"]

    store.replace_partition("raw_viewer_events", "b1", events)

    assert store.read("raw_viewer_events", broadcast_id="b1", type="answer")[
        "event_id"
    ].tolist() == ["e2"]
    assert len(store.read_partition("raw_viewer_events", "b1")) == 2
    with pytest.raises(ValueError, match="by broadcast and type"):
        store.query("raw_viewer_events")


@pytest.mark.parametrize(
    ("url", "folder"),
    [
        # Beside a SQLite file.
        ("sqlite:////data/crm/warehouse.db", "/data/crm/warehouse.db-events"),
        # A server database: a local folder named after the database.
        ("postgresql+psycopg://root@127.0.0.1:5432/crm", ".livecrm/events/crm"),
    ],
)
def test_default_events_folder(url, folder):
    assert str(default_events_folder(url)) == folder


def test_read_of_broadcast_id_alone_keeps_rows(files):
    files.replace(
        "b1", _events(("e1", "2024-06-10T11:00:00Z", ""), ("e2", "2024-06-10T11:01:00Z", ""))
    )

    assert files.read("b1", columns=["broadcast_id"])["broadcast_id"].tolist() == ["b1", "b1"]


def test_read_no_columns_keeps_rows(files):
    files.replace(
        "b1", _events(("e1", "2024-06-10T11:00:00Z", ""), ("e2", "2024-06-10T11:01:00Z", ""))
    )

    frame = files.read("b1", columns=[])

    assert list(frame.columns) == []
    assert len(frame) == 2


def test_read_duplicate_column_rejected(files):
    files.replace("b1", _events(("e1", "2024-06-10T11:00:00Z", "")))

    with pytest.raises(ValueError, match=r"duplicate columns in the read: \['type'\]"):
        files.read("b1", columns=["type", "member_id", "type"])


def test_type_filter_takes_one_type_or_a_list(files):
    files.replace("b1", _events(("e1", "2024-06-10T11:00:00Z", "")))

    assert files.read("b1", types="chat")["event_id"].tolist() == ["e1"]
    with pytest.raises(ValueError, match="event types must be strings"):
        files.read("b1", types=[None])


def test_empty_naive_times_are_refused(files):
    empty = _events().assign(occurred_at=pd.Series(dtype="datetime64[us]"))

    with pytest.raises(ValueError, match="without a zone"):
        files.replace("b1", empty)
