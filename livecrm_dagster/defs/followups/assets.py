"""Dagster objects of the follow-ups: the per-(broadcast, step) send asset and its sensor."""

import datetime as dt
import json

import dagster as dg
from dagster._core.event_api import PartitionKeyFilter
from dagster_shared.check import CheckError
from pydantic import Field

from livecrm_dagster.defs.followups.plan import in_quiet_hours, step_timing
from livecrm_dagster.defs.followups.resources import (
    FollowupChannelsResource,
    FollowupClockResource,
    FollowupScenariosResource,
    parse_instant,
)
from livecrm_dagster.defs.followups.scenarios import FollowupSettings, load_scenarios
from livecrm_dagster.defs.followups.send import StepResult, run_step
from livecrm_dagster.defs.partitions import broadcast_partitions
from livecrm_dagster.defs.segments.assets import followup_audience
from livecrm_dagster.quality import failed_checks as failed_quality_checks
from livecrm_dagster.resources import ShopSettingsResource, WarehouseResource
from livecrm_dagster.settings import ShopSettings
from livecrm_dagster.warehouse import Warehouse

# Step partition keys are fixed when the code location loads, from the same file the
# scenarios resource reads by default ($LIVECRM_SCENARIOS or the bundled one).
step_partitions = dg.StaticPartitionsDefinition(load_scenarios().step_ids())
followup_partitions = dg.MultiPartitionsDefinition(
    {"broadcast": broadcast_partitions, "step": step_partitions}
)
DECISIONS_IN_METADATA = 500


class FollowupSendConfig(dg.Config):
    """Run settings of one step run."""

    now: str = Field(
        default="",
        description="The run's clock as ISO 8601 with an offset; empty means the wall clock.",
    )
    dry_run: bool = Field(
        default=False,
        description="Decide who would receive what and why others are skipped; send nothing.",
    )


@dg.asset(
    group_name="followups",
    partitions_def=followup_partitions,
    deps=[followup_audience],
    tags={"livecrm/kind": "send"},
)
def followup_sends(
    context: dg.AssetExecutionContext,
    config: FollowupSendConfig,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
    followup_scenarios: FollowupScenariosResource,
    followup_channels: FollowupChannelsResource,
) -> dg.MaterializeResult:
    """Send one follow-up step of one broadcast, re-checking its audience at send time."""
    keys = context.partition_key.keys_by_dimension
    broadcast_id, step_id = keys["broadcast"], keys["step"]
    now = parse_instant(config.now) if config.now else dt.datetime.now(dt.UTC)
    settings = followup_scenarios.get()
    store = warehouse.get()
    # The warehouse keeps the latest outcome of every check of the analytics assets, so
    # a failed input check blocks the step however the run was launched.
    failed_checks = sorted(
        set(failed_upstream_checks(context, broadcast_id, settings.blocking_checks))
        | set(failed_quality_checks(store, broadcast_id))
    )
    stale = stale_inputs(context.instance, store, shop_settings.get(), broadcast_id, now)
    if stale:
        # Nothing is decided, so the ledger stays empty and a later run sends normally.
        context.log.warning("%s of %s waits: %s", step_id, broadcast_id, stale)
        waiting = StepResult(broadcast_id, step_id, dry_run=config.dry_run)
        waiting.deferred = f"stale_inputs: {stale}"
        return dg.MaterializeResult(metadata=_metadata(waiting, now))
    if failed_checks:
        context.log.warning(
            "%s of %s blocked by failed checks: %s", step_id, broadcast_id, ", ".join(failed_checks)
        )
    result = run_step(
        store,
        settings,
        shop_settings.get(),
        followup_channels.channel,
        broadcast_id,
        step_id,
        now,
        run_id=context.run.run_id,
        dry_run=config.dry_run,
        failed_checks=failed_checks,
    )
    counts = result.counts()
    context.log.info(
        "%s%s of %s at %s: %s",
        "dry run of " if config.dry_run else "",
        step_id,
        broadcast_id,
        now.isoformat(),
        json.dumps(counts, sort_keys=True),
    )
    metadata = _metadata(result, now)
    metadata["failed_checks"] = dg.MetadataValue.json(failed_checks)
    return dg.MaterializeResult(metadata=metadata)


def _latest_materialization(
    instance: dg.DagsterInstance, asset: str, partition: str | None
) -> dt.datetime | None:
    records_filter = dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None
    )
    records = instance.fetch_materializations(records_filter, limit=1).records
    if not records:
        return None
    return dt.datetime.fromtimestamp(records[0].timestamp, dt.UTC)


