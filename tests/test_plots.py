"""Broadcast charts: concurrent viewers, the tier histogram, and the PNGs in the KPI metadata."""

import base64
import re
from zoneinfo import ZoneInfo

import dagster as dg
import pandas as pd
import pytest

from livecrm_dagster.defs.reporting.plots import (
    MAX_PNG_BYTES,
    PNG_SIGNATURE,
    TIERS,
    broadcast_charts,
    concurrent_viewers,
    member_tiers,
    product_click_times,
    purchase_times,
    viewing_rate_histogram,
)
from livecrm_dagster.pipeline import pipeline_resources, run_main_job
from tests.test_main_job import B1, B2, two_broadcasts  # noqa: F401 (a fixture)

TOKYO = ZoneInfo("Asia/Tokyo")
START = pd.Timestamp("2024-06-10 20:00", tz=TOKYO)
END = pd.Timestamp("2024-06-10 20:05", tz=TOKYO)


def at(clock: str) -> pd.Timestamp:
    """Return 2024-06-10 at `clock` shop time, in UTC as the warehouse stores it."""
    return pd.Timestamp(f"2024-06-10 {clock}", tz=TOKYO).tz_convert("UTC")


def sessions(*rows: tuple[str, str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "member_id": [member for member, _, _ in rows],
            "started_at": pd.Series([at(start) for _, start, _ in rows]),
            "ended_at": pd.Series([at(end) for _, _, end in rows]),
        }
    )


def minute_counts(series: pd.Series) -> dict[str, int]:
    return {time.tz_convert(TOKYO).strftime("%H:%M"): int(n) for time, n in series.items()}


def test_concurrent_viewers_three_members():
    viewers = concurrent_viewers(
        sessions(
            # m1 joins before the start and has two overlapping sessions (two devices).
            ("m1", "19:58:00", "20:03:00"),
            ("m1", "20:02:30", "20:04:00"),
            # m2 covers the marks 20:02 and 20:03 only.
            ("m2", "20:01:10", "20:03:59"),
            # m3's single event sits exactly on a mark.
            ("m3", "20:03:00", "20:03:00"),
        ),
        START,
        END,
    )
    assert minute_counts(viewers) == {
        "20:00": 1,
        "20:01": 1,
        "20:02": 2,
        "20:03": 3,
        "20:04": 1,
        "20:05": 0,
    }
    assert str(viewers.dtype) == "int64"


def test_concurrent_viewers_clips_to_broadcast():
    viewers = concurrent_viewers(
        sessions(("m1", "19:00:00", "22:00:00"), ("m2", "20:00:30", "20:00:50")), START, END
    )
    # m2's session lies between two marks, so no sample sees it.
    assert viewers.tolist() == [1, 1, 1, 1, 1, 1]


def test_concurrent_viewers_without_sessions():
    empty = pd.DataFrame(columns=["member_id", "started_at", "ended_at"])
    assert concurrent_viewers(empty, START, END).tolist() == [0] * 6


def test_concurrent_viewers_rejects_empty_broadcast():
    with pytest.raises(ValueError, match="must be positive"):
        concurrent_viewers(sessions(("m1", "20:00:00", "20:01:00")), START, START)


def test_member_tiers_buyer_wins():
    audience = pd.DataFrame(
        {
            "segment": ["hot", "coupon", "buyer", "mid", "low", "clicked_not_bought"],
            "member_id": ["m1", "m1", "m2", "m2", "m3", "m4"],
        }
    )
    assert member_tiers(audience).to_dict() == {"m1": "hot", "m2": "buyer", "m3": "low"}


def test_viewing_rate_histogram_counts():
    summary = pd.DataFrame(
        {
            "member_id": ["m1", "m2", "m3", "m4", "m5", "m6", "m7"],
            "viewing_rate": [0.85, 1.0, 0.7, 0.05, 0.1, 2520 / 3600, 0.5],
        }
    )
    audience = pd.DataFrame(
        {
            "segment": ["hot", "buyer", "mid", "low", "low", "mid", "coupon"],
            "member_id": ["m1", "m2", "m3", "m4", "m5", "m6", "m1"],
        }
    )
    histogram = viewing_rate_histogram(summary, audience)
    assert list(histogram.columns) == list(TIERS)
    assert list(histogram.index) == [f"{k}-{k + 10}%" for k in range(0, 100, 10)]
    nonzero = {(rate_bin, tier): int(n) for (rate_bin, tier), n in histogram.stack().items() if n}
    # m7 has no tier, 1.0 falls in the last bin, and 0.7 and 2520/3600 both in 70-80%.
    assert nonzero == {
        ("0-10%", "low"): 1,
        ("10-20%", "low"): 1,
        ("70-80%", "mid"): 2,
        ("80-90%", "hot"): 1,
        ("90-100%", "buyer"): 1,
    }


