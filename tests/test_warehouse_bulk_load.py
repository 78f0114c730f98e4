"""Bulk writes on SQLite (executemany) and PostgreSQL (binary COPY): values round-trip exactly."""

from __future__ import annotations

import datetime as dt
import math
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa

from livecrm_dagster import bulk_load
from livecrm_dagster.tables import SCHEMAS
from livecrm_dagster.warehouse import Warehouse

NEW_YORK_SESSION = "options=-c%20TimeZone%3DAmerica/New_York"


def _summary(rows: int, **columns: object) -> pd.DataFrame:
    """Return viewer_summary rows for members m0, m1, ... with the given columns."""
    frame = pd.DataFrame({"member_id": [f"m{number}" for number in range(rows)]})
    for column, values in columns.items():
        frame[column] = values
    return frame


def _stored(store: Warehouse, name: str = "viewer_summary") -> pd.DataFrame:
    stored = store.read(name, broadcast_id="b1")
    order = stored["member_id"].str.slice(1).astype(int).argsort()
    return stored.iloc[order].reset_index(drop=True)


@pytest.fixture
def new_york_session_url(warehouse_url) -> str:
    """The warehouse URL; on PostgreSQL the session's TimeZone is America/New_York."""
    if warehouse_url.startswith("postgresql"):
        return f"{warehouse_url}?{NEW_YORK_SESSION}"
    return warehouse_url


TEXTS = [
    # Quotes and a comma, which CSV would have to escape.
    "\"quoted\", 'single'",
    # Unix, Windows and old Mac line breaks.
    "line one\nline two\r\nline three\rline four",
    # A tab, and backslashes including a trailing one.
    "size\tM C:\\shop\\export\\",
    # The text COPY's text format reads as NULL.
    "\\N",
    # COPY's end-of-data marker alone on a line inside a value.
    "before\n\\.\nafter",
    # Japanese with a full-width space, and an emoji outside the Basic Multilingual Plane.
    "保湿クリーム　最高！ 💄",
    # An empty string is not NULL.
    "",
    # NULL.
    None,
    # A long value, longer than any buffer size involved.
    "x" * 100_000,
]


def test_text_round_trips(warehouse_url):
    store = Warehouse(warehouse_url)
    store.replace_partition("viewer_summary", "b1", _summary(len(TEXTS), answers=TEXTS))
    assert _stored(store)["answers"].tolist() == TEXTS


def test_non_string_text_stored_as_str(warehouse_url):
    store = Warehouse(warehouse_url)
    frame = _summary(3, answers=pd.Series([5, 2.5, True], dtype=object))
    store.replace_partition("viewer_summary", "b1", frame)
    assert _stored(store)["answers"].tolist() == ["5", "2.5", "True"]


INSTANTS = [
    # Broadcast start in Tokyo.
    pd.Timestamp("2024-06-10T20:00:00+09:00"),
    # UTC with microseconds.
    pd.Timestamp("2024-06-10T11:00:00.123456Z"),
    # 02:30 in New York on 10 March 2024 does not exist locally, but this instant does.
    pd.Timestamp("2024-03-10T07:30:00Z"),
    # 01:30 in New York on 3 November 2024 happens twice; this is the second one (EST).
    pd.Timestamp("2024-11-03T01:30:00-05:00"),
    # One microsecond before the Unix epoch.
    pd.Timestamp("1969-12-31T23:59:59.999999Z"),
    # Before PostgreSQL's epoch of 2000-01-01, and far after it.
    pd.Timestamp("1900-01-01T00:00:00.000001Z"),
    pd.Timestamp("2200-12-31T23:59:59.999999Z"),
]


def test_times_round_trip_at_microseconds(new_york_session_url):
    store = Warehouse(new_york_session_url)
    zoned = pd.Series(INSTANTS).map(lambda instant: instant.tz_convert("Asia/Tokyo"))
    frame = _summary(len(INSTANTS), first_seen_at=zoned.astype("datetime64[us, Asia/Tokyo]"))
    store.replace_partition("viewer_summary", "b1", frame)
    stored = _stored(store)["first_seen_at"]
    assert str(stored.dt.tz) == "UTC"
    assert stored.tolist() == [instant.tz_convert("UTC") for instant in INSTANTS]


