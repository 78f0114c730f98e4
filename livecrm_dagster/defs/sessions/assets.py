"""Sessions: each member's merged viewing sessions of a broadcast."""

import dagster as dg

from livecrm_dagster.broadcasts import scheduled_broadcast
from livecrm_dagster.defs.ingestion.assets import raw_viewer_events
from livecrm_dagster.defs.partitions import broadcast_partitions
from livecrm_dagster.defs.sessions.sessionize import sessions_of_blocks, watched_by_member
from livecrm_dagster.resources import ShopSettingsResource, WarehouseResource


@dg.asset(group_name="sessions", partitions_def=broadcast_partitions, deps=[raw_viewer_events])
def viewing_sessions(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
) -> dg.MaterializeResult:
    """Members' merged viewing sessions with clipped watched seconds; replaces the partition."""
    timeout = shop_settings.get().sessions.timeout_seconds
    store = warehouse.get()
    broadcast = scheduled_broadcast(store, context.partition_key)
    blocks = store.events.blocks(
        broadcast.broadcast_id,
        columns=["member_id", "device_id", "type", "occurred_at"],
        categorical=True,
    )

    sessions = sessions_of_blocks(blocks, broadcast.starts_at, broadcast.ends_at, timeout)
    watched = watched_by_member(sessions, broadcast.starts_at, broadcast.ends_at)

    store.replace_partition("viewing_sessions", broadcast.broadcast_id, sessions)
    context.log.info(
        "cut %d sessions of %d members (timeout %.0f s); %d are viewing members",
        len(sessions),
        sessions["member_id"].nunique(),
        timeout,
        len(watched),
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(sessions)),
            "viewing_members": dg.MetadataValue.int(len(watched)),
            "session_timeout_seconds": dg.MetadataValue.float(float(timeout)),
            "multi_device_sessions": dg.MetadataValue.int(int((sessions["devices"] > 1).sum())),
        }
    )
