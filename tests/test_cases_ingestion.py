"""Known input failure modes, run through the main job on SQLite and PostgreSQL.

One source folder contains a broadcast per case, each with its own members, so the
cases do not touch each other. The job runs once per database. Then a second delivery
of events arrives for C07, and C07 and C08 are built again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dagster as dg
import pandas as pd
import pytest

from livecrm_dagster.defs.partitions import broadcast_partitions
from livecrm_dagster.pipeline import pipeline_resources, run_main_job
from livecrm_dagster.warehouse import Warehouse
from tests.conftest import SourceFolder, heartbeats

C06, C07, C08, C09, C10, C15 = "c06", "c07", "c08", "c09", "c10", "c15-orders"
ZERO_LENGTH = "c15-zero"
VALID_ID = "b-20240610_1"
INVALID_IDS = ["SALE, 6/10", "b|013", "b/2024/06", "a...b", "../x"]
ALLOWED_CHARACTERS = "letters, digits, '-' or '_'"
HOUR = 3600.0
PER_BROADCAST_TABLES = [
    "raw_viewer_events",
    "raw_orders",
    "viewing_sessions",
    "order_attribution",
    "viewer_summary",
    "broadcast_kpis",
    "followup_audience",
]


def _broadcast(broadcast_id: str, starts_at: str, ends_at: str) -> dict:
    return {
        "broadcast_id": broadcast_id,
        "title": f"Case {broadcast_id}",
        "starts_at": starts_at,
        "ends_at": ends_at,
        "featured_product_ids": "P-1",
        "archive_url": "https://shop.example/live/archive",
    }


def _order(order_id, member_id, paid_at, quantity, unit_price, status="paid", ordered_at=None):
    return {
        "order_id": order_id,
        "member_id": member_id,
        "ordered_at": ordered_at or paid_at,
        "paid_at": paid_at,
        "status": status,
        "product_id": "P-1",
        "quantity": quantity,
        "unit_price": unit_price,
    }


def _event(event_id, broadcast_id, member_id, event_type, occurred_at, **fields) -> dict:
    return {
        "event_id": event_id,
        "broadcast_id": broadcast_id,
        "member_id": member_id,
        "type": event_type,
        "occurred_at": occurred_at,
        **fields,
    }


def _write_schedule(source: SourceFolder) -> None:
    june_10 = ("2024-06-10T20:00:00+09:00", "2024-06-10T21:00:00+09:00")
    rows = [
        _broadcast(C06, *june_10),
        _broadcast(C07, "2024-06-10T23:30:00+09:00", "2024-06-11T00:30:00+09:00"),
        _broadcast(C08, "2024-06-12T20:00:00+09:00", "2024-06-12T21:00:00+09:00"),
        _broadcast(C09, *june_10),
        _broadcast(C10, "2024-06-16T20:00:00+09:00", "2024-06-16T21:00:00+09:00"),
        _broadcast(VALID_ID, "2024-06-18T20:00:00+09:00", "2024-06-18T21:00:00+09:00"),
        *[
            _broadcast(bad_id, "2024-06-18T20:00:00+09:00", "2024-06-18T21:00:00+09:00")
            for bad_id in INVALID_IDS
        ],
        _broadcast(ZERO_LENGTH, "2024-06-19T20:00:00+09:00", "2024-06-19T20:00:00+09:00"),
        _broadcast(C15, "2024-06-20T20:00:00+09:00", "2024-06-20T21:00:00+09:00"),
    ]
    source.csv("broadcasts", "schedule.csv", rows)


def _write_c06(source: SourceFolder) -> None:
    """m06 watches 20:00-20:10 and 20:55-21:00, plus strays before, after and in 2031."""
    day = "2024-06-10T"
    events = heartbeats("m06", C06, day + "20:00:00+09:00", day + "20:10:00+09:00", prefix="a")
    events += heartbeats("m06", C06, day + "20:55:00+09:00", day + "21:00:00+09:00", prefix="b")
    events += [
        _event("late", C06, "m06", "heartbeat", day + "23:40:00+09:00"),
        _event("future", C06, "m06", "heartbeat", "2031-01-01T00:00:00+09:00"),
        _event("morning", C06, "m06", "heartbeat", day + "11:15:00+09:00"),
    ]
    source.jsonl("viewer_events", f"{C06}/events.jsonl", events)


def _write_c07_first_delivery(source: SourceFolder) -> None:
    """m07 watches from 23:35 and chats; the first delivery stops at 23:59:50."""
    events = heartbeats(
        "m07", C07, "2024-06-10T23:35:00+09:00", "2024-06-10T23:59:50+09:00", prefix="d1"
    )
    events.append(
        _event("chat", C07, "m07", "chat", "2024-06-10T23:50:00+09:00", text="おすすめは？")
    )
    source.jsonl("viewer_events", f"{C07}/delivery-1.jsonl", events)


def _write_c07_second_delivery(source: SourceFolder) -> None:
    events = heartbeats(
        "m07", C07, "2024-06-11T00:00:00+09:00", "2024-06-11T00:25:00+09:00", prefix="d2"
    )
    source.jsonl("viewer_events", f"{C07}/delivery-2.jsonl", events)


def _write_c08(source: SourceFolder) -> None:
    """Repeated deliveries of e100, e101 and e102, then e100 again with other text."""
    day = "2024-06-12T"
    chat = _event("e100", C08, "m08", "chat", day + "20:10:00+09:00", text="love it")
    click = _event("e101", C08, "m08", "product_click", day + "20:11:00+09:00", product_id="P-1")
    heartbeat = _event("e102", C08, "m08", "heartbeat", day + "20:12:00+09:00")
    source.jsonl(
        "viewer_events", f"{C08}/delivery-1.jsonl", [chat] * 3 + [click] * 2 + [heartbeat] * 2
    )
    source.jsonl("viewer_events", f"{C08}/delivery-2.jsonl", [{**chat, "text": "changed"}])


def _write_c09(source: SourceFolder) -> None:
    day = "2024-06-10T"
    events = []
    for member_id in ("m09a", "m09b", "m09c", "m09d"):
        events += heartbeats(member_id, C09, day + "20:00:00+09:00", day + "20:30:00+09:00")
    events.append(_event("zoneless", C09, "m09a", "heartbeat", day + "20:31:00"))
    source.jsonl("viewer_events", f"{C09}/events.jsonl", events)


def _write_c10(source: SourceFolder) -> None:
    day = "2024-06-16T"
    events = heartbeats("m10a", C10, day + "20:00:00+09:00", day + "20:30:00+09:00")
    events += heartbeats("m10b", C10, day + "20:00:00+09:00", day + "20:30:00+09:00")
    source.jsonl("viewer_events", f"{C10}/events.jsonl", events)


def _write_orders(source: SourceFolder) -> None:
    c08_order = _order("o700", "m08", "2024-06-12T20:30:00+09:00", 1, 3000)
    c15_orders = [
        _order(f"o15{number:02d}", f"m15-{number:02d}", "2024-06-20T20:30:00+09:00", 1, 1000)
        for number in range(1, 13)
    ]
    source.csv(
        "orders",
        "export-1.csv",
        [
            c08_order,
            _order("o801", "m09a", "2024-06-10T11:30:00Z", 1, 1000),
            _order("o802", "m09b", "2024-06-10T21:30:00+09:00", 1, 2000),
            _order(
                "o804",
                "m09d",
                "",
                1,
                8000,
                status="pending",
                ordered_at="2024-06-10T20:40:00+09:00",
            ),
            _order("o1001", "m10a", "2024-06-16T20:30:00+09:00", 800, 2_980_000),
            _order("o1002", "m10b", "2024-06-16T20:40:00+09:00", 1, 500_000),
            *c15_orders,
        ],
    )
    source.csv("orders", "export-2.csv", [c08_order])
    # This export writes local times without an offset; the settings declare them UTC.
    source.csv("orders", "export-utc.csv", [_order("o803", "m09c", "2024-06-10 11:45:00", 1, 4000)])


@pytest.fixture(scope="module")
def case_source(tmp_path_factory) -> SourceFolder:
    source = SourceFolder(tmp_path_factory.mktemp("cases") / "source")
    _write_schedule(source)
    _write_c06(source)
    _write_c07_first_delivery(source)
    _write_c08(source)
    _write_c09(source)
    _write_c10(source)
    _write_orders(source)
    return source


@dataclass
class Built:
    store: Warehouse
    instance: dg.DagsterInstance
    first_kpis: pd.DataFrame
    c07_first: dict[str, pd.DataFrame]
    c08_first: dict[str, pd.DataFrame]

    def kpis(self, broadcast_id: str) -> pd.Series:
        return self.store.read("broadcast_kpis", broadcast_id=broadcast_id).iloc[0]

    def summary(self, broadcast_id: str) -> pd.DataFrame:
        return self.store.read("viewer_summary", broadcast_id=broadcast_id).set_index("member_id")

    def quarantine(self, scope: str, input_name: str) -> pd.DataFrame:
        return self.store.read("quarantine", scope=scope, input=input_name)


def _snapshot(store: Warehouse, broadcast_id: str) -> dict[str, pd.DataFrame]:
    tables = {name: store.read(name, broadcast_id=broadcast_id) for name in PER_BROADCAST_TABLES}
    tables["quarantine"] = store.read("quarantine", scope=broadcast_id)
    return tables


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def built(request, case_source, tmp_path_factory):
    """The main job on every case, then C07's second delivery and a second load of C08."""
    if request.param == "sqlite":
        warehouse_url = f"sqlite:///{tmp_path_factory.mktemp('warehouse') / 'warehouse.db'}"
    else:
        warehouse_url = request.getfixturevalue("postgres_database")
    settings = tmp_path_factory.mktemp("settings") / "shop.yaml"
    settings.write_text("sources:\n  orders: {timezone: UTC}\n", encoding="utf-8")
    resources = pipeline_resources(warehouse_url, str(case_source.root), str(settings))
    delivery_2 = case_source.root / "viewer_events" / C07 / "delivery-2.jsonl"
    delivery_2.unlink(missing_ok=True)
    with dg.instance_for_test() as instance:
        first_kpis = run_main_job(instance, resources)
        store = resources["warehouse"].get()
        c07_first = _snapshot(store, C07)
        c08_first = _snapshot(store, C08)
        _write_c07_second_delivery(case_source)
        run_main_job(instance, resources, [C07, C08])
        yield Built(store, instance, first_kpis, c07_first, c08_first)


