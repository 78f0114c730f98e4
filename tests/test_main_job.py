"""The main job on two hand-computed broadcasts, materialized with Dagster on both databases."""

from __future__ import annotations

import dagster as dg
import pytest

from livecrm_dagster.pipeline import pipeline_resources, run_main_job
from tests.conftest import SourceFolder, heartbeats

B1, B2 = "b001", "b002"


def _order(order_id, member_id, paid_at, product_id, quantity, unit_price, status="paid"):
    return {
        "order_id": order_id,
        "member_id": member_id,
        "ordered_at": paid_at,
        "paid_at": paid_at,
        "status": status,
        "product_id": product_id,
        "quantity": quantity,
        "unit_price": unit_price,
    }


@pytest.fixture(scope="module")
def two_broadcasts(tmp_path_factory):
    """Two broadcasts whose KPIs are computed by hand in the tests below."""
    source = SourceFolder(tmp_path_factory.mktemp("source"))
    source.csv(
        "broadcasts",
        "schedule.csv",
        [
            {
                "broadcast_id": B1,
                "title": "Summer skincare",
                "starts_at": "2024-06-10T20:00:00+09:00",
                "ends_at": "2024-06-10T21:00:00+09:00",
                "featured_product_ids": "P-1;P-2",
                "archive_url": "https://shop.example/live/b001",
            },
            {
                "broadcast_id": B2,
                "title": "Rainy season",
                "starts_at": "2024-06-12T20:00:00+09:00",
                "ends_at": "2024-06-12T21:00:00+09:00",
                "featured_product_ids": "P-2",
                "archive_url": "https://shop.example/live/b002",
            },
        ],
    )
    day1, day2 = "2024-06-10T", "2024-06-12T"
    events = (
        heartbeats("m001", B1, day1 + "20:00:00+09:00", day1 + "20:50:00+09:00")
        + heartbeats("m002", B1, day1 + "20:00:00+09:00", day1 + "20:30:00+09:00")
        + heartbeats("m003", B1, day1 + "19:50:00+09:00", day1 + "20:10:00+09:00")
        + heartbeats("m004", B1, day1 + "20:00:00+09:00", day1 + "20:40:00+09:00", device_id="d1")
        + heartbeats("m004", B1, day1 + "20:20:00+09:00", day1 + "20:50:00+09:00", device_id="d2")
        + heartbeats("", B1, day1 + "20:00:00+09:00", day1 + "20:10:00+09:00", device_id="anon")
        + heartbeats("m005", B1, day1 + "20:00:00+09:00", day1 + "20:05:00+09:00")
        + heartbeats("m006", B1, day1 + "20:00:00+09:00", day1 + "20:20:00+09:00")
    )
    events += [
        {
            "event_id": "c1",
            "broadcast_id": B1,
            "member_id": "m001",
            "type": "chat",
            "occurred_at": day1 + "20:10:00+09:00",
            "text": "love it",
        },
        {
            "event_id": "k1",
            "broadcast_id": B1,
            "member_id": "m002",
            "type": "product_click",
            "occurred_at": day1 + "20:10:00+09:00",
            "product_id": "P-1",
        },
    ]
    source.jsonl("viewer_events", f"{B1}/events.jsonl", events)
    source.jsonl(
        "viewer_events",
        f"{B2}/events.jsonl",
        heartbeats("m005", B2, day2 + "20:00:00+09:00", day2 + "20:05:00+09:00")
        + heartbeats("m001", B2, day2 + "20:00:00+09:00", day2 + "21:00:00+09:00"),
    )
    source.csv(
        "orders",
        "export-1.csv",
        [
            _order("o1", "m002", day1 + "20:20:00+09:00", "P-1", 2, 1500),
            _order("o2", "m003", day1 + "21:00:00+09:00", "P-2", 1, 1000),
            _order("o3", "m004", day1 + "19:59:59+09:00", "P-2", 1, 1000),
            _order("o4", "m005", day2 + "20:30:00+09:00", "P-2", 5, 1000),
            _order("o5", "m006", day1 + "20:30:00+09:00", "P-1", 1, 4000),
            _order("o6", "", day1 + "20:40:00+09:00", "P-1", 1, 9000),
        ],
    )
    # A later export reports the cancellation of o5.
    source.csv(
        "orders",
        "export-2.csv",
        [_order("o5", "m006", day1 + "20:30:00+09:00", "P-1", 1, 4000, status="cancelled")],
    )
    source.csv(
        "members",
        "members.csv",
        [
            {
                "member_id": f"m00{n}",
                "age": 20 + 7 * n,
                "gender": "female",
                "email": f"m00{n}@example.invalid",
                "line_user_id": f"U{n:032x}",
                "consent_email": "true",
                "consent_line": "true",
            }
            for n in range(1, 7)
        ],
    )
    source.csv(
        "products",
        "products.csv",
        [
            {
                "product_id": "P-1",
                "name": "Moisturiser",
                "category": "skincare",
                "stock": 3,
                "low_stock_threshold": 5,
            },
            {
                "product_id": "P-2",
                "name": "Sunscreen",
                "category": "skincare",
                "stock": 50,
                "low_stock_threshold": 5,
            },
        ],
    )
    return source


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def built(request, two_broadcasts, tmp_path_factory):
    """The main job run once per database on the two broadcasts."""
    if request.param == "sqlite":
        warehouse_url = f"sqlite:///{tmp_path_factory.mktemp('warehouse') / 'warehouse.db'}"
    else:
        warehouse_url = request.getfixturevalue("postgres_database")
    resources = pipeline_resources(warehouse_url, str(two_broadcasts.root))
    with dg.instance_for_test() as instance:
        kpis = run_main_job(instance, resources)
        yield kpis.set_index("broadcast_id"), resources["warehouse"].get(), instance, resources


