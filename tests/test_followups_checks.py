"""A failed upstream asset check for a broadcast stops that broadcast's steps only."""

import datetime as dt

import dagster as dg
import pandas as pd

from livecrm_dagster.defs.followups.assets import followup_send_job, followup_sends
from livecrm_dagster.defs.partitions import broadcast_partitions
from tests.test_followups_steps import scenarios_file
from tests.test_followups_support import Harness, audience_row, broadcast, load, member, tokyo


@dg.asset_check(asset="followup_audience", partitions_def=broadcast_partitions)
def viewing_data_present() -> dg.AssetCheckResult:
    """Stand-in for a data-quality check of the project. The test reports its results."""
    return dg.AssetCheckResult(passed=True)


def report_check(instance: dg.DagsterInstance, broadcast_id: str, passed: bool, severity) -> None:
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey("followup_audience"),
            check_name="viewing_data_present",
            passed=passed,
            severity=severity,
            partition=broadcast_id,
        )
    )


def test_failed_check_blocks_only_its_broadcast(tmp_path):
    harness = Harness(tmp_path)
    harness.scenarios_path = scenarios_file(
        tmp_path, blocking_checks=["followup_audience:viewing_data_present"]
    )
    broadcasts = ["b035", "b036", "b037", "b039"]
    load(
        harness.store,
        broadcasts=[broadcast(b, "2024-06-10 17:00", "2024-06-10 18:00") for b in broadcasts],
        members=[member("m060")],
        followup_audience=[audience_row(b, "mid", "m060") for b in broadcasts],
    )
    harness.instance.add_dynamic_partitions("broadcast", broadcasts)
    report_check(harness.instance, "b035", False, dg.AssetCheckSeverity.ERROR)
    report_check(harness.instance, "b036", False, dg.AssetCheckSeverity.ERROR)
    report_check(harness.instance, "b037", True, dg.AssetCheckSeverity.ERROR)
    report_check(harness.instance, "b039", False, dg.AssetCheckSeverity.WARN)
    definitions = dg.Definitions(
        assets=[dg.AssetSpec("followup_audience", partitions_def=broadcast_partitions)]
        + [followup_sends],
        asset_checks=[viewing_data_present],
        jobs=[followup_send_job],
        resources=harness.resources(),
    )
    job = definitions.resolve_job_def("followup_send_job")

    results = {}
    for broadcast_id in broadcasts:
        # Spread the runs over four shop days so the frequency cap does not interfere.
        day = 11 + broadcasts.index(broadcast_id)
        now = tokyo(f"2024-06-{day} 18:00")
        outcome = job.execute_in_process(
            partition_key=dg.MultiPartitionKey({"broadcast": broadcast_id, "step": "mid_archive"}),
            run_config={"ops": {"followup_sends": {"config": {"now": now.isoformat()}}}},
            instance=harness.instance,
        )
        (materialization,) = outcome.asset_materializations_for_node("followup_sends")
        results[broadcast_id] = {k: v.value for k, v in materialization.metadata.items()}

    assert results["b035"]["skipped_by_reason"] == {"blocked_by_failed_check": 1}
    assert results["b035"]["failed_checks"] == ["followup_audience:viewing_data_present"]
    assert results["b036"]["skipped_by_reason"] == {"blocked_by_failed_check": 1}
    assert results["b037"]["sent"] == 1
    assert results["b037"]["failed_checks"] == []
    assert results["b039"]["sent"] == 1
    rows = harness.ledger_rows().set_index("broadcast_id")
    assert rows.at["b035", "reason"] == "blocked_by_failed_check"
    assert rows.at["b037", "status"] == "sent"
    assert harness.outbox_members("b035", "mid_archive") == []


