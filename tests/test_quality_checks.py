"""Asset checks: shown in Dagster and stored in the warehouse for the follow-up steps."""

from __future__ import annotations

import dagster as dg
import pytest

from livecrm_dagster.pipeline import FIRST_PASS, REFERENCE_ASSETS, SECOND_PASS, pipeline_resources
from livecrm_dagster.quality import failed_checks
from tests.conftest import heartbeats

HEALTHY, SILENT = "b037", "b035"


@pytest.fixture
def healthy_and_silent(source):
    source.csv(
        "broadcasts",
        "schedule.csv",
        [
            {
                "broadcast_id": key,
                "starts_at": f"2024-06-1{n}T20:00:00+09:00",
                "ends_at": f"2024-06-1{n}T21:00:00+09:00",
            }
            for n, key in enumerate([HEALTHY, SILENT])
        ],
    )
    # The silent broadcast's event source delivered nothing (an outage).
    source.jsonl(
        "viewer_events",
        f"{HEALTHY}/events.jsonl",
        heartbeats("m001", HEALTHY, "2024-06-10T20:00:00+09:00", "2024-06-10T20:30:00+09:00"),
    )
    for name in ("orders", "members", "products"):
        (source.root / name).mkdir(parents=True)
    return source


def _check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {
        evaluation.check_name: evaluation.passed
        for evaluation in result.get_asset_check_evaluations()
    }


def test_checks_pass_and_fail_per_broadcast(healthy_and_silent, warehouse_url):
    resources = pipeline_resources(warehouse_url, str(healthy_and_silent.root))
    results = {}
    with dg.instance_for_test() as instance:
        dg.materialize(REFERENCE_ASSETS, resources=resources, instance=instance)
        instance.add_dynamic_partitions("broadcast", [HEALTHY, SILENT])
        for key in (HEALTHY, SILENT):
            first = dg.materialize(
                FIRST_PASS, resources=resources, instance=instance, partition_key=key
            )
            second = dg.materialize(
                SECOND_PASS, resources=resources, instance=instance, partition_key=key
            )
            results[key] = {**_check_results(first), **_check_results(second)}
    store = resources["warehouse"].get()

    assert results[HEALTHY] == {
        "quarantine_share_below_threshold": True,
        "viewing_events_arrived": True,
        "orders_counted_once": True,
        "viewing_rate_within_bounds": True,
        "revenue_matches_attributed_orders": True,
    }
    assert results[SILENT]["viewing_events_arrived"] is False
    assert failed_checks(store, HEALTHY) == []
    assert failed_checks(store, SILENT) == ["raw_viewer_events:viewing_events_arrived"]


def test_unreadable_shared_file_does_not_stop_schedule(source, warehouse_url):
    source.csv(
        "broadcasts",
        "schedule.csv",
        [
            {
                "broadcast_id": "b060",
                "starts_at": "2024-06-10T20:00:00+09:00",
                "ends_at": "2024-06-10T21:00:00+09:00",
            }
        ],
    )
    # A UTF-16 export in the shared events folder cannot be read by anyone.
    (source.root / "viewer_events").mkdir(parents=True)
    (source.root / "viewer_events" / "export.csv").write_bytes(
        "event_id,broadcast_id\ne1,b060\n".encode("utf-16")
    )
    for name in ("orders", "members", "products"):
        (source.root / name).mkdir(parents=True)
    resources = pipeline_resources(warehouse_url, str(source.root))
    with dg.instance_for_test() as instance:
        result = dg.materialize(REFERENCE_ASSETS, resources=resources, instance=instance)
    store = resources["warehouse"].get()
    quarantine = store.read("quarantine", input="viewer_events")
    assert result.success
    assert store.read("broadcasts")["broadcast_id"].tolist() == ["b060"]
    assert quarantine["file"].str.endswith("export.csv").tolist() == [True]