def test_time_objects_with_any_zone_round_trip(warehouse_url):
    store = Warehouse(warehouse_url)
    instants = [
        dt.datetime(2024, 6, 10, 20, 0, 0, 1, tzinfo=ZoneInfo("Asia/Tokyo")),
        dt.datetime(2024, 6, 10, 7, 0, tzinfo=dt.timezone(dt.timedelta(hours=-4))),
        None,
    ]
    store.replace_partition("viewer_summary", "b1", _summary(3, paid_at=instants))
    stored = _stored(store)["paid_at"]
    assert stored[0] == pd.Timestamp("2024-06-10T11:00:00.000001Z")
    assert stored[1] == pd.Timestamp("2024-06-10T11:00:00Z")
    assert pd.isna(stored[2])


def test_missing_times_stay_missing(warehouse_url):
    store = Warehouse(warehouse_url)
    times = pd.Series([pd.Timestamp("2024-06-10T11:00:00Z"), pd.NaT], dtype="datetime64[us, UTC]")
    store.replace_partition("viewer_summary", "b1", _summary(2, paid_at=times))
    stored = _stored(store)
    assert stored.loc[0, "paid_at"] == pd.Timestamp("2024-06-10T11:00:00Z")
    assert pd.isna(stored.loc[1, "paid_at"])
    # first_seen_at is not in the frame at all.
    assert stored["first_seen_at"].isna().all()


def test_nanoseconds_are_floored_to_microseconds(warehouse_url):
    store = Warehouse(warehouse_url)
    times = pd.Series(
        pd.to_datetime(["2024-06-10T11:00:00.123456789Z", "1969-12-31T23:59:59.999999999Z"])
    ).astype("datetime64[ns, UTC]")
    store.replace_partition("viewer_summary", "b1", _summary(2, first_seen_at=times))
    assert _stored(store)["first_seen_at"].tolist() == [
        pd.Timestamp("2024-06-10T11:00:00.123456Z"),
        pd.Timestamp("1969-12-31T23:59:59.999999Z"),
    ]


@pytest.mark.parametrize(
    "times",
    [
        # A naive datetime64 column.
        pd.Series(pd.to_datetime(["2024-06-10T11:00:00"])),
        # Naive datetime objects in an object column.
        pd.Series([dt.datetime(2024, 6, 10, 11, 0)], dtype=object),
        # A time written as text.
        pd.Series(["2024-06-10T11:00:00Z"], dtype=object),
    ],
)
def test_times_without_zone_are_rejected(warehouse_url, times):
    store = Warehouse(warehouse_url)
    store.replace_partition("viewer_summary", "b1", _summary(1, answers="kept"))
    with pytest.raises(ValueError, match="'first_seen_at'") as raised:
        store.replace_partition("viewer_summary", "b1", _summary(1, first_seen_at=times))
    assert "with a zone" in str(raised.value) or "without a zone" in str(raised.value)
    assert _stored(store)["answers"].tolist() == ["kept"]


def test_integers_with_null_round_trip(warehouse_url):
    store = Warehouse(warehouse_url)
    amounts = pd.array([2**63 - 1, -(2**63), 0, -1, None, 2_384_500_000], dtype="Int64")
    # Whole floats, as a pandas merge leaves integer columns with a gap.
    items = [3.0, np.nan, 0.0, -7.0, 1.0, 2.0]
    store.replace_partition("viewer_summary", "b1", _summary(6, amount=amounts, items=items))
    stored = _stored(store)
    assert stored["amount"].dtype == "Int64"
    assert stored["amount"].tolist() == [2**63 - 1, -(2**63), 0, -1, pd.NA, 2_384_500_000]
    assert stored["items"].tolist() == [3, pd.NA, 0, -7, 1, 2]


