"""Reading file drops and checking rows against the data contract, without a warehouse."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from livecrm_dagster.defs.ingestion import events as events_module
from livecrm_dagster.defs.ingestion.events import validate_viewer_events
from livecrm_dagster.defs.ingestion.files import FILE, LINE, read_file, read_files
from livecrm_dagster.defs.ingestion.orders import validate_orders
from livecrm_dagster.defs.ingestion.reference import validate_broadcasts

STARTS_AT = pd.Timestamp("2024-06-10T20:00:00+09:00")
ENDS_AT = pd.Timestamp("2024-06-10T21:00:00+09:00")
TITLE = "夏のスキンケア特集 ～ 保湿クリーム"


def _rows(records: list[dict], file: str = "drop.csv") -> pd.DataFrame:
    """Return records as the file reader does: strings plus file and line columns."""
    frame = pd.DataFrame(records).fillna("").astype(str)
    frame[FILE] = file
    frame[LINE] = range(2, len(frame) + 2)
    return frame


def _event(event_id: str, occurred_at: str = "2024-06-10T20:10:00+09:00", **fields) -> dict:
    return {
        "event_id": event_id,
        "broadcast_id": "b1",
        "member_id": "m1",
        "type": "heartbeat",
        "occurred_at": occurred_at,
        **fields,
    }


def _validate_events(records: list[dict], zone: str | None = None):
    return validate_viewer_events(_rows(records), "b1", STARTS_AT, ENDS_AT, 24, zone)


def _order(order_id: str = "o1", **fields) -> dict:
    return {
        "order_id": order_id,
        "member_id": "m1",
        "ordered_at": "2024-06-10T20:10:00+09:00",
        "paid_at": "2024-06-10T20:12:00+09:00",
        "status": "paid",
        "product_id": "P-1",
        "quantity": "1",
        "unit_price": "1200",
        **fields,
    }


def _broadcast(broadcast_id: str, **fields) -> dict:
    return {
        "broadcast_id": broadcast_id,
        "title": "Summer skincare",
        "starts_at": "2024-06-10T20:00:00+09:00",
        "ends_at": "2024-06-10T21:00:00+09:00",
        **fields,
    }


@pytest.mark.parametrize(
    "encoding",
    [
        # Plain UTF-8.
        "utf-8",
        # UTF-8 with a byte order mark, as Excel saves it.
        "utf-8-sig",
        # Shift JIS as Windows writes it (CP932), as Japanese shop systems export.
        "cp932",
    ],
)
def test_csv_encodings_read_alike(source, encoding):
    path = source.csv(
        "broadcasts", "schedule.csv", [_broadcast("b1", title=TITLE)], encoding=encoding
    )
    rows, broken = read_files([path])
    assert rows.loc[0, "broadcast_id"] == "b1"
    assert rows.loc[0, "title"] == TITLE
    assert list(rows.columns[:2]) == ["broadcast_id", "title"]
    assert broken.empty


def test_undecodable_file_is_rejected(source):
    path = source.root / "broadcasts" / "broken.csv"
    path.parent.mkdir(parents=True)
    # 0x81 0x20 is neither UTF-8 nor a CP932 character.
    path.write_bytes(b"broadcast_id\n\x81\x20\n")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        read_file(path)


def test_invalid_json_line_is_quarantined(source):
    path = source.root / "viewer_events" / "events.jsonl"
    path.parent.mkdir(parents=True)
    lines = [
        json.dumps(_event("e1")),
        '{"event_id": "e2", "type": ',
        "[1, 2]",
        json.dumps(_event("e4")),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, broken = read_file(path)
    assert rows["event_id"].tolist() == ["e1", "e4"]
    assert rows[LINE].tolist() == [1, 4]
    assert broken[FILE].tolist() == [str(path), str(path)]
    assert broken[LINE].tolist() == [2, 3]
    assert broken.loc[0, "reason"].startswith("invalid JSON")
    assert broken.loc[1, "reason"] == "line is not a JSON object"


def test_half_emoji_escape_is_quarantined(source):
    path = source.root / "viewer_events" / "events.jsonl"
    path.parent.mkdir(parents=True)
    chat = json.dumps(_event("e1", type="chat")).replace('"e1"', '"e1", "text": "hi \\ud83d"')
    path.write_text(chat + "\n" + json.dumps(_event("e2")) + "\n", encoding="utf-8")

    rows, broken = read_file(path)

    assert rows["event_id"].tolist() == ["e2"]
    assert broken[LINE].tolist() == [1]
    assert broken.loc[0, "reason"] == "'text' contains a lone surrogate escape (half an emoji)"


def test_parquet_reads_as_strings(tmp_path):
    path = tmp_path / "orders.parquet"
    frame = pd.DataFrame(
        {
            "order_id": ["o1", "o2"],
            "member_id": ["000123", "000456"],
            "ordered_at": pd.to_datetime(
                ["2024-06-10T20:10:00+09:00", "2024-06-10T20:20:00+09:00"]
            ),
            # o2 is pending, so its payment time is null.
            "paid_at": pd.to_datetime(["2024-06-10T20:12:00+09:00", None]),
            "status": ["paid", "pending"],
            "product_id": ["P-1", "P-2"],
            "quantity": pd.array([2, 1], dtype="Int64"),
            "unit_price": pd.array([1500, 980], dtype="Int64"),
            "line_no": pd.array([1, None], dtype="Int64"),
        }
    )
    frame.to_parquet(path)

    rows, broken = read_file(path)
    assert broken.empty
    assert rows.loc[0, "member_id"] == "000123"
    assert rows.loc[0, "paid_at"] == "2024-06-10T20:12:00+09:00"
    assert rows.loc[1, "paid_at"] == ""
    assert rows.loc[1, "line_no"] == ""
    assert rows.loc[0, "quantity"] == "2"

    batch = validate_orders(rows)
    assert batch.quarantine.empty
    assert batch.lines["order_id"].tolist() == ["o1", "o2"]
    assert batch.lines.loc[0, "paid_at"] == pd.Timestamp("2024-06-10T11:12:00Z")
    assert pd.isna(batch.lines.loc[1, "paid_at"])


def test_time_without_offset_is_quarantined():
    batch = _validate_events([_event("e1", "2024-06-10T20:10:00"), _event("e2")])
    assert batch.events["event_id"].tolist() == ["e2"]
    assert batch.quarantine["record_key"].tolist() == ["e1"]
    assert batch.quarantine["field"].tolist() == ["occurred_at"]
    assert batch.quarantine["reason"].tolist() == [
        "occurred_at has no UTC offset and the source declares no time zone"
    ]


@pytest.mark.parametrize(
    "occurred_at",
    [
        # A date alone; its day "-10" is not an offset of minus ten hours.
        "2024-06-10",
        # A time of day without an offset.
        "2024-06-10T20:10:00",
        # Fractions of a second without an offset.
        "2024-06-10T20:10:00.250",
    ],
)
def test_missing_offset_names_the_field(occurred_at):
    batch = _validate_events([_event("e1", occurred_at)])
    assert batch.events.empty
    assert batch.quarantine["reason"].tolist() == [
        "occurred_at has no UTC offset and the source declares no time zone"
    ]


@pytest.mark.parametrize(
    ("occurred_at", "instant"),
    [
        # Extended format with a colon in the offset.
        ("2024-06-10T20:10:00+09:00", "2024-06-10T11:10:00Z"),
        # Basic format without separators.
        ("20240610T201000+0900", "2024-06-10T11:10:00Z"),
        # Z for UTC, with microseconds.
        ("2024-06-10T11:10:00.123456Z", "2024-06-10T11:10:00.123456Z"),
        # A space instead of T, and an hour-only offset.
        ("2024-06-10 20:10:00+09", "2024-06-10T11:10:00Z"),
    ],
)
def test_offset_forms_are_accepted(occurred_at, instant):
    batch = _validate_events([_event("e1", occurred_at)])
    assert batch.quarantine.empty
    assert batch.events.loc[0, "occurred_at"] == pd.Timestamp(instant)


def test_declared_zone_places_local_time():
    batch = _validate_events([_event("e1", "2024-06-10 20:10:00")], zone="Asia/Tokyo")
    assert batch.quarantine.empty
    assert batch.events.loc[0, "occurred_at"] == pd.Timestamp("2024-06-10T11:10:00Z")


def test_declared_zone_keeps_explicit_offset():
    # An explicit offset wins over the declared zone.
    batch = _validate_events([_event("e1", "2024-06-10T11:10:00Z")], zone="America/New_York")
    assert batch.events.loc[0, "occurred_at"] == pd.Timestamp("2024-06-10T11:10:00Z")


def test_ambiguous_local_time_is_quarantined():
    # 01:30 on 3 November 2024 happens twice in New York when the clocks go back.
    rows = _rows([_order(ordered_at="2024-11-03 01:30:00", paid_at="")])
    batch = validate_orders(rows.assign(status="pending"), zone="America/New_York")
    assert batch.quarantine["reason"].tolist() == [
        "ordered_at is ambiguous or does not exist in America/New_York (a clock change)"
    ]


def test_unparseable_time_is_quarantined():
    batch = _validate_events([_event("e1", "yesterday 8pm+09:00")])
    assert batch.quarantine["reason"].tolist() == [
        "occurred_at is not an ISO 8601 time: yesterday 8pm+09:00"
    ]


def test_unknown_event_type_is_quarantined():
    batch = _validate_events([_event("e1", type="dance"), _event("e2", type="like")])
    assert batch.events["event_id"].tolist() == ["e2"]
    assert batch.quarantine["reason"].tolist() == ["unknown event type: dance"]
    assert batch.quarantine["field"].tolist() == ["type"]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        # A product click must name the product.
        ({"type": "product_click"}, "product_id is missing on a product_click event"),
        # An answer must name the question.
        ({"type": "answer", "answer": "dry skin"}, "question_id is missing on a answer event"),
        # A coupon claim must carry the code.
        ({"type": "coupon_claim"}, "coupon_code is missing on a coupon_claim event"),
        # is_correct is a boolean or empty.
        (
            {"type": "answer", "question_id": "q1", "answer": "A", "is_correct": "maybe"},
            "is_correct is not true or false",
        ),
        # An event of another broadcast inside this broadcast's file.
        ({"broadcast_id": "b2"}, "broadcast_id does not match the broadcast being loaded"),
    ],
)
def test_incomplete_event_is_quarantined(fields, reason):
    batch = _validate_events([_event("e1", **fields)])
    assert batch.events.empty
    assert batch.quarantine["reason"].tolist() == [reason]


@pytest.mark.parametrize(
    ("occurred_at", "kept"),
    [
        # 24 h before the start is the earliest plausible instant.
        ("2024-06-09T20:00:00+09:00", True),
        # One second earlier is implausible.
        ("2024-06-09T19:59:59+09:00", False),
        # 24 h after the end is the latest plausible instant.
        ("2024-06-11T21:00:00+09:00", True),
        # A device clock years ahead.
        ("2031-01-01T00:00:00+09:00", False),
    ],
)
def test_implausible_event_time_is_quarantined(occurred_at, kept):
    batch = _validate_events([_event("e1", occurred_at)])
    assert len(batch.events) == int(kept)
    assert len(batch.quarantine) == int(not kept)


@pytest.mark.parametrize(
    ("quantity", "reason"),
    [
        # Negative quantity.
        ("-1", "quantity is below 1"),
        # Zero items.
        ("0", "quantity is below 1"),
        # A decimal is not a count.
        ("1.5", "quantity is not a whole number in ASCII digits: 1.5"),
    ],
)
def test_invalid_quantity_is_quarantined(quantity, reason):
    batch = validate_orders(_rows([_order(quantity=quantity)]))
    assert batch.lines.empty
    assert batch.quarantine["reason"].tolist() == [reason]
    assert batch.quarantine["field"].tolist() == ["quantity"]


@pytest.mark.parametrize(
    ("unit_price", "reason"),
    [
        # Thousands separator.
        ("1,200", "unit_price is not a whole number in ASCII digits: 1,200"),
        # Currency sign.
        ("¥1200", "unit_price is not a whole number in ASCII digits: ¥1200"),
        # A decimal amount instead of the smallest unit.
        ("12.50", "unit_price is not a whole number in ASCII digits: 12.50"),
        # Full-width digits as Japanese input methods type them.
        ("１２００", "unit_price is not a whole number in ASCII digits: １２００"),
        # Negative price.
        ("-100", "unit_price is negative"),
    ],
)
def test_invalid_money_is_quarantined(unit_price, reason):
    batch = validate_orders(_rows([_order(unit_price=unit_price)]))
    assert batch.quarantine["reason"].tolist() == [reason]


def test_paid_before_ordered_is_quarantined():
    rows = _rows(
        [_order(ordered_at="2024-06-10T20:10:00+09:00", paid_at="2024-06-10T20:09:59+09:00")]
    )
    batch = validate_orders(rows)
    assert batch.lines.empty
    assert batch.quarantine["reason"].tolist() == ["paid_at is before ordered_at"]
    assert batch.quarantine["field"].tolist() == ["paid_at"]


def test_paid_order_needs_paid_at():
    batch = validate_orders(_rows([_order(paid_at="")]))
    assert batch.quarantine["reason"].tolist() == ["paid_at is missing on a paid order"]


def test_pending_order_without_paid_at_is_valid():
    batch = validate_orders(_rows([_order(paid_at="", status="pending")]))
    assert batch.quarantine.empty
    assert batch.lines["status"].tolist() == ["pending"]


def test_unknown_order_status_is_quarantined():
    batch = validate_orders(_rows([_order(status="shipped")]))
    assert batch.quarantine["reason"].tolist() == ["unknown order status: shipped"]


def test_identical_duplicate_event_is_dropped():
    batch = _validate_events([_event("e1"), _event("e1"), _event("e1"), _event("e2")])
    assert batch.events["event_id"].tolist() == ["e1", "e2"]
    assert batch.duplicates_dropped == 2
    assert batch.quarantine.empty
    assert batch.rows_read == 4


def test_conflicting_duplicate_event_is_quarantined():
    records = [
        _event("e1", type="chat", text="love it"),
        _event("e1", type="chat", text="hate it"),
    ]
    batch = _validate_events(records)
    assert batch.events["text"].tolist() == ["love it"]
    assert batch.duplicates_dropped == 0
    assert batch.quarantine["record_key"].tolist() == ["e1"]
    assert batch.quarantine["line"].tolist() == [3]
    assert batch.quarantine["reason"].tolist() == [
        "conflicting duplicate: event_id already seen with another payload"
    ]


def test_duplicates_and_rejects_across_chunks_are_found(monkeypatch):
    # Three rows per chunk: the copies of e1 and e2 land in other chunks than the first.
    monkeypatch.setattr(events_module, "CHUNK_ROWS", 3)
    records = [
        _event("e1", type="chat", text="love it"),
        _event("e2"),
        _event("e3", type="teleport"),
        _event("e4"),
        _event("e1", type="chat", text="hate it"),
        _event("e2"),
        _event("e5"),
    ]

    batch = _validate_events(records)

    assert sorted(batch.events["event_id"]) == ["e1", "e2", "e4", "e5"]
    assert batch.events.loc[batch.events["event_id"] == "e1", "text"].tolist() == ["love it"]
    assert batch.duplicates_dropped == 1
    # File lines start at 2, after the header.
    quarantined = zip(batch.quarantine["record_key"], batch.quarantine["line"], strict=True)
    assert sorted(quarantined) == [
        ("e1", 6),
        ("e3", 4),
    ]
    assert batch.rows_read == 7


def test_repeated_order_export_is_merged():
    rows = pd.concat(
        [_rows([_order()], file="export-1.csv"), _rows([_order()], file="export-2.csv")],
        ignore_index=True,
    )
    batch = validate_orders(rows)
    assert len(batch.lines) == 1
    assert batch.duplicates_dropped == 1
    assert batch.quarantine.empty


def test_conflicting_order_export_is_quarantined():
    rows = pd.concat(
        [
            _rows([_order(unit_price="1200")], file="export-1.csv"),
            _rows([_order(unit_price="1300")], file="export-2.csv"),
        ],
        ignore_index=True,
    )
    batch = validate_orders(rows)
    assert batch.lines["unit_price"].tolist() == [1200]
    assert batch.quarantine["file"].tolist() == ["export-2.csv"]
    assert batch.quarantine["reason"].tolist() == [
        "conflicting duplicate: this order line was exported before with other values"
    ]


@pytest.mark.parametrize("writer", ["csv", "jsonl"])
def test_member_ids_keep_leading_zeros(source, writer):
    records = [_event("e1", member_id="000123"), _event("e2", member_id="0042")]
    getattr(source, writer)("viewer_events", f"events.{writer}", records)
    rows, _ = read_files(sorted((source.root / "viewer_events").iterdir()))
    batch = validate_viewer_events(rows, "b1", STARTS_AT, ENDS_AT, 24)
    assert batch.events["member_id"].tolist() == ["000123", "0042"]


def test_order_member_ids_keep_leading_zeros(source):
    path = source.csv("orders", "export.csv", [_order(member_id="000123")])
    rows, _ = read_files([path])
    assert validate_orders(rows).lines["member_id"].tolist() == ["000123"]


@pytest.mark.parametrize(
    "broadcast_id",
    [
        # A comma and a space.
        "SALE, 6/10",
        # A pipe.
        "b|013",
        # Slashes would nest folders.
        "b/2024/06",
        # Dots.
        "a...b",
        # A path that leaves the folder.
        "../x",
        # 65 characters, one over the limit.
        "b" * 65,
        # A full-width letter.
        "ｂ001",
    ],
)
def test_invalid_broadcast_id_is_quarantined(broadcast_id):
    schedule, quarantine = validate_broadcasts(
        _rows([_broadcast("b-20240610_1"), _broadcast(broadcast_id)])
    )
    assert schedule["broadcast_id"].tolist() == ["b-20240610_1"]
    assert quarantine["record_key"].tolist() == [broadcast_id]
    reason = quarantine.loc[0, "reason"]
    assert repr(broadcast_id) in reason
    assert "letters, digits, '-' or '_'" in reason


def test_longest_broadcast_id_is_valid():
    schedule, quarantine = validate_broadcasts(_rows([_broadcast("b" * 64)]))
    assert schedule["broadcast_id"].tolist() == ["b" * 64]
    assert quarantine.empty


@pytest.mark.parametrize(
    "ends_at",
    [
        # Ends at the instant it starts.
        "2024-06-10T20:00:00+09:00",
        # The same instant written in UTC.
        "2024-06-10T11:00:00Z",
        # Ends before it starts.
        "2024-06-10T19:00:00+09:00",
    ],
)
def test_broadcast_must_end_after_start(ends_at):
    schedule, quarantine = validate_broadcasts(_rows([_broadcast("b1", ends_at=ends_at)]))
    assert schedule.empty
    assert quarantine["reason"].tolist() == ["ends_at is not after starts_at"]
    assert quarantine["field"].tolist() == ["ends_at"]


def test_repeated_broadcast_row_counts_once():
    schedule, quarantine = validate_broadcasts(_rows([_broadcast("b1"), _broadcast("b1")]))
    assert schedule["broadcast_id"].tolist() == ["b1"]
    assert quarantine.empty


def test_broadcast_with_two_schedules_is_quarantined():
    rows = _rows([_broadcast("b1"), _broadcast("b1", ends_at="2024-06-10T22:00:00+09:00")])
    schedule, quarantine = validate_broadcasts(rows)
    assert schedule.empty
    assert (
        quarantine["reason"].tolist() == ["broadcast_id is listed twice with different values"] * 2
    )


def test_later_file_corrects_broadcast():
    first = _rows([_broadcast("b1")], file="broadcasts/2024-06-01.csv")
    # The correction moves the end by an hour and arrives in a later file.
    corrected = _rows(
        [_broadcast("b1", ends_at="2024-06-10T22:00:00+09:00")], file="broadcasts/2024-06-02.csv"
    )
    schedule, quarantine = validate_broadcasts(pd.concat([first, corrected], ignore_index=True))
    assert schedule["broadcast_id"].tolist() == ["b1"]
    assert schedule.loc[0, "ends_at"] == pd.Timestamp("2024-06-10T13:00:00Z")
    assert quarantine.empty


@pytest.mark.parametrize(
    ("archive_url", "expected"),
    [
        ("https://shop.example/live/b1", []),  # an ordinary link
        ("", []),  # no archive yet
        ("javascript:alert(1)", ["archive_url is not an http or https URL: javascript:alert(1)"]),
        ("file:///etc/passwd", ["archive_url is not an http or https URL: file:///etc/passwd"]),
    ],
)
def test_archive_url_must_be_web_link(archive_url, expected):
    _, quarantine = validate_broadcasts(_rows([_broadcast("b1", archive_url=archive_url)]))
    assert quarantine["reason"].tolist() == expected