def test_kpis_of_first_broadcast(built):
    kpis, _, _, _ = built
    first = kpis.loc[B1]
    assert first["viewing_members"] == 6
    assert first["buyers_during_live"] == 2
    assert first["cvr"] == pytest.approx(2 / 6)
    assert first["revenue_during_live"] == 4000
    assert first["orders_during_live"] == 2
    assert first["average_order_value"] == pytest.approx(2000)
    assert first["non_buyers"] == 4
    assert first["average_watched_seconds"] == pytest.approx(9900 / 6)
    assert first["chats"] == 1
    assert first["clicks"] == 1
    assert first["anonymous_viewers"] == 1
    assert first["post_live_revenue"] == 0


def test_kpis_of_second_broadcast(built):
    kpis, _, _, _ = built
    second = kpis.loc[B2]
    assert second["viewing_members"] == 2
    assert second["buyers_during_live"] == 1
    assert second["revenue_during_live"] == 5000
    assert second["cvr"] == pytest.approx(0.5)


def test_order_counts_for_later_broadcast(built):
    _, store, _, _ = built
    first = store.read("order_attribution", broadcast_id=B1).set_index("order_id")
    assert bool(first.loc["o4", "post_live"])
    assert first.loc["o4", "claimed_by"] == B2
    assert not bool(first.loc["o4", "counted"])


def test_cancelled_and_early_orders_excluded(built):
    _, store, _, _ = built
    first = store.read("order_attribution", broadcast_id=B1).set_index("order_id")
    assert first.loc["o5", "net_amount"] == 0
    assert first.loc["o5", "status"] == "cancelled"
    assert "o3" not in first.index
    assert "o6" not in first.index


def test_viewer_summary_rows(built):
    _, store, _, _ = built
    summary = store.read("viewer_summary", broadcast_id=B1).set_index("member_id")
    assert sorted(summary.index) == ["m001", "m002", "m003", "m004", "m005", "m006"]
    assert summary.loc["m004", "watched_seconds"] == pytest.approx(3000)
    assert summary.loc["m003", "watched_seconds"] == pytest.approx(600)
    assert bool(summary.loc["m002", "bought_during_live"])
    assert summary.loc["m002", "amount"] == 3000
    assert summary.loc["m002", "items"] == 2
    assert summary.loc["m002", "clicked_product_ids"] == "P-1"
    assert summary.loc["m001", "age_band"] == "20-29"
    assert not bool(summary.loc["m006", "bought_during_live"])


def test_followup_segments(built):
    _, store, _, _ = built
    audience = store.read("followup_audience", broadcast_id=B1)
    members_of = {
        segment: sorted(group["member_id"]) for segment, group in audience.groupby("segment")
    }
    assert members_of["buyer"] == ["m002", "m003"]
    assert members_of["hot"] == ["m001"]
    assert members_of["mid"] == ["m004"]
    assert members_of["low"] == ["m005", "m006"]
    assert members_of["coupon"] == ["m001", "m004"]
    assert "clicked_not_bought" not in members_of


def test_rerun_leaves_identical_rows(built):
    _, store, instance, resources = built
    tables = [
        "raw_viewer_events",
        "raw_orders",
        "viewing_sessions",
        "order_attribution",
        "viewer_summary",
        "broadcast_kpis",
        "followup_audience",
    ]
    before = {table: store.read(table, broadcast_id=B1) for table in tables}
    run_main_job(instance, resources, [B1])
    for table in tables:
        after = store.read(table, broadcast_id=B1)
        key = list(after.columns[:3])
        assert (
            after.sort_values(key)
            .reset_index(drop=True)
            .equals(before[table].sort_values(key).reset_index(drop=True))
        ), table