def test_only_valid_broadcasts_become_partitions(built):
    expected = [C06, C07, C08, C09, C10, VALID_ID, C15]
    partitions = built.instance.get_dynamic_partitions(broadcast_partitions.name)
    assert sorted(partitions) == sorted(expected)
    assert sorted(built.store.read("broadcasts")["broadcast_id"]) == sorted(expected)
    assert sorted(built.first_kpis["broadcast_id"]) == sorted(expected)


# C06: strays before, after and years after the broadcast.


def test_strays_add_no_watched_time(built):
    member = built.summary(C06).loc["m06"]
    assert member["watched_seconds"] == pytest.approx(900.0)
    assert member["viewing_rate"] == pytest.approx(0.25)
    # 20:00-20:10 and 20:55-21:00; the strays at 11:15 and 23:40 are no sessions of it.
    assert member["sessions"] == 2


def test_strays_leave_member_in_low_tier(built):
    audience = built.store.read("followup_audience", broadcast_id=C06)
    assert audience["segment"].tolist() == ["low"]
    assert audience["member_id"].tolist() == ["m06"]


def test_event_years_away_is_quarantined(built):
    quarantine = built.quarantine(C06, "viewer_events")
    assert quarantine["record_key"].tolist() == ["future"]
    assert quarantine["reason"].tolist() == [
        "occurred_at is more than 24 h before the start or after the end"
    ]