def test_fractional_integers_are_rejected(warehouse_url):
    store = Warehouse(warehouse_url)
    with pytest.raises(ValueError, match=r"column 'amount' \(int\): cannot safely cast"):
        store.replace_partition("viewer_summary", "b1", _summary(1, amount=[2.5]))


FLOATS = [
    0.1 + 0.2,
    1 / 3,
    # The smallest subnormal and the largest finite double.
    5e-324,
    1.7976931348623157e308,
    -2.5e-300,
    1490.0,
    math.inf,
    -math.inf,
]


def test_floats_round_trip_exactly(warehouse_url):
    store = Warehouse(warehouse_url)
    rng = np.random.default_rng(20241120)
    values = FLOATS + rng.standard_normal(50).tolist() + (rng.random(50) * 1e6).tolist()
    frame = _summary(len(values) + 1, viewing_rate=[*values, np.nan])
    store.replace_partition("viewer_summary", "b1", frame)
    stored = _stored(store)["viewing_rate"]
    assert [repr(value) for value in stored[:-1]] == [repr(value) for value in values]
    # NaN is how pandas marks a missing float, so it is stored as NULL.
    assert pd.isna(stored.iloc[-1])


def test_missing_floats_stored_as_null(warehouse_url):
    store = Warehouse(warehouse_url)
    rates = pd.Series([0.5, pd.NA, None, np.nan, -0.0], dtype=object)
    store.replace_partition("viewer_summary", "b1", _summary(5, viewing_rate=rates))
    stored = _stored(store)["viewing_rate"]
    assert stored.iloc[0] == 0.5
    assert stored.iloc[1:4].isna().all()
    assert stored.iloc[4] == 0.0


def test_booleans_with_null_round_trip(warehouse_url):
    store = Warehouse(warehouse_url)
    claimed = pd.array([True, False, None], dtype="boolean")
    bought = pd.Series([False, None, True], dtype=object)
    frame = _summary(3, coupon_claimed=claimed, bought_during_live=bought)
    store.replace_partition("viewer_summary", "b1", frame)
    stored = _stored(store)
    assert stored["coupon_claimed"].tolist() == [True, False, pd.NA]
    assert stored["bought_during_live"].tolist() == [False, pd.NA, True]


def _sessions(rows: int) -> pd.DataFrame:
    starts = pd.Timestamp("2024-06-10T11:00:00Z") + pd.to_timedelta(np.arange(rows), unit="us")
    return pd.DataFrame(
        {
            "member_id": [f"m{number // 3}" for number in range(rows)],
            "session_no": np.arange(rows) % 3 + 1,
            "started_at": starts,
            "ended_at": starts + pd.Timedelta(seconds=90.5),
            "watched_seconds": np.arange(rows) / 7,
            "events": pd.array(np.where(np.arange(rows) % 5 == 0, None, np.arange(rows)), "Int64"),
            "events_inside": np.arange(rows),
            "devices": 1,
        }
    )


def test_multi_chunk_write_round_trips(warehouse_url):
    store = Warehouse(warehouse_url)
    written = _sessions(2 * bulk_load.CHUNK_ROWS + 7)
    store.replace_partition("viewing_sessions", "b1", written)
    stored = store.read("viewing_sessions", broadcast_id="b1")
    stored = stored.sort_values(["member_id", "session_no"], key=_natural).reset_index(drop=True)
    expected = written.assign(broadcast_id="b1")[stored.columns]
    pd.testing.assert_frame_equal(stored, expected, check_dtype=False)


def test_bad_later_chunk_keeps_rows(warehouse_url):
    store = Warehouse(warehouse_url)
    previous = _sessions(5)
    store.replace_partition("viewing_sessions", "b1", previous)
    broken = _sessions(bulk_load.CHUNK_ROWS + 7)
    # The first chunk goes in before the second one's NUL is found.
    broken.loc[bulk_load.CHUNK_ROWS + 3, "member_id"] = "m\x00"
    with pytest.raises(ValueError, match="NUL"):
        store.replace_partition("viewing_sessions", "b1", broken)
    stored = store.read("viewing_sessions", broadcast_id="b1")
    assert sorted(stored["started_at"]) == sorted(previous["started_at"])