def stale_inputs(
    instance: dg.DagsterInstance,
    store: Warehouse,
    shop: ShopSettings,
    broadcast_id: str,
    now: dt.datetime,
) -> str | None:
    """Return why a step's inputs are too old to send on, or None when they are fresh.

    The audience must have been built after the broadcast settled (late events are in),
    and the orders, which decide who has bought since, must have been loaded within
    `operations.max_input_age_hours` of `now`. An input this instance never
    materialized (loaded into the warehouse by other means) is not judged.
    """
    broadcasts = store.read("broadcasts", broadcast_id=broadcast_id)
    if broadcasts.empty:
        return None
    settled_at = broadcasts.iloc[0]["ends_at"].to_pydatetime() + dt.timedelta(
        minutes=shop.operations.settle_minutes
    )
    audience_at = _latest_materialization(instance, "followup_audience", broadcast_id)
    if audience_at is not None and audience_at < settled_at:
        return (
            f"followup_audience of {broadcast_id} was built at {audience_at.isoformat()}, "
            f"before the broadcast settled at {settled_at.isoformat()}; rebuild the broadcast"
        )
    orders_at = _latest_materialization(instance, "shop_orders", None)
    limit = dt.timedelta(hours=shop.operations.max_input_age_hours)
    if orders_at is not None and now - orders_at > limit:
        return (
            f"orders were last loaded at {orders_at.isoformat()}, more than "
            f"{shop.operations.max_input_age_hours:g} h before {now.isoformat()}; "
            "run the reference_data job"
        )
    return None


def failed_upstream_checks(
    context: dg.AssetExecutionContext, broadcast_id: str, configured: list[str]
) -> list[str]:
    """Return the asset checks whose latest evaluation for the broadcast failed.

    The checks are those named in the scenarios' `blocking_checks`, and every check of an
    upstream asset when the run has its code location's asset graph. Only checks
    evaluated per partition (the broadcast as partition key) are seen, and checks of WARN
    severity do not block.
    """
    check_keys = {dg.AssetCheckKey.from_user_string(key) for key in configured}
    try:
        graph = context.repository_def.asset_graph
    except CheckError:
        # In-process runs (`materialize`, `execute_in_process`) have no repository, so only
        # the configured checks are read.
        graph = None
    if graph is not None:
        # NOTE: tests run in process, so this discovery path has not run in a test; a
        # daemon-launched run is expected to carry its repository.
        selection = dg.AssetSelection.assets(context.asset_key).upstream(include_self=False)
        check_keys |= graph.get_check_keys_for_assets(selection.resolve(graph))
    if not check_keys:
        return []
    # NOTE: Dagster 1.13 has no public API for the latest check result of one partition,
    # so this reads the event log storage directly.
    records = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(
        list(check_keys), partition_filter=PartitionKeyFilter(key=broadcast_id)
    )
    failed = []
    for key, record in records.items():
        evaluation = record.event.asset_check_evaluation if record.event else None
        if evaluation is not None and not evaluation.passed:
            if evaluation.severity == dg.AssetCheckSeverity.ERROR:
                failed.append(key.to_user_string())
    return sorted(failed)


def _metadata(result: StepResult, now: dt.datetime) -> dict[str, dg.MetadataValue]:
    counts = result.counts()
    lines = [f"| sent | {result.sent} |", f"| failed | {result.failed} |"]
    lines += [f"| holdout | {result.holdout} |"]
    lines += [
        f"| skipped: {reason} | {count} |" for reason, count in sorted(result.skipped.items())
    ]
    summary = "| outcome | members |\n|---|---|\n" + "\n".join(lines)
    if result.deferred:
        summary = f"Nothing sent: {result.deferred}.\n\n" + summary
    metadata = {
        "now": dg.MetadataValue.text(now.isoformat()),
        "dry_run": dg.MetadataValue.bool(result.dry_run),
        "audience": dg.MetadataValue.int(result.audience),
        "sent": dg.MetadataValue.int(result.sent),
        "failed": dg.MetadataValue.int(result.failed),
        "holdout": dg.MetadataValue.int(result.holdout),
        "skipped": dg.MetadataValue.int(counts["skipped"]),
        "skipped_by_reason": dg.MetadataValue.json(counts["skipped_by_reason"]),
        "deferred": dg.MetadataValue.text(result.deferred or ""),
        "summary": dg.MetadataValue.md(summary),
    }
    if result.dry_run:
        # Member IDs only: addresses and LINE user IDs never go into metadata.
        metadata["decisions"] = dg.MetadataValue.json(result.decisions[:DECISIONS_IN_METADATA])
    return metadata


followup_send_job = dg.define_asset_job(
    "followup_send_job",
    selection=[followup_sends],
    tags={"livecrm/kind": "send"},
)


def run_key(broadcast_id: str, step_id: str) -> str:
    return f"followup:{broadcast_id}:{step_id}"