def test_near_strays_are_kept(built):
    events = built.store.read("raw_viewer_events", broadcast_id=C06).set_index("event_id")
    assert "late" in events.index
    assert "morning" in events.index
    assert "future" not in events.index


def test_no_viewing_rate_above_one(built):
    summary = built.store.read("viewer_summary")
    assert len(summary) > 0
    assert summary["viewing_rate"].max() <= 1.0
    assert summary["viewing_rate"].min() >= 0.0
    sessions = built.store.read("viewing_sessions")
    assert sessions["watched_seconds"].max() <= HOUR


# C07: a broadcast across midnight whose events arrive in two deliveries.


def test_first_delivery_gives_mid_tier(built):
    summary = built.c07_first["viewer_summary"].set_index("member_id")
    assert summary.loc["m07", "watched_seconds"] == pytest.approx(1490.0)
    assert summary.loc["m07", "viewing_rate"] == pytest.approx(1490 / HOUR)
    segments = built.c07_first["followup_audience"]["segment"].tolist()
    assert segments == ["mid"]


def test_second_delivery_joins_the_session(built):
    sessions = built.store.read("viewing_sessions", broadcast_id=C07)
    assert len(sessions) == 1
    assert sessions.loc[0, "started_at"] == pd.Timestamp("2024-06-10T23:35:00+09:00")
    assert sessions.loc[0, "ended_at"] == pd.Timestamp("2024-06-11T00:25:00+09:00")
    assert sessions.loc[0, "watched_seconds"] == pytest.approx(3000.0)


