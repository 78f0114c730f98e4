"""Attribution: the orders each broadcast earned, during the live and after it."""

import dagster as dg
import pandas as pd

from livecrm_dagster.broadcasts import scheduled_broadcast
from livecrm_dagster.defs.attribution.attribute import attribute_orders
from livecrm_dagster.defs.ingestion.assets import raw_orders, raw_viewer_events
from livecrm_dagster.defs.partitions import broadcast_partitions
from livecrm_dagster.defs.sessions.assets import viewing_sessions
from livecrm_dagster.defs.sessions.sessionize import watched_by_member
from livecrm_dagster.quality import CheckOutcome, check_spec, record_checks
from livecrm_dagster.resources import ShopSettingsResource, WarehouseResource
from livecrm_dagster.warehouse import Warehouse


def other_viewing(store: Warehouse, broadcast_id: str, member_ids: list[str]) -> pd.DataFrame:
    """Return (member_id, broadcast_id, starts_at) of other broadcasts these members watched.

    Reads the stored sessions of other partitions, so a broadcast materialized later can
    take an order over from this one only once this partition is re-run.
    """
    sessions = store.table("viewing_sessions")
    watched = store.query_in(
        "viewing_sessions",
        "member_id",
        member_ids,
        sessions.c.broadcast_id != broadcast_id,
        sessions.c.events_inside > 0,
    )
    starts = store.read("broadcasts")[["broadcast_id", "starts_at"]]
    pairs = watched[["member_id", "broadcast_id"]].drop_duplicates()
    return pairs.merge(starts, on="broadcast_id")


def _counted_once(store: Warehouse, broadcast_id: str, attribution: pd.DataFrame) -> CheckOutcome:
    """Find orders this broadcast counts that another stored partition counts too.

    A clash appears when a broadcast was rebuilt after a later one the same member
    watched; re-running both partitions in start order resolves it.
    """
    mine = attribution.loc[attribution["counted"].astype(bool), "order_id"].tolist()
    table = store.table("order_attribution")
    others = store.query_in(
        "order_attribution",
        "order_id",
        mine,
        table.c.broadcast_id != broadcast_id,
        table.c.counted.is_(True),
    )
    clashes = sorted(others["order_id"].unique())
    return CheckOutcome(
        "orders_counted_once",
        not clashes,
        f"{len(clashes)} of {len(mine)} counted orders are also counted by another broadcast",
        {
            "clashes": len(clashes),
            "also_counted_by": ", ".join(sorted(others["broadcast_id"].unique())),
        },
    )


@dg.asset(
    group_name="attribution",
    partitions_def=broadcast_partitions,
    deps=[raw_orders, viewing_sessions, raw_viewer_events],
    check_specs=[
        check_spec(
            "order_attribution",
            "orders_counted_once",
            "No order this broadcast counts is also counted by another broadcast.",
        )
    ],
)
def order_attribution(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
) -> dg.MaterializeResult:
    """Orders of viewing members by rule (during, post-live, clicked-then-bought), net amounts."""
    settings = shop_settings.get()
    store = warehouse.get()
    broadcast = scheduled_broadcast(store, context.partition_key)
    sessions = store.read_partition("viewing_sessions", broadcast.broadcast_id)
    viewers = watched_by_member(sessions, broadcast.starts_at, broadcast.ends_at).index
    lines = store.read_partition("raw_orders", broadcast.broadcast_id)
    clicks = store.read(
        "raw_viewer_events",
        columns=["member_id", "product_id", "occurred_at"],
        broadcast_id=broadcast.broadcast_id,
        type="product_click",
    )
    buyers = sorted(set(lines["member_id"]) & set(viewers))

    attribution = attribute_orders(
        broadcast,
        lines,
        viewers,
        clicks,
        other_viewing(store, broadcast.broadcast_id, buyers),
        settings.attribution.post_live_days,
        settings.attribution.clicked_then_bought_days,
        settings.zone,
    )

    store.replace_partition("order_attribution", broadcast.broadcast_id, attribution)
    taken = attribution.loc[~attribution["counted"].astype(bool)]
    context.log.info(
        "attributed %d orders of viewing members (%d during the live, %d post-live, %d "
        "counted for a later broadcast the member watched)",
        len(attribution),
        int(attribution["during_live"].sum()),
        int(attribution["post_live"].sum()),
        len(taken),
    )
    checks = record_checks(
        store,
        broadcast.broadcast_id,
        "order_attribution",
        [_counted_once(store, broadcast.broadcast_id, attribution)],
    )
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(attribution)),
            "orders_during_live": dg.MetadataValue.int(int(attribution["during_live"].sum())),
            "orders_post_live": dg.MetadataValue.int(int(attribution["post_live"].sum())),
            "orders_clicked_then_bought": dg.MetadataValue.int(
                int(attribution["clicked_then_bought"].sum())
            ),
            "orders_counted_elsewhere": dg.MetadataValue.int(len(taken)),
        },
    )