def due_steps(
    warehouse: Warehouse, settings: FollowupSettings, shop: ShopSettings, now: dt.datetime
) -> tuple[list[tuple[str, str, dt.datetime]], list[str]]:
    """Return (broadcast, step, trigger time) of every enabled step that may run at `now`,
    for the broadcasts still inside their follow-up window, and the IDs of those broadcasts."""
    table = warehouse.table("broadcasts")
    window_start = now - dt.timedelta(days=settings.followup_window_days)
    recent = warehouse.query("broadcasts", table.c.ends_at >= window_start, table.c.ends_at <= now)
    # The same broadcast delivered twice must still give one request per step.
    recent = recent.drop_duplicates("broadcast_id").sort_values(["ends_at", "broadcast_id"])
    # A step whose time passed before quiet hours began (the sensor was stopped, say) waits
    # for their end. Only a step whose offer has expired runs now, to record its skips, so
    # no run key is spent on a run that would only defer.
    quiet_now = in_quiet_hours(now, settings.quiet_hours, shop.zone)
    due = []
    for row in recent.itertuples(index=False):
        for step in settings.enabled_steps():
            timing = step_timing(step, row.ends_at.to_pydatetime(), settings, shop.zone)
            if timing.trigger_at > now:
                continue
            expired = timing.expires_before_send or (
                timing.expires_at is not None and now > timing.expires_at
            )
            if quiet_now and not expired:
                continue
            due.append((row.broadcast_id, step.id, timing.trigger_at))
    return due, list(recent["broadcast_id"])


def next_due(
    warehouse: Warehouse, settings: FollowupSettings, shop: ShopSettings, now: dt.datetime
) -> tuple[str, str, dt.datetime] | None:
    """Return the next step that falls due after `now`, for the sensor's skip reason."""
    table = warehouse.table("broadcasts")
    window_start = now - dt.timedelta(days=settings.followup_window_days)
    rows = warehouse.query("broadcasts", table.c.ends_at >= window_start)
    upcoming = []
    for row in rows.itertuples(index=False):
        for step in settings.enabled_steps():
            timing = step_timing(step, row.ends_at.to_pydatetime(), settings, shop.zone)
            if timing.trigger_at > now:
                upcoming.append((timing.trigger_at, row.broadcast_id, step.id))
    if not upcoming:
        return None
    trigger_at, broadcast_id, step_id = min(upcoming)
    return broadcast_id, step_id, trigger_at


@dg.sensor(
    job=followup_send_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def due_followup_steps(
    context: dg.SensorEvaluationContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
    followup_scenarios: FollowupScenariosResource,
    followup_clock: FollowupClockResource,
) -> dg.SensorResult:
    """Request one run per follow-up step that has fallen due, for broadcasts in their window."""
    now = followup_clock.current_time()
    settings = followup_scenarios.get()
    shop = shop_settings.get()
    store = warehouse.get()
    due, broadcast_ids = due_steps(store, settings, shop, now)

    # The cursor lists the run keys already requested for broadcasts still in the window,
    # so a step is requested once even without the daemon's run-key check (tests, replays).
    previous = set(json.loads(context.cursor)["requested"]) if context.cursor else set()
    # Keys are dropped once their broadcast leaves the window, which bounds the cursor.
    in_window = {key for key in previous if key.split(":")[1] in set(broadcast_ids)}
    requests: dict[str, dg.RunRequest] = {}
    unknown_partitions: set[str] = set()
    # One query for all keys rather than one per due step.
    registered = (
        set(context.instance.get_dynamic_partitions(broadcast_partitions.name)) if due else set()
    )
    for broadcast_id, step_id, _ in due:
        key = run_key(broadcast_id, step_id)
        if key in previous or key in requests:
            continue
        if broadcast_id not in registered:
            unknown_partitions.add(broadcast_id)
            continue
        requests[key] = dg.RunRequest(
            run_key=key,
            partition_key=dg.MultiPartitionKey({"broadcast": broadcast_id, "step": step_id}),
            # A fixed clock (a replay or a test) travels with the run. A live run decides
            # quiet hours and offer expiry at the time it executes, not at this tick: it
            # may wait in the run queue, or be re-executed from the UI days later.
            run_config=dg.RunConfig(ops={"followup_sends": FollowupSendConfig(now=now.isoformat())})
            if followup_clock.now
            else None,
            tags={"livecrm/broadcast": broadcast_id, "livecrm/step": step_id},
        )
    cursor = json.dumps({"requested": sorted(in_window | set(requests))})
    if unknown_partitions:
        context.log.warning(
            "steps due for broadcasts without a partition yet, retried next tick: %s",
            ", ".join(sorted(unknown_partitions)),
        )
    if requests:
        shown = list(requests)[:10]
        more = f" and {len(requests) - len(shown)} more" if len(requests) > len(shown) else ""
        context.log.info("requesting %d runs: %s%s", len(requests), ", ".join(shown), more)
        return dg.SensorResult(run_requests=list(requests.values()), cursor=cursor)

    upcoming = next_due(store, settings, shop, now)
    following = (
        f"; next: {upcoming[1]} of {upcoming[0]} at {upcoming[2].isoformat()}"
        if upcoming
        else "; nothing else is scheduled"
    )
    skip = (
        f"at {now.isoformat()}: {len(broadcast_ids)} broadcast(s) in the follow-up window, "
        f"{len(due)} step(s) may run now, all already requested"
        f"{f', {len(unknown_partitions)} waiting for a partition' if unknown_partitions else ''}"
        f"{following}"
    )
    return dg.SensorResult(skip_reason=dg.SkipReason(skip), cursor=cursor)
