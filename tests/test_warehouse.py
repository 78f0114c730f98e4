"""Warehouse writes and reads on SQLite and PostgreSQL: atomic replaces, instants, money, text."""

from __future__ import annotations

import stat

import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa

from livecrm_dagster.warehouse import Warehouse

NEW_YORK_SESSION = "options=-c%20TimeZone%3DAmerica/New_York"


def _lines(*rows: tuple[str, str, str]) -> pd.DataFrame:
    """Return raw_orders rows from (order_id, paid_at, product_id) tuples, one line each."""
    frame = pd.DataFrame(rows, columns=["order_id", "paid_at", "product_id"])
    frame["paid_at"] = pd.to_datetime(frame["paid_at"], utc=True, format="ISO8601")
    frame["line_no"] = 1
    frame["member_id"] = "m1"
    frame["status"] = "paid"
    return frame


def _sorted(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    return frame.sort_values(key).reset_index(drop=True)


def test_replace_partition_replaces_rows(warehouse_url):
    store = Warehouse(warehouse_url)
    store.replace_partition("raw_orders", "b1", _lines(("o1", "2024-06-10T11:00:00Z", "")))
    store.replace_partition("raw_orders", "b2", _lines(("o9", "2024-06-12T11:00:00Z", "")))
    store.replace_partition(
        "raw_orders",
        "b1",
        _lines(("o2", "2024-06-10T11:01:00Z", ""), ("o3", "2024-06-10T11:02:00Z", "")),
    )
    assert sorted(store.read("raw_orders", broadcast_id="b1")["order_id"]) == ["o2", "o3"]
    assert store.read("raw_orders", broadcast_id="b2")["order_id"].tolist() == ["o9"]


def test_failed_replace_keeps_previous_rows(warehouse_url):
    store = Warehouse(warehouse_url)
    store.replace_partition("raw_orders", "b1", _lines(("o1", "2024-06-10T11:00:00Z", "")))
    # o2 twice breaks the primary key (broadcast_id, order_id, line_no) after the delete has run.
    broken = _lines(("o2", "2024-06-10T11:01:00Z", ""), ("o2", "2024-06-10T11:02:00Z", ""))
    # NOTE: PostgreSQL's COPY runs on the driver's cursor, so its error is psycopg's own.
    with pytest.raises((sa.exc.IntegrityError, psycopg.IntegrityError)):
        store.replace_partition("raw_orders", "b1", broken)
    assert store.read("raw_orders", broadcast_id="b1")["order_id"].tolist() == ["o1"]


def test_write_for_other_partition_is_rejected(warehouse_url):
    store = Warehouse(warehouse_url)
    store.replace_partition("raw_orders", "b1", _lines(("o1", "2024-06-10T11:00:00Z", "")))
    stray = _lines(("o2", "2024-06-10T11:01:00Z", "")).assign(broadcast_id="b2")
    with pytest.raises(ValueError, match="rows outside broadcast_id='b1'"):
        store.replace_partition("raw_orders", "b1", stray)
    assert store.read("raw_orders", broadcast_id="b1")["order_id"].tolist() == ["o1"]


def test_unknown_column_is_rejected(warehouse_url):
    store = Warehouse(warehouse_url)
    frame = _lines(("o1", "2024-06-10T11:00:00Z", "")).assign(colour="red")
    with pytest.raises(ValueError, match=r"columns not in the table schema: \['colour'\]"):
        store.replace_partition("raw_orders", "b1", frame)


def test_empty_write_clears_partition(warehouse_url):
    store = Warehouse(warehouse_url)
    store.replace_partition("raw_orders", "b1", _lines(("o1", "2024-06-10T11:00:00Z", "")))
    store.replace_partition("raw_orders", "b1", _lines())
    assert store.read("raw_orders", broadcast_id="b1").empty


@pytest.fixture
def new_york_session_url(warehouse_url) -> str:
    """The warehouse URL; on PostgreSQL the session's TimeZone is America/New_York."""
    if warehouse_url.startswith("postgresql"):
        return f"{warehouse_url}?{NEW_YORK_SESSION}"
    return warehouse_url


def test_new_york_session_is_in_effect(postgres_url):
    store = Warehouse(f"{postgres_url}?{NEW_YORK_SESSION}")
    with store.engine.connect() as connection:
        assert connection.execute(sa.text("SHOW TimeZone")).scalar() == "America/New_York"


INSTANTS = [
    # Broadcast start in Tokyo.
    "2024-06-10T20:00:00+09:00",
    # Written in UTC, with microseconds.
    "2024-06-10T11:00:00.123456Z",
    # 02:30 in New York on 10 March 2024 does not exist locally, but this instant does.
    "2024-03-10T07:30:00Z",
    # 01:30 in New York on 3 November 2024 happens twice; this is the second one (EST).
    "2024-11-03T01:30:00-05:00",
    # Midnight in Tokyo is the previous day in UTC.
    "2024-06-11T00:00:00+09:00",
]


def test_times_round_trip_as_utc(new_york_session_url):
    store = Warehouse(new_york_session_url)
    rows = [(f"o{number}", instant, "") for number, instant in enumerate(INSTANTS)]
    store.replace_partition("raw_orders", "b1", _lines(*rows))
    stored = _sorted(store.read("raw_orders", broadcast_id="b1"), "order_id")
    expected = pd.to_datetime(pd.Series(INSTANTS), utc=True, format="ISO8601")
    assert str(stored["paid_at"].dt.tz) == "UTC"
    assert stored["paid_at"].tolist() == expected.tolist()


def test_time_condition_compares_instants(new_york_session_url):
    store = Warehouse(new_york_session_url)
    rows = [
        ("early", "2024-06-10T19:59:59+09:00", ""),
        ("start", "2024-06-10T20:00:00+09:00", ""),
        ("end", "2024-06-10T21:00:00+09:00", ""),
        ("late", "2024-06-10T21:00:01+09:00", ""),
    ]
    store.replace_partition("raw_orders", "b1", _lines(*rows))
    table = store.table("raw_orders")
    # The bounds are given in a third zone, New York daylight time.
    starts_at = pd.Timestamp("2024-06-10T07:00:00-04:00").to_pydatetime()
    ends_at = pd.Timestamp("2024-06-10T08:00:00-04:00").to_pydatetime()
    inside = store.query(
        "raw_orders",
        table.c.paid_at >= starts_at,
        table.c.paid_at <= ends_at,
    )
    assert sorted(inside["order_id"]) == ["end", "start"]


def test_missing_time_stays_missing(warehouse_url):
    store = Warehouse(warehouse_url)
    orders = pd.DataFrame(
        {
            "order_id": ["o1"],
            "line_no": [1],
            "member_id": ["m1"],
            "ordered_at": [pd.Timestamp("2024-06-10T11:00:00Z")],
            "paid_at": [pd.NaT],
            "status": ["pending"],
            "product_id": ["P-1"],
            "quantity": [1],
            "unit_price": [1000],
            "refund_of": [""],
        }
    )
    store.replace_table("orders", orders)
    assert pd.isna(store.read("orders").loc[0, "paid_at"])


@pytest.mark.parametrize(
    "amount",
    [
        # Above 2**31: 800 × ¥2,980,000 + ¥500,000.
        2_384_500_000,
        # The largest signed 64-bit integer.
        2**63 - 1,
        # A negative amount, as a credit note's sum could be.
        -(2**40),
        # Zero.
        0,
    ],
)
def test_bigint_money_round_trips(warehouse_url, amount):
    store = Warehouse(warehouse_url)
    kpis = pd.DataFrame([{"currency": "JPY", "revenue_during_live": amount}])
    store.replace_partition("broadcast_kpis", "b1", kpis)
    stored = store.read("broadcast_kpis", broadcast_id="b1")
    assert stored["revenue_during_live"].dtype == "Int64"
    assert int(stored.loc[0, "revenue_during_live"]) == amount


TEXTS = [
    # A tab between words.
    "size\tM",
    # A Unix and a Windows line break.
    "line one\nline two\r\nline three",
    # Backslashes, including a trailing one.
    "C:\\shop\\export\\",
    # The literal text COPY uses for NULL in its text format.
    "\\N",
    # A backslash before t and n, which COPY would read as a tab or newline if unescaped.
    "\\t and \\n",
    # Quotes and a comma, which matter in COPY's CSV format.
    "\"quoted\", 'single'",
    # Japanese text with a full-width space.
    "保湿クリーム　最高！",
    # An empty string is not NULL.
    "",
]


def test_text_survives_bulk_load(warehouse_url):
    store = Warehouse(warehouse_url)
    rows = [(f"o{number}", "2024-06-10T11:00:00Z", text) for number, text in enumerate(TEXTS)]
    store.replace_partition("raw_orders", "b1", _lines(*rows))
    stored = _sorted(store.read("raw_orders", broadcast_id="b1"), "order_id")
    assert stored["product_id"].tolist() == TEXTS


def test_null_text_stays_null(warehouse_url):
    store = Warehouse(warehouse_url)
    frame = _lines(("o1", "2024-06-10T11:00:00Z", "")).assign(product_id=[None])
    store.replace_partition("raw_orders", "b1", frame)
    assert store.read("raw_orders", broadcast_id="b1").loc[0, "product_id"] is None


def test_booleans_and_floats_round_trip(warehouse_url):
    store = Warehouse(warehouse_url)
    sessions = pd.DataFrame(
        {
            "member_id": ["m1", "m2"],
            "session_no": [1, 1],
            "started_at": pd.to_datetime(["2024-06-10T11:00:00Z"] * 2, utc=True),
            "ended_at": pd.to_datetime(["2024-06-10T11:24:50Z"] * 2, utc=True),
            "watched_seconds": [1490.0, 0.25],
            "events": [150, 1],
            "events_inside": [150, 1],
            "devices": [1, 2],
        }
    )
    store.replace_partition("viewing_sessions", "b1", sessions)
    stored = _sorted(store.read("viewing_sessions", broadcast_id="b1"), "member_id")
    assert stored["watched_seconds"].tolist() == [1490.0, 0.25]
    assert stored["devices"].tolist() == [1, 2]

    members = pd.DataFrame({"member_id": ["m1", "m2"]})
    members["consent_line"] = pd.array([True, pd.NA], dtype="boolean")
    store.replace_table("members", members)
    flags = _sorted(store.read("members"), "member_id")["consent_line"]
    assert flags[0]
    assert pd.isna(flags[1])


def test_new_sqlite_warehouse_is_private(tmp_path):
    store = Warehouse(f"sqlite:///{tmp_path / 'private.db'}")
    store.replace_table("members", pd.DataFrame({"member_id": ["m1"], "email": ["a@example.com"]}))

    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}

    assert modes["private.db"] == 0o600
    assert all(mode == 0o600 for name, mode in modes.items() if name.startswith("private.db-"))
