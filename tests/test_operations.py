"""Discovery of broadcasts, settling and refresh rules, and the definitions' public names."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import pandas as pd
import pytest

from livecrm_dagster.definitions import defs
from livecrm_dagster.defs.followups.resources import FollowupClockResource
from livecrm_dagster.defs.ingestion.due import recently_ended, settled
from livecrm_dagster.defs.ingestion.sensors import new_broadcasts
from livecrm_dagster.resources import ShopSettingsResource, SourceResource

GOOD = "b-20240610_1"
BAD_IDS = ["SALE, 6/10", "b|013", "b/2024/06", "a...b", "../x"]


def _schedule_row(broadcast_id: str) -> dict:
    return {
        "broadcast_id": broadcast_id,
        "title": "Evening live",
        "starts_at": "2024-06-10T16:00:00+09:00",
        "ends_at": "2024-06-10T18:00:00+09:00",
    }


def _tick(instance, source_root, now: str):
    context = dg.build_sensor_context(
        instance=instance,
        resources={
            "shop_settings": ShopSettingsResource(),
            "source": SourceResource(folder=str(source_root)),
            "followup_clock": FollowupClockResource(now=now),
        },
    )
    return new_broadcasts(context)


@pytest.fixture
def schedule_with_repeats_and_bad_ids(source):
    # The valid broadcast arrives in two file drops; five IDs cannot be partition keys.
    source.csv("broadcasts", "drop-1.csv", [_schedule_row(GOOD)])
    source.csv(
        "broadcasts", "drop-2.csv", [_schedule_row(GOOD)] + [_schedule_row(i) for i in BAD_IDS]
    )
    return source.root


def test_discovery_adds_only_valid_id_once(schedule_with_repeats_and_bad_ids):
    with dg.instance_for_test() as instance:
        result = _tick(instance, schedule_with_repeats_and_bad_ids, "2024-06-10T17:00:00+09:00")
        added = [
            key for request in result.dynamic_partitions_requests for key in request.partition_keys
        ]
        assert added == [GOOD]


def test_discovery_waits_for_settling_delay(schedule_with_repeats_and_bad_ids):
    with dg.instance_for_test() as instance:
        before = _tick(instance, schedule_with_repeats_and_bad_ids, "2024-06-10T18:29:59+09:00")
        after = _tick(instance, schedule_with_repeats_and_bad_ids, "2024-06-10T18:30:00+09:00")
    assert [r.job_name for r in before.run_requests] == ["reference_data"]
    analytics = [r for r in after.run_requests if r.job_name == "broadcast_analytics"]
    assert [r.partition_key for r in analytics] == [GOOD]
    assert analytics[0].run_key == f"analytics:{GOOD}"


def test_discovery_run_keys_are_stable(schedule_with_repeats_and_bad_ids):
    with dg.instance_for_test() as instance:
        first = _tick(instance, schedule_with_repeats_and_bad_ids, "2024-06-10T19:00:00+09:00")
        second = _tick(instance, schedule_with_repeats_and_bad_ids, "2024-06-10T19:01:00+09:00")
    assert [r.run_key for r in first.run_requests] == [r.run_key for r in second.run_requests]


def test_discovery_skips_with_empty_schedule(source):
    (source.root / "broadcasts").mkdir(parents=True)
    with dg.instance_for_test() as instance:
        result = _tick(instance, source.root, "2024-06-10T19:00:00+09:00")
    assert isinstance(result, dg.SkipReason)
    assert "0 valid broadcasts" in result.skip_message


def _ends(*ends: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "broadcast_id": [f"b{n}" for n in range(len(ends))],
            "ends_at": pd.to_datetime(list(ends), utc=True),
        }
    )


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        ("2024-06-10T09:29:59Z", []),  # one second before the 30-minute settling delay ends
        ("2024-06-10T09:30:00Z", ["b0"]),  # exactly at the end of the delay
    ],
)
def test_settled_after_delay(now, expected):
    schedule = _ends("2024-06-10T09:00:00Z")
    moment = dt.datetime.fromisoformat(now.replace("Z", "+00:00"))
    assert settled(schedule, moment, 30)["broadcast_id"].tolist() == expected


def test_recently_ended_window():
    schedule = _ends("2024-06-01T09:00:00Z", "2024-06-03T09:00:00Z", "2024-06-11T09:00:00Z")
    now = dt.datetime(2024, 6, 10, 9, 0, tzinfo=dt.UTC)
    # b0 ended 9 days ago, b1 exactly 7 days ago, b2 has not ended yet.
    assert recently_ended(schedule, now, 7)["broadcast_id"].tolist() == ["b1"]


def test_definitions_public_names():
    # Renaming any of these resets sensor run-key history or breaks saved backfills.
    loaded = defs()
    assets = sorted(key.to_user_string() for key in loaded.resolve_all_asset_keys())
    assert assets == [
        "broadcast_kpis",
        "broadcasts",
        "followup_audience",
        "followup_lift",
        "followup_sends",
        "members",
        "order_attribution",
        "products",
        "raw_orders",
        "raw_viewer_events",
        "shop_orders",
        "viewer_summary",
        "viewing_sessions",
    ]
    assert sorted(sensor.name for sensor in loaded.sensors) == [
        "due_followup_steps",
        "new_broadcasts",
        "rebuild_recent_broadcasts",
    ]
    assert sorted(schedule.name for schedule in loaded.schedules) == ["daily_reference_reload"]
    repository = loaded.get_repository_def()
    assert sorted(
        job.name for job in repository.get_all_jobs() if not job.name.startswith("__")
    ) == [
        "broadcast_analytics",
        "broadcast_analytics_celery",
        "followup_send_job",
        "reference_data",
    ]
