"""Ingestion: the schedule, members, products and orders, and each broadcast's raw rows."""

import dagster as dg
import pandas as pd

from livecrm_dagster.broadcasts import (
    describe_quarantine,
    quarantine_metadata,
    scheduled_broadcast,
    write_quarantine,
)
from livecrm_dagster.defs.ingestion.contract import quarantine_frame, text
from livecrm_dagster.defs.ingestion.events import validate_viewer_events
from livecrm_dagster.defs.ingestion.files import InputFileError, list_files, read_files
from livecrm_dagster.defs.ingestion.orders import net_order_lines, validate_orders
from livecrm_dagster.defs.ingestion.reference import (
    validate_broadcasts,
    validate_members,
    validate_products,
)
from livecrm_dagster.defs.partitions import broadcast_partitions
from livecrm_dagster.quality import CheckOutcome, check_spec, record_checks
from livecrm_dagster.resources import ShopSettingsResource, SourceResource, WarehouseResource
from livecrm_dagster.settings import ShopSettings

GROUP = "ingestion"
WHOLE_INPUT = "all"


def _read_folder(source: SourceResource, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, broken = read_files(list_files(source.input_folder(name)))
    broken_rows = broken.assign(record_key="", field="")
    return rows, quarantine_frame(name, broken_rows, "record_key", "", broken["reason"])


@dg.asset(group_name=GROUP)
def broadcasts(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
    source: SourceResource,
) -> dg.MaterializeResult:
    """The broadcast schedule, validated; replaces the whole table on every run."""
    settings = shop_settings.get()
    rows, unreadable = _read_folder(source, "broadcasts")
    schedule, quarantine = validate_broadcasts(rows, settings.source_zone("broadcasts"))
    quarantine = pd.concat([unreadable, quarantine], ignore_index=True)
    unplaced = _unplaced_events(source, set(schedule["broadcast_id"]))

    store = warehouse.get()
    store.replace_table("broadcasts", schedule)
    write_quarantine(store, WHOLE_INPUT, "broadcasts", quarantine)
    write_quarantine(store, WHOLE_INPUT, "viewer_events", unplaced)
    context.log.info(
        "loaded %d broadcasts; %s; %d viewer events name no scheduled broadcast",
        len(schedule),
        describe_quarantine(quarantine, len(rows)),
        len(unplaced),
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(schedule)),
            "broadcast_ids": dg.MetadataValue.text(", ".join(schedule["broadcast_id"])),
            "viewer_events_of_unknown_broadcasts": dg.MetadataValue.int(len(unplaced)),
            **quarantine_metadata(quarantine, len(rows)),
        }
    )


@dg.asset(group_name=GROUP)
def members(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
    source: SourceResource,
) -> dg.MaterializeResult:
    """Shop members with profile, consents and messaging IDs; replaces the whole table."""
    rows, unreadable = _read_folder(source, "members")
    valid, quarantine = validate_members(rows, shop_settings.get().source_zone("members"))
    quarantine = pd.concat([unreadable, quarantine], ignore_index=True)

    store = warehouse.get()
    store.replace_table("members", valid)
    write_quarantine(store, WHOLE_INPUT, "members", quarantine)
    context.log.info(
        "loaded %d members; %s", len(valid), describe_quarantine(quarantine, len(rows))
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(valid)),
            **quarantine_metadata(quarantine, len(rows)),
        }
    )


@dg.asset(group_name=GROUP)
def products(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, source: SourceResource
) -> dg.MaterializeResult:
    """The product catalogue with category, stock and links; replaces the whole table."""
    rows, unreadable = _read_folder(source, "products")
    valid, quarantine = validate_products(rows)
    quarantine = pd.concat([unreadable, quarantine], ignore_index=True)

    store = warehouse.get()
    store.replace_table("products", valid)
    write_quarantine(store, WHOLE_INPUT, "products", quarantine)
    context.log.info(
        "loaded %d products; %s", len(valid), describe_quarantine(quarantine, len(rows))
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(valid)),
            **quarantine_metadata(quarantine, len(rows)),
        }
    )


