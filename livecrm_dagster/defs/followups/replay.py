"""Replay the follow-up timeline of some broadcasts on a simulated clock.

The replay takes the live path: it evaluates the `due_followup_steps` sensor at every
instant a step falls due, then executes each requested run in process with the sensor's
`now`. Sends go through the configured channels (the file outbox by default) and the
send ledger exactly as in production.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import dagster as dg
import pandas as pd

from livecrm_dagster.defs.followups.plan import step_timing
from livecrm_dagster.defs.followups.resources import FollowupClockResource

SENSOR_NAME = "due_followup_steps"
JOB_NAME = "followup_send_job"
ASSET_NAME = "followup_sends"
COUNT_COLUMNS = ["audience", "sent", "failed", "holdout", "skipped"]


def replay_followups(
    instance: dg.DagsterInstance,
    definitions: dg.Definitions,
    broadcast_ids: Iterable[str],
    until: dt.datetime | None = None,
    dry_run: bool = False,
) -> pd.DataFrame:
    """Replay the follow-up steps of `broadcast_ids` up to `until` (default: all of them).

    Returns one row per (broadcast, step) run: the simulated time it ran, the counts sent,
    failed, holdout and skipped, and one `skipped_<reason>` column per skip reason. With
    `dry_run`, nothing is sent and the ledger is not written. The rows are then one per
    (broadcast, step, member) with the decision (`would_send`, `skipped`, `holdout`) and
    its reason, for at most 500 members per step (the asset's metadata limit).
    """
    if not isinstance(definitions, dg.Definitions) and callable(definitions):
        definitions = definitions()
    if until is not None and until.tzinfo is None:
        raise ValueError(f"`until` needs a UTC offset: {until!r}")
    broadcast_ids = list(dict.fromkeys(broadcast_ids))
    sensor = definitions.resolve_sensor_def(SENSOR_NAME)
    job = definitions.resolve_job_def(JOB_NAME)
    resources = dict(definitions.resources or {})
    instance.add_dynamic_partitions("broadcast", broadcast_ids)

    timeline = _timeline(resources, broadcast_ids, until)
    requested_ids = set(broadcast_ids)
    rows: list[dict] = []
    cursor: str | None = None
    for now in timeline:
        context = dg.build_sensor_context(
            instance=instance,
            cursor=cursor,
            resources={**resources, "followup_clock": FollowupClockResource(now=now.isoformat())},
            definitions=definitions,
        )
        # evaluate_tick validates the dynamic partition keys, which needs the instance.
        with dg.partition_loading_context(dynamic_partitions_store=instance):
            tick = sensor.evaluate_tick(context)
        cursor = tick.cursor
        for request in tick.run_requests or []:
            broadcast_id = request.tags["livecrm/broadcast"]
            step_id = request.tags["livecrm/step"]
            if broadcast_id not in requested_ids:
                continue
            result = job.execute_in_process(
                run_config={
                    "ops": {ASSET_NAME: {"config": {"now": now.isoformat(), "dry_run": dry_run}}},
                    # Step events stay in the instance's event log; the console shows
                    # warnings only.
                    "loggers": {"console": {"config": {"log_level": "WARNING"}}},
                },
                partition_key=request.partition_key,
                instance=instance,
                tags=request.tags,
            )
            (materialization,) = result.asset_materializations_for_node(ASSET_NAME)
            metadata = {key: value.value for key, value in materialization.metadata.items()}
            rows.extend(_rows(broadcast_id, step_id, now, metadata, dry_run))
    return _frame(rows, dry_run)


def _timeline(
    resources: dict, broadcast_ids: list[str], until: dt.datetime | None
) -> list[dt.datetime]:
    """Return the sorted instants at which any step of the broadcasts is requested."""
    # Resolve EnvVar fields the way a run would, without starting a run.
    store = resources["warehouse"].process_config_and_initialize().get()
    settings = resources["followup_scenarios"].process_config_and_initialize().get()
    zone = resources["shop_settings"].process_config_and_initialize().get().zone
    broadcasts = store.read("broadcasts", broadcast_id=broadcast_ids)
    missing = sorted(set(broadcast_ids) - set(broadcasts["broadcast_id"]))
    if missing:
        raise ValueError(
            f"broadcasts not found in the broadcasts table: {missing}; "
            "materialize `broadcasts` first"
        )
    instants = set()
    for row in broadcasts.itertuples(index=False):
        for step in settings.enabled_steps():
            timing = step_timing(step, row.ends_at.to_pydatetime(), settings, zone)
            if until is None or timing.trigger_at <= until:
                instants.add(timing.trigger_at)
    return sorted(instants)


def _rows(
    broadcast_id: str, step_id: str, now: dt.datetime, metadata: dict, dry_run: bool
) -> list[dict]:
    base = {"broadcast_id": broadcast_id, "step_id": step_id, "run_at": now}
    if dry_run:
        return [{**base, **decision} for decision in metadata.get("decisions", [])]
    counts = {column: metadata[column] for column in COUNT_COLUMNS}
    reasons = {f"skipped_{r}": n for r, n in (metadata["skipped_by_reason"] or {}).items()}
    return [{**base, **counts, **reasons, "deferred": metadata["deferred"] or None}]


def _frame(rows: list[dict], dry_run: bool) -> pd.DataFrame:
    if dry_run:
        columns = ["broadcast_id", "step_id", "run_at", "member_id", "segment", "decision"]
        columns += ["reason", "subject"]
        return pd.DataFrame(rows, columns=columns)
    frame = pd.DataFrame(rows, columns=["broadcast_id", "step_id", "run_at", *COUNT_COLUMNS])
    if rows:
        frame = pd.DataFrame(rows)
        reason_columns = sorted(c for c in frame.columns if c.startswith("skipped_"))
        frame[reason_columns] = frame[reason_columns].fillna(0).astype("int64")
        fixed = ["broadcast_id", "step_id", "run_at", *COUNT_COLUMNS]
        frame = frame[[*fixed, *reason_columns, "deferred"]]
    return frame
