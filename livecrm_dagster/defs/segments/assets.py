"""Segments: the follow-up audience of each broadcast, by segment."""

import dagster as dg

from livecrm_dagster.broadcasts import audience_of, scheduled_broadcast
from livecrm_dagster.defs.attribution.assets import order_attribution
from livecrm_dagster.defs.partitions import broadcast_partitions
from livecrm_dagster.defs.reporting.assets import viewer_summary
from livecrm_dagster.defs.segments.segment import SEGMENTS
from livecrm_dagster.resources import ShopSettingsResource, WarehouseResource


@dg.asset(
    group_name="segments",
    partitions_def=broadcast_partitions,
    deps=[viewer_summary, order_attribution],
)
def followup_audience(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
) -> dg.MaterializeResult:
    """Viewing members by segment (hot, mid, low, coupon, clicked-not-bought, survey, buyer)."""
    tiers = shop_settings.get().tiers
    store = warehouse.get()
    broadcast = scheduled_broadcast(store, context.partition_key)
    summary = store.read_partition("viewer_summary", broadcast.broadcast_id)
    attribution = store.read_partition("order_attribution", broadcast.broadcast_id)
    audience = audience_of(store, broadcast.broadcast_id, summary, attribution, tiers)

    store.replace_partition("followup_audience", broadcast.broadcast_id, audience)
    sizes = audience.groupby("segment")["member_id"].nunique().reindex(SEGMENTS, fill_value=0)
    context.log.info(
        "segmented %s", ", ".join(f"{name} {int(size)}" for name, size in sizes.items())
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(audience)),
            "members_by_segment": dg.MetadataValue.json({k: int(v) for k, v in sizes.items()}),
        }
    )