def test_markers_select_live_clicks_and_counted_purchases():
    events = pd.DataFrame(
        {
            "type": ["product_click", "product_click", "chat", "product_click"],
            "occurred_at": [at("20:01:00"), at("19:59:59"), at("20:02:00"), at("20:05:00")],
        }
    )
    assert product_click_times(events, START, END).tolist() == [at("20:01:00"), at("20:05:00")]
    attribution = pd.DataFrame(
        {
            "paid_at": [at("20:02:00"), at("20:03:00"), at("20:04:00"), at("21:30:00")],
            "counted": [True, False, True, True],
            "during_live": [True, True, True, False],
            "net_amount": [1000, 1000, 0, 1000],
        }
    )
    assert purchase_times(attribution).tolist() == [at("20:02:00")]


@pytest.fixture(scope="module")
def built_on_sqlite(two_broadcasts, tmp_path_factory):  # noqa: F811
    """The main job on the two-broadcast fixture of tests/test_main_job.py, on SQLite."""
    url = f"sqlite:///{tmp_path_factory.mktemp('warehouse') / 'warehouse.db'}"
    resources = pipeline_resources(url, str(two_broadcasts.root))
    with dg.instance_for_test() as instance:
        run_main_job(instance, resources)
        yield resources["warehouse"].get(), instance


def test_first_broadcast_viewers_per_minute(built_on_sqlite):
    store, _ = built_on_sqlite
    broadcast = store.read("broadcasts", broadcast_id=B1).iloc[0]
    stored = store.read("viewing_sessions", broadcast_id=B1)
    viewers = minute_counts(
        concurrent_viewers(stored, broadcast["starts_at"], broadcast["ends_at"])
    )
    # Heartbeats end at 20:05 (m005), 20:10 (m003), 20:20 (m006), 20:30 (m002) and
    # 20:50 (m001, m004), and a session is open through its last heartbeat.
    expected = {"20:00": 6, "20:05": 6, "20:06": 5, "20:10": 5, "20:11": 4, "20:20": 4}
    expected |= {"20:21": 3, "20:30": 3, "20:31": 2, "20:50": 2, "20:51": 0, "21:00": 0}
    assert {clock: viewers[clock] for clock in expected} == expected
    assert len(viewers) == 61


def test_first_broadcast_tier_histogram(built_on_sqlite):
    store, _ = built_on_sqlite
    histogram = viewing_rate_histogram(
        store.read("viewer_summary", broadcast_id=B1),
        store.read("followup_audience", broadcast_id=B1),
    )
    nonzero = {(rate_bin, tier): int(n) for (rate_bin, tier), n in histogram.stack().items() if n}
    # Watched 300 s (m005), 600 s (m003), 1,200 s (m006), 1,800 s (m002) and 3,000 s
    # (m001, m004) of 3,600 s.
    assert nonzero == {
        ("0-10%", "low"): 1,
        ("10-20%", "buyer"): 1,
        ("30-40%", "low"): 1,
        ("50-60%", "buyer"): 1,
        ("80-90%", "hot"): 1,
        ("80-90%", "mid"): 1,
    }


@pytest.mark.parametrize("broadcast_id", [B1, B2])
def test_charts_render_png(built_on_sqlite, broadcast_id):
    store, _ = built_on_sqlite
    broadcast = store.read("broadcasts", broadcast_id=broadcast_id).iloc[0]
    timeline, histogram, peak = broadcast_charts(
        store.read("viewing_sessions", broadcast_id=broadcast_id),
        store.read("raw_viewer_events", broadcast_id=broadcast_id),
        store.read("order_attribution", broadcast_id=broadcast_id),
        store.read("viewer_summary", broadcast_id=broadcast_id),
        store.read("followup_audience", broadcast_id=broadcast_id),
        broadcast["starts_at"],
        broadcast["ends_at"],
        TOKYO,
    )
    assert timeline.startswith(PNG_SIGNATURE)
    assert histogram.startswith(PNG_SIGNATURE)
    assert len(timeline) <= MAX_PNG_BYTES
    assert len(histogram) <= MAX_PNG_BYTES
    assert peak == {B1: 6, B2: 2}[broadcast_id]


@pytest.mark.parametrize("broadcast_id", [B1, B2])
def test_kpi_metadata_embeds_charts(built_on_sqlite, broadcast_id):
    _, instance = built_on_sqlite
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("broadcast_kpis"), asset_partitions=[broadcast_id]
        ),
        limit=1,
    ).records
    metadata = records[0].asset_materialization.metadata
    images = re.findall(
        r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", metadata["charts"].value
    )
    assert len(images) == 2
    for encoded in images:
        assert base64.b64decode(encoded).startswith(PNG_SIGNATURE)
    assert metadata["peak_concurrent_members"].value == {B1: 6, B2: 2}[broadcast_id]
    assert "@" not in metadata["charts"].value
