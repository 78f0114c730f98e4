"""Bad input files: each one either loads its good rows and quarantines the rest, or fails.

The corpus in `tests/bad_input/<input>/` contains one small file per fault. Each file is read
through the same helpers the ingestion assets use, so the outcome here is the outcome of
a real run: which rows load, which are quarantined (line, field, reason), or which error
stops the load. The schedule holds one broadcast, `b1`, 20:00 to 21:00 on 10 June 2024
(Asia/Tokyo).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from livecrm_dagster.defs.ingestion import assets
from livecrm_dagster.defs.ingestion.events import validate_viewer_events
from livecrm_dagster.defs.ingestion.files import (
    LINE,
    MAX_LINE_BYTES,
    InputFileError,
    read_file,
)
from livecrm_dagster.defs.ingestion.orders import validate_orders
from livecrm_dagster.defs.ingestion.reference import (
    validate_broadcasts,
    validate_members,
    validate_products,
)
from livecrm_dagster.resources import SourceResource

CORPUS = Path(__file__).parent / "bad_input"
BROADCAST_ID = "b1"
STARTS_AT = pd.Timestamp("2024-06-10T20:00:00+09:00")
ENDS_AT = pd.Timestamp("2024-06-10T21:00:00+09:00")
KEY_COLUMNS = {
    "viewer_events": "event_id",
    "orders": "order_id",
    "broadcasts": "broadcast_id",
    "members": "member_id",
    "products": "product_id",
}
NO_OFFSET = "has no UTC offset and the source declares no time zone"
ISO_REQUIRED = "must be an ISO 8601 time with a UTC offset; "
NOT_DIGITS = "is not a whole number in ASCII digits: "
GIB = 1024**3


@dataclass(frozen=True)
class Loads:
    """The file loads: these keys in output order, these rows quarantined."""

    keys: list[str]
    # (line, field, reason or its start); the field is empty for a line that could not
    # be read into fields at all.
    quarantined: list[tuple[int, str, str]] = field(default_factory=list)
    # Loaded values to check exactly, by column.
    values: dict[str, list] = field(default_factory=dict)


@dataclass(frozen=True)
class Fails:
    """The file is rejected with InputFileError; the message contains these parts."""

    parts: list[str]


CASES = [
    # --- viewer_events: times ---
    # A time of day without an offset.
    (
        "viewer_events/time_without_offset.csv",
        Loads(["e1"], [(3, "occurred_at", f"occurred_at {NO_OFFSET}")]),
    ),
    # 30 February does not exist.
    (
        "viewer_events/impossible_date.jsonl",
        Loads(
            ["e1"],
            [(2, "occurred_at", "occurred_at is not an ISO 8601 time: 2024-02-30T20:10:00+09:00")],
        ),
    ),
    # An ISO week date (2024-W24-1 is 10 June 2024) instead of a calendar date.
    (
        "viewer_events/week_date.jsonl",
        Loads(
            ["e1"],
            [(2, "occurred_at", "occurred_at is an ISO 8601 week date, which is not accepted")],
        ),
    ),
    # An ISO ordinal date (day 162 of 2024).
    (
        "viewer_events/ordinal_date.csv",
        Loads(
            ["e1"],
            [(3, "occurred_at", "occurred_at is an ISO 8601 ordinal date, which is not accepted")],
        ),
    ),
    # Epoch seconds as a JSON number, and as a string with a fraction.
    (
        "viewer_events/epoch_seconds.jsonl",
        Loads(
            ["e1"],
            [
                (
                    2,
                    "occurred_at",
                    f"occurred_at {ISO_REQUIRED}1718017800 looks like epoch seconds",
                ),
                (
                    3,
                    "occurred_at",
                    f"occurred_at {ISO_REQUIRED}1718017800.5 looks like epoch seconds",
                ),
            ],
        ),
    ),
    # Epoch milliseconds.
    (
        "viewer_events/epoch_milliseconds.csv",
        Loads(
            ["e1"],
            [
                (
                    3,
                    "occurred_at",
                    f"occurred_at {ISO_REQUIRED}1718017800000 looks like epoch milliseconds",
                )
            ],
        ),
    ),
    # Events in no particular order, one of them in UTC; all load, sorted by time.
    ("viewer_events/out_of_order.jsonl", Loads(["e1", "e2", "e3", "e4"])),
    # --- viewer_events: IDs ---
    # e1 three times: an identical copy is dropped, a copy with other text is quarantined.
    (
        "viewer_events/duplicate_ids_conflicting.jsonl",
        Loads(
            ["e1", "e2"],
            [(3, "event_id", "conflicting duplicate: event_id already seen with another payload")],
            {"text": ["love it", ""]},
        ),
    ),
    # An event of a broadcast that is not in the schedule.
    (
        "viewer_events/unknown_broadcast.csv",
        Loads(["e1"], [(3, "broadcast_id", "unknown broadcast: b404")]),
    ),
    # Member IDs with leading zeros stay strings.
    (
        "viewer_events/member_leading_zeros.csv",
        Loads(["e1", "e2"], values={"member_id": ["000123", "0042"]}),
    ),
    # Full-width member and product IDs are normalised to ASCII (NFKC).
    (
        "viewer_events/fullwidth_ids.csv",
        Loads(["e1", "e2"], values={"member_id": ["000123", "M042"], "product_id": ["P-1", ""]}),
    ),
    # --- viewer_events: encodings ---
    # CP932 (Shift JIS as Windows writes it).
    ("viewer_events/cp932.csv", Loads(["e1"], values={"text": ["乾燥肌が気になります"]})),
    # UTF-8 with a byte order mark; the first column is still named event_id.
    ("viewer_events/utf8_bom.csv", Loads(["e1"], values={"text": ["保湿クリーム最高"]})),
    # UTF-8 lines, then a CP932 line: the error names the first non-UTF-8 byte.
    (
        "viewer_events/mixed_encodings.csv",
        Fails(["mixed_encodings.csv", "mixed encodings", "line 3", "byte offset 141"]),
    ),
    # A CP932 line, then a UTF-8 line.
    (
        "viewer_events/mixed_encodings_cp932_first.jsonl",
        Fails(
            ["mixed_encodings_cp932_first.jsonl", "mixed encodings", "line 2", "byte offset 138"]
        ),
    ),
    # UTF-16 with a byte order mark.
    ("viewer_events/utf16.csv", Fails(["utf16.csv", "UTF-16", "byte offset 0"])),
    # UTF-16 without a byte order mark reads as text with a NUL after every character.
    (
        "viewer_events/utf16_without_bom.csv",
        Fails(["utf16_without_bom.csv", "line 1", "NUL", "UTF-16"]),
    ),
    # --- viewer_events: broken JSON Lines ---
    # The file ends in the middle of an object.
    (
        "viewer_events/truncated_json.jsonl",
        Loads(["e1", "e2"], [(3, "", "invalid JSON: Unterminated string")]),
    ),
    # A line that is a JSON array.
    ("viewer_events/array_line.jsonl", Loads(["e1", "e3"], [(2, "", "line is not a JSON object")])),
    # An escaped NUL (\u0000) inside a value, and a raw NUL byte in a line.
    (
        "viewer_events/nul_byte.jsonl",
        Loads(
            ["e1", "e4"],
            [
                (2, "", "member_id contains a NUL character"),
                (3, "", "line contains a NUL character"),
            ],
        ),
    ),
    # U+2028, U+0085, form feed and U+001C inside a string are not line breaks, so the
    # line numbers after them stay right.
    (
        "viewer_events/line_separators_in_text.jsonl",
        Loads(
            ["e1", "e2"],
            [(3, "occurred_at", "occurred_at is not an ISO 8601 time: not a time")],
            {"text": ["one\u2028two\u0085three\u000cfour\u001cfive", ""]},
        ),
    ),
    # The same key twice in one object; json.loads would keep the last silently.
    (
        "viewer_events/duplicate_key.jsonl",
        Loads(["e1"], [(2, "", "invalid JSON: key 'type' appears more than once in the object")]),
    ),
    # An object as a value, and an array of arrays.
    (
        "viewer_events/nested_value.jsonl",
        Loads(
            ["e1"],
            [
                (2, "", "member_id is a nested JSON value"),
                (3, "", "product_id is a nested JSON value"),
            ],
        ),
    ),
    # NaN is not JSON, although Python's json module reads it.
    (
        "viewer_events/nan_literal.jsonl",
        Loads(["e1"], [(2, "", "invalid JSON: NaN is not a JSON number")]),
    ),
    # A 5000-digit number, beyond what Python converts.
    (
        "viewer_events/huge_integer.jsonl",
        Loads(["e1"], [(2, "", "invalid JSON: a number has more digits than Python reads")]),
    ),
    # 100 000 opening brackets.
    (
        "viewer_events/deep_nesting.jsonl",
        Loads(["e1", "e3"], [(2, "", "invalid JSON: arrays or objects are nested too deeply")]),
    ),
    # --- viewer_events: empty files ---
    # 0 bytes.
    ("viewer_events/empty.csv", Loads([])),
    # A header and no rows.
    ("viewer_events/header_only.csv", Loads([])),
    # 0 bytes.
    ("viewer_events/empty.jsonl", Loads([])),
    # Blank lines only.
    ("viewer_events/blank_lines.jsonl", Loads([])),
    # 0 bytes with a Parquet name.
    ("viewer_events/empty.parquet", Loads([])),
    # --- viewer_events: broken CSV ---
    # No occurred_at column: every row is quarantined, none loads.
    (
        "viewer_events/missing_column.csv",
        Loads(
            [],
            [
                (2, "occurred_at", "occurred_at is missing"),
                (3, "occurred_at", "occurred_at is missing"),
            ],
        ),
    ),
    # A row with one field too many and a row cut short.
    (
        "viewer_events/ragged_rows.csv",
        Loads(
            ["e1", "e4"],
            [
                (3, "", "line has 7 fields but the header has 6"),
                (4, "", "line has 4 fields but the header has 6"),
            ],
        ),
    ),
    # A raw NUL byte inside a field.
    ("viewer_events/nul_byte.csv", Loads(["e1"], [(3, "", "text contains a NUL character")])),
    # A quoted value spanning two lines: the next row is reported at its real line, 4.
    (
        "viewer_events/multiline_quoted.csv",
        Loads(
            ["e1"],
            [(4, "type", "unknown event type: dance")],
            {"text": ["first line\nsecond line"]},
        ),
    ),
    # A quote opened on line 3 and never closed.
    ("viewer_events/unclosed_quote.csv", Fails(["unclosed_quote.csv", "line 3", "invalid CSV"])),
    # The column "type" twice in the header.
    (
        "viewer_events/duplicate_header.csv",
        Fails(["duplicate_header.csv", "line 1", "column 'type'"]),
    ),
    # A 200 000-byte field: longer than Python's default CSV field limit, within MAX_LINE_BYTES.
    ("viewer_events/long_field.csv", Loads(["e1"], values={"text": ["と" * 100_000]})),
    # Text with a .parquet name.
    (
        "viewer_events/not_parquet.parquet",
        Fails(["not_parquet.parquet", "not a readable Parquet file"]),
    ),
    # --- orders ---
    # Money with a thousands separator, yen signs (half and full width), full-width
    # digits and a decimal.
    (
        "orders/money_formats.csv",
        Loads(
            ["o1"],
            [
                (3, "unit_price", f"unit_price {NOT_DIGITS}1,200"),
                (4, "unit_price", f"unit_price {NOT_DIGITS}¥1200"),
                (5, "unit_price", f"unit_price {NOT_DIGITS}１２００"),
                (6, "unit_price", f"unit_price {NOT_DIGITS}12.50"),
                (7, "unit_price", f"unit_price {NOT_DIGITS}￥1200"),
            ],
        ),
    ),
    # Negative, zero, full-width, beyond int64, above the line cap, an amount above the
    # line cap, and an exponent.
    (
        "orders/quantities.csv",
        Loads(
            ["o1"],
            [
                (3, "quantity", "quantity is below 1"),
                (4, "quantity", "quantity is below 1"),
                (5, "quantity", f"quantity {NOT_DIGITS}３"),
                (6, "quantity", "quantity is out of range"),
                (7, "quantity", "quantity is above the maximum of 1,000,000,000,000,000"),
                (8, "unit_price", "quantity × unit_price is above the maximum line amount"),
                (9, "quantity", f"quantity {NOT_DIGITS}1e3"),
            ],
        ),
    ),
    # Paid one second before it was placed (the payment time in UTC).
    (
        "orders/paid_before_ordered.jsonl",
        Loads(["o1"], [(2, "paid_at", "paid_at is before ordered_at")]),
    ),
    # ordered_at and paid_at without an offset.
    (
        "orders/time_without_offset.csv",
        Loads(
            ["o1"],
            [(3, "ordered_at", f"ordered_at {NO_OFFSET}"), (4, "paid_at", f"paid_at {NO_OFFSET}")],
        ),
    ),
    # paid_at in epoch milliseconds, ordered_at in epoch seconds.
    (
        "orders/epoch_times.csv",
        Loads(
            ["o1"],
            [
                (
                    3,
                    "paid_at",
                    f"paid_at {ISO_REQUIRED}1718017920000 looks like epoch milliseconds",
                ),
                (4, "ordered_at", f"ordered_at {ISO_REQUIRED}1718017800 looks like epoch seconds"),
            ],
        ),
    ),
    # Full-width order, member and product IDs; the leading zero stays.
    (
        "orders/fullwidth_ids.csv",
        Loads(["O-1", "o2"], values={"member_id": ["042", "0042"], "product_id": ["P-1", "P-1"]}),
    ),
    # CP932 with a Japanese note column.
    ("orders/cp932.csv", Loads(["o1"], values={"quantity": [2], "unit_price": [1200]})),
    # No quantity column: every row is quarantined.
    (
        "orders/missing_quantity_column.csv",
        Loads([], [(2, "quantity", "quantity is missing"), (3, "quantity", "quantity is missing")]),
    ),
    # A header and no rows.
    ("orders/header_only.csv", Loads([])),
    # --- broadcasts ---
    # b2 ends an hour before it starts.
    (
        "broadcasts/ends_before_start.csv",
        Loads(["b1"], [(3, "ends_at", "ends_at is not after starts_at")]),
    ),
    # starts_at as an ISO week date.
    (
        "broadcasts/week_date.csv",
        Loads(
            ["b1"], [(3, "starts_at", "starts_at is an ISO 8601 week date, which is not accepted")]
        ),
    ),
    # starts_at in epoch seconds.
    (
        "broadcasts/epoch_start.jsonl",
        Loads(
            ["b1"],
            [(2, "starts_at", f"starts_at {ISO_REQUIRED}1718103600 looks like epoch seconds")],
        ),
    ),
    # UTF-8 with a byte order mark and a Japanese title.
    ("broadcasts/utf8_bom.csv", Loads(["b1"], values={"title": ["夏のスキンケア特集"]})),
    # A full-width broadcast ID is not normalised: it names partitions and folders.
    (
        "broadcasts/fullwidth_id.csv",
        Loads(["b1"], [(3, "broadcast_id", "broadcast_id 'ｂ００２' is invalid")]),
    ),
    # --- members ---
    # 000123 listed again in full-width digits is the same member.
    (
        "members/leading_zeros_and_widths.csv",
        Loads(["000123", "0042"], [(3, "member_id", "member_id is listed twice")]),
    ),
    # 30 February, month first, a time with an offset, and a week date.
    (
        "members/birth_dates.csv",
        Loads(
            ["m1"],
            [
                (3, "birth_date", "birth_date is not a date (YYYY-MM-DD)"),
                (4, "birth_date", "birth_date is not a date (YYYY-MM-DD)"),
                (5, "birth_date", "birth_date is not a date (YYYY-MM-DD)"),
                (6, "birth_date", "birth_date is not a date (YYYY-MM-DD)"),
            ],
        ),
    ),
    # CP932 with a leading-zero member ID.
    ("members/cp932.csv", Loads(["0007"], values={"consent_email": [True]})),
    # --- products ---
    # P-1 again in full width, full-width stock, stock beyond int64.
    (
        "products/numbers_and_widths.csv",
        Loads(
            ["P-1"],
            [
                (3, "product_id", "product_id is listed twice"),
                (4, "stock", f"stock {NOT_DIGITS}１０"),
                (5, "stock", "stock is out of range"),
            ],
        ),
    ),
    # A header and no rows.
    ("products/header_only.csv", Loads([])),
    # The last line is cut off.
    ("products/truncated.jsonl", Loads(["P-1"], [(2, "", "invalid JSON: Unterminated string")])),
]


def _load(relative: str, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load one corpus file as the ingestion assets do; return (valid rows, quarantine)."""
    input_name = relative.split("/")[0]
    folder = root / input_name
    folder.mkdir(parents=True)
    shutil.copy(CORPUS / relative, folder)
    source = SourceResource(folder=str(root))
    if input_name == "viewer_events":
        unplaced = assets._unplaced_events(source, {BROADCAST_ID})
        rows, unreadable = assets._event_rows(source, BROADCAST_ID)
        batch = validate_viewer_events(rows, BROADCAST_ID, STARTS_AT, ENDS_AT, 24)
        return batch.events, pd.concat([unplaced, unreadable, batch.quarantine], ignore_index=True)
    rows, unreadable = assets._read_folder(source, input_name)
    if input_name == "orders":
        batch = validate_orders(rows)
        valid, quarantine = batch.lines, batch.quarantine
    elif input_name == "broadcasts":
        valid, quarantine = validate_broadcasts(rows)
    elif input_name == "members":
        valid, quarantine = validate_members(rows)
    else:
        valid, quarantine = validate_products(rows)
    return valid, pd.concat([unreadable, quarantine], ignore_index=True)