def test_second_delivery_gives_hot_tier(built):
    summary = built.summary(C07)
    assert summary.index.tolist() == ["m07"]
    assert summary.loc["m07", "viewing_rate"] == pytest.approx(3000 / HOUR)
    assert summary.loc["m07", "chats"] == 1
    audience = built.store.read("followup_audience", broadcast_id=C07)
    assert sorted(audience["segment"]) == ["coupon", "hot"]


def test_second_delivery_replaces_rows(built):
    kpis = built.kpis(C07)
    assert kpis["viewing_members"] == 1
    assert kpis["average_watched_seconds"] == pytest.approx(3000.0)
    assert len(built.store.read("broadcast_kpis", broadcast_id=C07)) == 1
    events = built.store.read("raw_viewer_events", broadcast_id=C07)
    # 150 heartbeats of the first delivery, one chat, 151 of the second.
    assert len(events) == 150 + 1 + 151


# C08: repeated deliveries of the same events and of the same order.


def test_repeated_events_are_counted_once(built):
    events = built.store.read("raw_viewer_events", broadcast_id=C08)
    assert sorted(events["event_id"]) == ["e100", "e101", "e102"]
    kpis = built.kpis(C08)
    assert kpis["chats"] == 1
    assert kpis["clicks"] == 1


def test_first_copy_of_event_is_kept(built):
    events = built.store.read("raw_viewer_events", broadcast_id=C08).set_index("event_id")
    assert events.loc["e100", "text"] == "love it"


def test_repeated_order_is_counted_once(built):
    kpis = built.kpis(C08)
    assert kpis["revenue_during_live"] == 3000
    assert kpis["buyers_during_live"] == 1
    assert kpis["orders_during_live"] == 1
    raw_orders = built.store.read("raw_orders", broadcast_id=C08)
    assert raw_orders["order_id"].tolist().count("o700") == 1


def test_repeated_deliveries_give_one_viewer(built):
    summary = built.summary(C08)
    assert summary.index.tolist() == ["m08"]
    assert summary.loc["m08", "amount"] == 3000
    assert bool(summary.loc["m08", "bought_during_live"])


def test_differing_copy_is_quarantined(built):
    quarantine = built.quarantine(C08, "viewer_events")
    assert quarantine["record_key"].tolist() == ["e100"]
    assert quarantine["file"].str.endswith("delivery-2.jsonl").tolist() == [True]
    assert quarantine["reason"].tolist() == [
        "conflicting duplicate: event_id already seen with another payload"
    ]


@pytest.mark.parametrize("table", [*PER_BROADCAST_TABLES, "quarantine"])
def test_second_load_changes_nothing(built, table):
    before = built.c08_first[table]
    if table == "quarantine":
        after = built.store.read("quarantine", scope=C08)
    else:
        after = built.store.read(table, broadcast_id=C08)
    key = list(after.columns[:4])
    assert len(after) == len(before)
    pd.testing.assert_frame_equal(
        after.sort_values(key).reset_index(drop=True),
        before.sort_values(key).reset_index(drop=True),
    )


# C09: orders in UTC, in local time with a declared zone, after the live, and pending.