@dg.asset(group_name=GROUP)
def shop_orders(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
    source: SourceResource,
) -> dg.MaterializeResult:
    """Every order line of the shop, merged across exports with each order's latest status."""
    if source.orders_url:
        rows, unreadable = (
            source.read_order_rows(),
            quarantine_frame("orders", pd.DataFrame(), "order_id", "", ""),
        )
    else:
        rows, unreadable = _read_folder(source, "orders")
    batch = validate_orders(rows, shop_settings.get().source_zone("orders"))
    quarantine = pd.concat([unreadable, batch.quarantine], ignore_index=True)

    store = warehouse.get()
    store.replace_table("orders", batch.lines)
    write_quarantine(store, WHOLE_INPUT, "orders", quarantine)
    context.log.info(
        "loaded %d order lines (%d repeated lines of earlier exports merged); %s",
        len(batch.lines),
        batch.duplicates_dropped,
        describe_quarantine(quarantine, batch.rows_read),
    )
    statuses = batch.lines.drop_duplicates("order_id")["status"].value_counts()
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(batch.lines)),
            "orders": dg.MetadataValue.int(int(batch.lines["order_id"].nunique())),
            "orders_by_status": dg.MetadataValue.json(
                {status: int(count) for status, count in statuses.items()}
            ),
            "repeated_lines_merged": dg.MetadataValue.int(batch.duplicates_dropped),
            **quarantine_metadata(quarantine, batch.rows_read),
        }
    )


def _unplaced_events(source: SourceResource, known: set[str]) -> pd.DataFrame:
    """Quarantine event rows no partition will read: unknown broadcasts, broken lines.

    Only shared files and sub-folders not named after a scheduled broadcast are read,
    because every other event file is read and checked by its broadcast's partition.
    """
    folder = source.input_folder("viewer_events")
    paths = [
        path
        for path in list_files(folder)
        if path.parent == folder or path.relative_to(folder).parts[0] not in known
    ]
    frames, broken_lines, unreadable = [], [], []
    for path in paths:
        try:
            frame, bad = read_files([path])
        except InputFileError as error:
            # The partitions that read this file fail with the same error; here it must
            # not stop the schedule, or no new broadcast could be registered.
            unreadable.append({"_file": str(path), "_line": 0, "reason": str(error)})
            continue
        frames.append(frame)
        broken_lines.append(bad)
    rows, broken = read_files([])
    rows = pd.concat([rows, *frames], ignore_index=True).fillna("")
    broken = pd.concat(
        [broken, *broken_lines, pd.DataFrame(unreadable, columns=broken.columns)],
        ignore_index=True,
    )
    unknown = rows.loc[~text(rows, "broadcast_id").isin(known)]
    reason = "unknown broadcast: " + text(unknown, "broadcast_id").str.slice(0, 80)
    return pd.concat(
        [
            quarantine_frame("viewer_events", unknown, "event_id", "broadcast_id", reason),
            quarantine_frame(
                "viewer_events", broken.assign(record_key=""), "record_key", "", broken["reason"]
            ),
        ],
        ignore_index=True,
    )