def test_corpus_has_a_case_per_file():
    files = sorted(str(path.relative_to(CORPUS)) for path in CORPUS.rglob("*") if path.is_file())
    assert sorted(relative for relative, _ in CASES) == files
    assert len(files) >= 40


@pytest.mark.parametrize(("relative", "expected"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_outcome(relative, expected, tmp_path):
    if isinstance(expected, Fails):
        with pytest.raises(InputFileError) as raised:
            _load(relative, tmp_path / "source")
        for part in expected.parts:
            assert part in str(raised.value)
        return

    valid, quarantine = _load(relative, tmp_path / "source")
    key_column = KEY_COLUMNS[relative.split("/")[0]]
    assert valid[key_column].tolist() == expected.keys
    quarantine = quarantine.sort_values("line", kind="stable")
    assert quarantine["line"].tolist() == [line for line, _, _ in expected.quarantined]
    assert quarantine["field"].tolist() == [name for _, name, _ in expected.quarantined]
    for reason, (_, _, start) in zip(quarantine["reason"], expected.quarantined, strict=True):
        assert reason.startswith(start)
    assert set(quarantine["file"]) <= {str(tmp_path / "source" / relative)}
    for column, values in expected.values.items():
        assert valid[column].tolist() == values


def _write_json_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _event_line(event_id: str) -> str:
    event = {
        "event_id": event_id,
        "broadcast_id": BROADCAST_ID,
        "member_id": "m1",
        "type": "chat",
        "occurred_at": "2024-06-10T20:10:00+09:00",
    }
    return json.dumps(event)


def test_line_at_limit_loads(tmp_path):
    path = tmp_path / "events.jsonl"
    line = _event_line("e1")
    padded = line[:-1] + ', "text": "' + "a" * (MAX_LINE_BYTES - len(line) - 12) + '"}'
    assert len(padded) == MAX_LINE_BYTES
    _write_json_lines(path, [padded])
    rows, broken = read_file(path)
    assert rows["event_id"].tolist() == ["e1"]
    assert broken.empty


def test_over_long_json_line_is_quarantined(tmp_path):
    path = tmp_path / "events.jsonl"
    _write_json_lines(path, [_event_line("e1"), "a" * (MAX_LINE_BYTES + 1), _event_line("e3")])
    rows, broken = read_file(path)
    assert rows["event_id"].tolist() == ["e1", "e3"]
    assert rows[LINE].tolist() == [1, 3]
    assert broken[LINE].tolist() == [2]
    assert broken["reason"].tolist() == [f"line 2 is longer than {MAX_LINE_BYTES} bytes"]


def test_over_long_csv_line_is_rejected(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("event_id,text\ne1,short\ne2," + "a" * MAX_LINE_BYTES + "\n")
    with pytest.raises(InputFileError) as raised:
        read_file(path)
    assert str(path) in str(raised.value)
    assert f"line 3 is longer than {MAX_LINE_BYTES} bytes" in str(raised.value)


# Reads the file given as argv[1] in a fresh interpreter and prints the outcome with the
# growth of the peak resident set size (ru_maxrss, KiB on Linux) during the read.
_MEASURE = """
import json, resource, sys
from pathlib import Path
from livecrm_dagster.defs.ingestion.files import InputFileError, read_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    rows, broken = read_file(Path(sys.argv[1]))
    outcome = {"rows": rows["event_id"].tolist(), "broken": broken["reason"].tolist()}
except InputFileError as error:
    outcome = {"error": str(error)}
outcome["peak_growth_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps(outcome))
"""


def _measure_read(path: Path) -> dict:
    finished = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(finished.stdout)


def test_one_gib_json_line_stays_small(tmp_path):
    path = tmp_path / "events.jsonl"
    chunk = b"a" * (1024 * 1024)
    with path.open("wb") as handle:
        handle.write((_event_line("e1") + "\n").encode())
        for _ in range(GIB // len(chunk)):
            handle.write(chunk)
    outcome = _measure_read(path)
    assert outcome["rows"] == ["e1"]
    assert outcome["broken"] == [f"line 2 is longer than {MAX_LINE_BYTES} bytes"]
    # The reader keeps at most one line of MAX_LINE_BYTES (1 MiB) in memory.
    assert outcome["peak_growth_kib"] < 64 * 1024


def test_one_gib_csv_line_stays_small(tmp_path):
    path = tmp_path / "events.csv"
    with path.open("wb") as handle:
        handle.write(b"event_id,text\ne1,")
        # A sparse file: 1 GiB of NUL bytes with no newline, without writing them to disk.
        handle.truncate(GIB)
    outcome = _measure_read(path)
    assert "line 2 is longer than" in outcome["error"]
    assert str(path) in outcome["error"]
    assert outcome["peak_growth_kib"] < 64 * 1024
