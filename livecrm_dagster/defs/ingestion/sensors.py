"""Discovery of new broadcasts, first builds after the settling delay, late-data rebuilds."""

import dagster as dg

from livecrm_dagster.defs.followups.resources import FollowupClockResource
from livecrm_dagster.defs.ingestion.due import recently_ended, schedule_fingerprint, settled
from livecrm_dagster.defs.ingestion.files import list_files, read_files
from livecrm_dagster.defs.ingestion.reference import validate_broadcasts
from livecrm_dagster.defs.jobs import broadcast_analytics, reference_data
from livecrm_dagster.defs.partitions import broadcast_partitions
from livecrm_dagster.resources import ShopSettingsResource, SourceResource, WarehouseResource
from livecrm_dagster.settings import load_settings

BROADCAST_TAG = "livecrm/broadcast"


@dg.sensor(
    jobs=[reference_data, broadcast_analytics],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def new_broadcasts(
    context: dg.SensorEvaluationContext,
    shop_settings: ShopSettingsResource,
    source: SourceResource,
    followup_clock: FollowupClockResource,
) -> dg.SensorResult | dg.SkipReason:
    """Adds a partition per new broadcast in the schedule files and builds it once settled."""
    settings = shop_settings.get()
    now = followup_clock.current_time()
    rows, _ = read_files(list_files(source.input_folder("broadcasts")))
    schedule, quarantine = validate_broadcasts(rows, settings.source_zone("broadcasts"))

    known = set(context.instance.get_dynamic_partitions(broadcast_partitions.name))
    new_ids = [key for key in schedule["broadcast_id"] if key not in known]
    requests = []
    if not schedule.empty:
        # The schedule's content names the run, so each change reloads the tables once.
        requests.append(
            dg.RunRequest(
                job_name=reference_data.name,
                run_key=f"schedule:{schedule_fingerprint(schedule)}",
            )
        )
    for broadcast_id in settled(schedule, now, settings.operations.settle_minutes)["broadcast_id"]:
        requests.append(
            dg.RunRequest(
                job_name=broadcast_analytics.name,
                partition_key=broadcast_id,
                run_key=f"analytics:{broadcast_id}",
                tags={BROADCAST_TAG: broadcast_id},
            )
        )
    if quarantine is not None and len(quarantine):
        context.log.warning(
            "%d schedule rows are invalid and were not added; see the broadcasts asset's "
            "quarantine",
            len(quarantine),
        )
    if not new_ids and not requests:
        return dg.SkipReason(
            f"the schedule lists {len(schedule)} valid broadcasts, none new and none settled"
        )
    context.log.info(
        "schedule lists %d valid broadcasts; %d new; %d run requests",
        len(schedule),
        len(new_ids),
        len(requests),
    )
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[broadcast_partitions.build_add_request(new_ids)]
        if new_ids
        else [],
    )


@dg.schedule(
    job=reference_data,
    cron_schedule="0 5 * * *",
    # The cron is read in shop time; the settings file is read when the code loads.
    execution_timezone=load_settings().timezone,
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
def daily_reference_reload(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Reloads orders and the schedule every morning so late orders and cancellations arrive."""
    return dg.RunRequest(run_key=f"daily:{context.scheduled_execution_time:%Y-%m-%d}")


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[reference_data],
    request_job=broadcast_analytics,
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def rebuild_recent_broadcasts(
    context: dg.RunStatusSensorContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
    followup_clock: FollowupClockResource,
):
    """After orders reload, rebuilds every broadcast that ended in the last refresh_days."""
    settings = shop_settings.get()
    schedule = warehouse.get().read("broadcasts")
    known = set(context.instance.get_dynamic_partitions(broadcast_partitions.name))
    recent = recently_ended(
        schedule, followup_clock.current_time(), settings.operations.refresh_days
    )
    recent = recent.loc[recent["broadcast_id"].isin(known)]
    if recent.empty:
        return dg.SkipReason(
            f"no registered broadcast ended in the last {settings.operations.refresh_days:g} days"
        )
    run_id = context.dagster_run.run_id
    return [
        dg.RunRequest(
            partition_key=broadcast_id,
            run_key=f"refresh:{run_id}:{broadcast_id}",
            tags={BROADCAST_TAG: broadcast_id},
        )
        for broadcast_id in recent["broadcast_id"]
    ]