def _event_rows(source: SourceResource, broadcast_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the broadcast's events: rows of shared files, plus its own sub-folder's files.

    Files directly in `viewer_events/` may mix broadcasts, so they are filtered by
    broadcast_id. A sub-folder named after a broadcast contains that broadcast's events
    only, so reading one partition does not parse every other broadcast's files.
    """
    folder = source.input_folder("viewer_events")
    shared = [path for path in list_files(folder) if path.parent == folder]
    own = list_files(folder / broadcast_id)
    shared_rows, shared_broken = read_files(shared)
    own_rows, own_broken = read_files(own)
    shared_rows = shared_rows.loc[text(shared_rows, "broadcast_id") == broadcast_id]
    rows = pd.concat([shared_rows, own_rows], ignore_index=True).fillna("")
    # A broken line in a shared file names no broadcast, so the `broadcasts` asset
    # quarantines it. A broken line in this broadcast's own folder is quarantined here.
    broken = own_broken
    broken_rows = broken.assign(record_key="", field="")
    return rows, quarantine_frame("viewer_events", broken_rows, "record_key", "", broken["reason"])


def _event_checks(events, broadcast, quarantine, rows_read, settings: ShopSettings):
    limit = settings.quality.max_quarantine_share
    share = len(quarantine) / rows_read if rows_read else 0.0
    inside = events.loc[
        events["type"].isin(["view_start", "heartbeat", "view_end"])
        & (events["member_id"] != "")
        & (events["occurred_at"] >= broadcast.starts_at)
        & (events["occurred_at"] <= broadcast.ends_at)
    ]
    return [
        CheckOutcome(
            "quarantine_share_below_threshold",
            share <= limit,
            f"{len(quarantine):,} of {rows_read:,} rows quarantined "
            f"({share:.1%}, limit {limit:.1%})",
            {"quarantined": len(quarantine), "rows_read": rows_read, "share": share},
        ),
        CheckOutcome(
            "viewing_events_arrived",
            not inside.empty,
            f"{inside['member_id'].nunique():,} members sent viewing events during the broadcast",
            {"viewing_events": len(inside)},
        ),
    ]


@dg.asset(
    group_name=GROUP,
    partitions_def=broadcast_partitions,
    deps=[broadcasts],
    check_specs=[
        check_spec(
            "raw_viewer_events",
            "quarantine_share_below_threshold",
            "At most the configured share of the broadcast's event rows was quarantined.",
        ),
        check_spec(
            "raw_viewer_events",
            "viewing_events_arrived",
            "At least one member sent a viewing event during the broadcast.",
        ),
    ],
)
def raw_viewer_events(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
    source: SourceResource,
) -> dg.MaterializeResult:
    """A broadcast's viewer events, validated and deduplicated; a re-run replaces its rows."""
    settings = shop_settings.get()
    store = warehouse.get()
    broadcast = scheduled_broadcast(store, context.partition_key)
    rows, unreadable = _event_rows(source, broadcast.broadcast_id)

    batch = validate_viewer_events(
        rows,
        broadcast.broadcast_id,
        broadcast.starts_at,
        broadcast.ends_at,
        settings.sessions.implausible_hours,
        settings.source_zone("viewer_events"),
    )
    quarantine = pd.concat([unreadable, batch.quarantine], ignore_index=True)
    rows_read = batch.rows_read + len(unreadable)

    store.replace_partition("raw_viewer_events", broadcast.broadcast_id, batch.events)
    write_quarantine(store, broadcast.broadcast_id, "viewer_events", quarantine)
    context.log.info(
        "kept %d events, dropped %d repeated deliveries; %s",
        len(batch.events),
        batch.duplicates_dropped,
        describe_quarantine(quarantine, rows_read),
    )
    by_type = batch.events["type"].value_counts()
    checks = record_checks(
        store,
        broadcast.broadcast_id,
        "raw_viewer_events",
        _event_checks(batch.events, broadcast, quarantine, rows_read, settings),
    )
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(batch.events)),
            "events_by_type": dg.MetadataValue.json({k: int(v) for k, v in by_type.items()}),
            "repeated_deliveries_dropped": dg.MetadataValue.int(batch.duplicates_dropped),
            **quarantine_metadata(quarantine, rows_read),
        },
    )


@dg.asset(group_name=GROUP, partitions_def=broadcast_partitions, deps=[broadcasts, shop_orders])
def raw_orders(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
) -> dg.MaterializeResult:
    """Order lines paid in a broadcast's attribution window, net of cancellations and refunds."""
    settings = shop_settings.get()
    store = warehouse.get()
    broadcast = scheduled_broadcast(store, context.partition_key)
    days = max(settings.attribution.post_live_days, settings.attribution.clicked_then_bought_days)
    window_end = broadcast.ends_at + pd.Timedelta(days=days)

    orders = store.table("orders")
    in_window = store.query(
        "orders",
        orders.c.paid_at >= broadcast.starts_at.to_pydatetime(),
        orders.c.paid_at <= window_end.to_pydatetime(),
        orders.c.refund_of == "",
    )
    credit_notes = store.read("orders", refund_of=sorted(in_window["order_id"].unique()))
    lines = net_order_lines(in_window, credit_notes)

    store.replace_partition("raw_orders", broadcast.broadcast_id, lines)
    orders_count = lines["order_id"].nunique()
    undone = lines.loc[lines["status"].isin(["cancelled", "refunded"]), "order_id"].nunique()
    context.log.info(
        "kept %d order lines of %d orders paid in the window (%d cancelled or refunded, "
        "%d credit notes netted)",
        len(lines),
        orders_count,
        undone,
        credit_notes["order_id"].nunique(),
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(lines)),
            "orders": dg.MetadataValue.int(int(orders_count)),
            "guest_orders": dg.MetadataValue.int(
                int(lines.loc[lines["member_id"] == "", "order_id"].nunique())
            ),
            "cancelled_or_refunded_orders": dg.MetadataValue.int(int(undone)),
            "credit_notes_netted": dg.MetadataValue.int(int(credit_notes["order_id"].nunique())),
            "net_amount": dg.MetadataValue.int(int(lines["net_amount"].sum())),
        }
    )