def test_orders_in_utc_count_during_live(built):
    attribution = built.store.read("order_attribution", broadcast_id=C09).set_index("order_id")
    # o801 paid 11:30Z is 20:30 in Tokyo.
    assert bool(attribution.loc["o801", "during_live"])
    # o803 paid 11:45 in the declared zone (UTC) is 20:45 in Tokyo.
    assert bool(attribution.loc["o803", "during_live"])
    assert attribution.loc["o803", "paid_at"] == pd.Timestamp("2024-06-10T11:45:00Z")


def test_order_after_end_is_post_live(built):
    attribution = built.store.read("order_attribution", broadcast_id=C09).set_index("order_id")
    assert not bool(attribution.loc["o802", "during_live"])
    assert bool(attribution.loc["o802", "post_live"])
    assert bool(attribution.loc["o802", "same_night"])


def test_pending_order_makes_no_buyer(built):
    attribution = built.store.read("order_attribution", broadcast_id=C09)
    assert "o804" not in set(attribution["order_id"])
    assert not bool(built.summary(C09).loc["m09d", "bought_during_live"])
    orders = built.store.read("orders").set_index("order_id")
    assert orders.loc["o804", "status"] == "pending"
    assert "o804" not in set(built.quarantine("all", "orders")["record_key"])


def test_kpis_with_mixed_zones(built):
    kpis = built.kpis(C09)
    assert kpis["viewing_members"] == 4
    assert kpis["buyers_during_live"] == 2
    assert kpis["revenue_during_live"] == 1000 + 4000
    assert kpis["cvr"] == pytest.approx(0.5)
    assert kpis["post_live_buyers"] == 1
    assert kpis["post_live_revenue"] == 2000
    assert kpis["same_night_revenue"] == 2000


def test_zoneless_event_is_quarantined(built):
    quarantine = built.quarantine(C09, "viewer_events")
    assert quarantine["record_key"].tolist() == ["zoneless"]
    assert quarantine["field"].tolist() == ["occurred_at"]
    assert "has no UTC offset" in quarantine.loc[0, "reason"]


def test_no_order_is_quarantined(built):
    assert built.quarantine("all", "orders").empty


# C10: revenue above 2**31 yen.


def test_revenue_above_int32_is_exact(built):
    kpis = built.kpis(C10)
    assert int(kpis["revenue_during_live"]) == 2_384_500_000
    attribution = built.store.read("order_attribution", broadcast_id=C10).set_index("order_id")
    assert int(attribution.loc["o1001", "net_amount"]) == 2_384_000_000
    summary = built.summary(C10)
    assert int(summary.loc["m10a", "amount"]) == 2_384_000_000


# C14: broadcast IDs with characters outside letters, digits, '-' and '_'.


def test_invalid_broadcast_ids_are_quarantined(built):
    quarantine = built.quarantine("all", "broadcasts").set_index("record_key")
    for bad_id in INVALID_IDS:
        reason = quarantine.loc[bad_id, "reason"]
        assert repr(bad_id) in reason, bad_id
        assert ALLOWED_CHARACTERS in reason, bad_id


def test_valid_id_builds_a_partition(built):
    kpis = built.kpis(VALID_ID)
    assert kpis["viewing_members"] == 0


# C15: a zero-length broadcast, and a broadcast with orders but no viewers.


def test_zero_length_broadcast_is_quarantined(built):
    quarantine = built.quarantine("all", "broadcasts").set_index("record_key")
    assert quarantine.loc[ZERO_LENGTH, "reason"] == "ends_at is not after starts_at"
    assert ZERO_LENGTH not in built.instance.get_dynamic_partitions(broadcast_partitions.name)


def test_broadcast_without_viewers_has_zero_kpis(built):
    kpis = built.kpis(C15)
    assert kpis["viewing_members"] == 0
    assert kpis["buyers_during_live"] == 0
    assert kpis["revenue_during_live"] == 0
    assert kpis["cvr"] == 0.0
    assert kpis["average_viewing_rate"] == 0.0
    assert len(built.store.read("raw_orders", broadcast_id=C15)) == 12
    assert built.summary(C15).empty


def test_no_kpi_is_nan_or_infinite(built):
    kpis = built.store.read("broadcast_kpis")
    for column in ("cvr", "average_order_value", "average_viewing_rate", "average_watched_seconds"):
        for broadcast_id, value in zip(kpis["broadcast_id"], kpis[column], strict=True):
            assert math.isfinite(value), (broadcast_id, column)