def test_stored_failed_check_blocks_steps(tmp_path):
    harness = Harness(tmp_path)
    harness.scenarios_path = scenarios_file(tmp_path)
    broadcasts = ["b040", "b041"]
    load(
        harness.store,
        broadcasts=[broadcast(b, "2024-06-10 17:00", "2024-06-10 18:00") for b in broadcasts],
        members=[member("m061")],
        followup_audience=[audience_row(b, "mid", "m061") for b in broadcasts],
    )
    harness.instance.add_dynamic_partitions("broadcast", broadcasts)
    # The analytics assets store each check's latest outcome; b040's events were mostly bad.
    for broadcast_id, passed in (("b040", False), ("b041", True)):
        harness.store.replace_rows(
            "quality_checks",
            {"broadcast_id": broadcast_id, "asset": "raw_viewer_events"},
            pd.DataFrame(
                [
                    {
                        "check_name": "quarantine_share_below_threshold",
                        "passed": passed,
                        "description": "stored by the raw_viewer_events asset",
                    }
                ]
            ),
        )
    definitions = dg.Definitions(
        assets=[followup_sends], jobs=[followup_send_job], resources=harness.resources()
    )
    job = definitions.resolve_job_def("followup_send_job")

    results = {}
    for day, broadcast_id in enumerate(broadcasts, start=11):
        outcome = job.execute_in_process(
            partition_key=dg.MultiPartitionKey({"broadcast": broadcast_id, "step": "mid_archive"}),
            run_config={
                "ops": {
                    "followup_sends": {"config": {"now": tokyo(f"2024-06-{day} 18:00").isoformat()}}
                }
            },
            instance=harness.instance,
        )
        (materialization,) = outcome.asset_materializations_for_node("followup_sends")
        results[broadcast_id] = {k: v.value for k, v in materialization.metadata.items()}

    assert results["b040"]["skipped_by_reason"] == {"blocked_by_failed_check": 1}
    assert results["b040"]["failed_checks"] == [
        "raw_viewer_events:quarantine_share_below_threshold"
    ]
    assert results["b041"]["sent"] == 1
    assert harness.outbox_members("b040", "mid_archive") == []


def test_stale_orders_make_step_wait(tmp_path):
    harness = Harness(tmp_path)
    harness.scenarios_path = scenarios_file(tmp_path)
    load(
        harness.store,
        broadcasts=[broadcast("b043", "2024-06-10 17:00", "2024-06-10 18:00")],
        members=[member("m062")],
        followup_audience=[audience_row("b043", "mid", "m062")],
    )
    harness.instance.add_dynamic_partitions("broadcast", ["b043"])
    # The orders were last loaded (materialized) now, in wall-clock time.
    harness.instance.report_runless_asset_event(dg.AssetMaterialization("shop_orders"))
    definitions = dg.Definitions(
        assets=[followup_sends], jobs=[followup_send_job], resources=harness.resources()
    )
    job = definitions.resolve_job_def("followup_send_job")
    key = dg.MultiPartitionKey({"broadcast": "b043", "step": "mid_archive"})

    def run_at(now):
        outcome = job.execute_in_process(
            partition_key=key,
            run_config={"ops": {"followup_sends": {"config": {"now": now.isoformat()}}}},
            instance=harness.instance,
        )
        (materialization,) = outcome.asset_materializations_for_node("followup_sends")
        return {k: v.value for k, v in materialization.metadata.items()}

    # The next noon in shop time: within 24 hours, outside quiet hours.
    now = dt.datetime.now(tokyo("2024-06-10 12:00").tzinfo)
    noon = now.replace(hour=12, minute=0, second=0, microsecond=0)
    if noon <= now:
        noon += dt.timedelta(days=1)
    # Two days later the orders are older than the 36-hour limit: the step waits.
    late = run_at(noon + dt.timedelta(days=2))
    assert late["sent"] == 0
    assert late["deferred"].startswith("stale_inputs: orders were last loaded at")
    assert harness.ledger_rows().empty
    # Within the limit the same step sends.
    fresh = run_at(noon)
    assert fresh["sent"] == 1