def _natural(column: pd.Series) -> pd.Series:
    return column.str.slice(1).astype(int) if column.name == "member_id" else column


def test_failed_write_keeps_previous_rows(warehouse_url):
    store = Warehouse(warehouse_url)
    store.replace_partition("viewer_summary", "b1", _summary(2, answers="old"))
    # m0 twice breaks the primary key (broadcast_id, member_id) after the delete has run.
    broken = pd.concat([_summary(2, answers="new"), _summary(1, answers="new")])
    # NOTE: PostgreSQL's COPY runs on the driver's cursor, so its error is psycopg's own.
    with pytest.raises((sa.exc.IntegrityError, psycopg.IntegrityError)):
        store.replace_partition("viewer_summary", "b1", broken)
    assert _stored(store)["answers"].tolist() == ["old", "old"]


def test_time_bounds_select_bulk_written_rows(new_york_session_url):
    store = Warehouse(new_york_session_url)
    times = pd.to_datetime(
        [
            "2024-06-10T19:59:59.999999+09:00",
            "2024-06-10T20:00:00+09:00",
            "2024-06-10T21:00:00+09:00",
            "2024-06-10T21:00:00.000001+09:00",
        ],
        utc=True,
        format="ISO8601",
    )
    store.replace_partition("viewer_summary", "b1", _summary(4, first_seen_at=times))
    column = store.table("viewer_summary").c.first_seen_at
    # The bounds are given in a third zone, New York daylight time.
    starts_at = pd.Timestamp("2024-06-10T07:00:00-04:00").to_pydatetime()
    ends_at = pd.Timestamp("2024-06-10T08:00:00-04:00").to_pydatetime()
    inside = store.query("viewer_summary", column >= starts_at, column <= ends_at)
    assert sorted(inside["member_id"]) == ["m1", "m2"]


def test_latin1_client_round_trips_text(postgres_url):
    store = Warehouse(f"{postgres_url}?client_encoding=latin1")
    with store.engine.connect() as connection:
        assert connection.execute(sa.text("SHOW client_encoding")).scalar() == "LATIN1"
    texts = ["café", 'naïve "quoted", ½', ""]
    store.replace_partition("viewer_summary", "b1", _summary(3, answers=texts))
    assert _stored(store)["answers"].tolist() == texts


def test_partition_keys_start_with_broadcast_id():
    """A partition write deletes by broadcast_id, which the primary key's index then serves."""
    for name, (columns, keys) in SCHEMAS.items():
        if "broadcast_id" in dict(columns):
            assert keys[0] == "broadcast_id", name


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        # PostgreSQL's text type cannot hold NUL; SQLite could, but both reject it alike.
        ("member_id", "a\x00b", r"column 'member_id' \(text\): text contains a NUL character"),
        # Half of a surrogate pair is no Unicode text in any database.
        ("member_id", "hi \ud83d", r"column 'member_id' \(text\)"),
        # A fraction in an integer column.
        ("session_no", 1.5, r"column 'session_no' \(int\)"),
        # Beyond the 64-bit range of bigint.
        ("events", 2**63, r"column 'events' \(int\)"),
    ],
)
def test_bad_value_names_its_column(warehouse_url, column, value, message):
    store = Warehouse(warehouse_url)
    sessions = pd.DataFrame(
        {
            "member_id": ["m1"],
            "session_no": [1],
            "started_at": pd.to_datetime(["2024-06-10T11:00:00Z"]),
            "ended_at": pd.to_datetime(["2024-06-10T11:01:00Z"]),
            "watched_seconds": [60.0],
            "events": [7],
            "events_inside": [7],
            "devices": [1],
        }
    )
    store.replace_partition("viewing_sessions", "b1", sessions)
    broken = sessions.astype({column: object})
    broken.loc[0, column] = value

    with pytest.raises(ValueError, match=message):
        store.replace_partition("viewing_sessions", "b1", broken)

    assert store.read("viewing_sessions", broadcast_id="b1")["member_id"].tolist() == ["m1"]
