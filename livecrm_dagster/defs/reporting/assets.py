"""Reporting: the per-member viewer summary and each broadcast's KPI report."""

import dagster as dg
import pandas as pd

from livecrm_dagster.broadcasts import audience_of, scheduled_broadcast
from livecrm_dagster.defs.attribution.assets import order_attribution
from livecrm_dagster.defs.ingestion.assets import members, raw_viewer_events
from livecrm_dagster.defs.partitions import broadcast_partitions
from livecrm_dagster.defs.reporting.plots import broadcast_charts, markdown_image
from livecrm_dagster.defs.reporting.summary import (
    broadcast_kpis as compute_kpis,
)
from livecrm_dagster.defs.reporting.summary import (
    format_money,
    report_line,
)
from livecrm_dagster.defs.reporting.summary import (
    viewer_summary as summarize,
)
from livecrm_dagster.defs.sessions.assets import viewing_sessions
from livecrm_dagster.defs.sessions.sessionize import watched_by_member
from livecrm_dagster.quality import CheckOutcome, check_spec, record_checks
from livecrm_dagster.resources import ShopSettingsResource, WarehouseResource

GROUP = "reporting"


@dg.asset(
    group_name=GROUP,
    partitions_def=broadcast_partitions,
    deps=[viewing_sessions, order_attribution, raw_viewer_events, members],
    check_specs=[
        check_spec(
            "viewer_summary",
            "viewing_rate_within_bounds",
            "Every viewing rate is a number in [0, 1].",
        )
    ],
)
def viewer_summary(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
) -> dg.MaterializeResult:
    """One row per viewing member (個客): profile, viewing, engagement and purchases."""
    store = warehouse.get()
    broadcast = scheduled_broadcast(store, context.partition_key)
    sessions = store.read_partition("viewing_sessions", broadcast.broadcast_id)
    watched = watched_by_member(sessions, broadcast.starts_at, broadcast.ends_at)
    blocks = store.events.blocks(
        broadcast.broadcast_id,
        categorical=True,
        columns=[
            "member_id",
            "type",
            "occurred_at",
            "product_id",
            "question_id",
            "answer",
            "is_correct",
        ],
    )
    attribution = store.read_partition("order_attribution", broadcast.broadcast_id)
    profiles = store.read("members", member_id=list(watched.index))

    summary = summarize(
        blocks, watched, attribution, profiles, broadcast.starts_at, shop_settings.get().zone
    )

    store.replace_partition("viewer_summary", broadcast.broadcast_id, summary)
    context.log.info(
        "summarized %d viewing members, %d bought during the live",
        len(summary),
        int(summary["bought_during_live"].sum()),
    )
    bands = summary["age_band"].value_counts().sort_index()
    rate = summary["viewing_rate"].astype("float64")
    outside = int((rate.isna() | (rate < 0) | (rate > 1)).sum())
    checks = record_checks(
        store,
        broadcast.broadcast_id,
        "viewer_summary",
        [
            CheckOutcome(
                "viewing_rate_within_bounds",
                outside == 0,
                f"{outside} of {len(summary)} viewing rates are missing or outside [0, 1]",
                {"outside": outside},
            )
        ],
    )
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(summary)),
            "members_by_age_band": dg.MetadataValue.json({k: int(v) for k, v in bands.items()}),
            "members_without_profile": dg.MetadataValue.int(
                int((~summary["member_id"].isin(profiles["member_id"])).sum())
            ),
        },
    )


def kpi_markdown(kpis: dict, currency: str) -> str:
    """Render the KPI row as a two-column Markdown table."""
    money = {
        "revenue_during_live",
        "post_live_revenue",
        "same_night_revenue",
        "clicked_then_bought_revenue",
    }
    rows = []
    for name, value in kpis.items():
        if name in money:
            shown = format_money(int(value), currency)
        elif name == "cvr" or name == "average_viewing_rate":
            shown = f"{float(value) * 100:.1f}%"
        elif name == "average_order_value":
            shown = format_money(round(float(value)), currency)
        elif isinstance(value, float):
            shown = f"{value:,.1f}"
        else:
            shown = f"{value:,}"
        rows.append(f"| {name.replace('_', ' ')} | {shown} |")
    return "| KPI | value |\n|---|---|\n" + "\n".join(rows)


def _revenue_check(kpis: dict, attribution: pd.DataFrame) -> CheckOutcome:
    """Recompute revenue from the stored attribution rows, independently of the KPI code."""
    counted = attribution["counted"].astype(bool) & attribution["during_live"].astype(bool)
    expected = int(attribution.loc[counted & (attribution["net_amount"] > 0), "net_amount"].sum())
    reported = int(kpis["revenue_during_live"])
    return CheckOutcome(
        "revenue_matches_attributed_orders",
        reported == expected,
        f"reported {reported:,}, attributed orders sum to {expected:,}",
        {"reported": reported, "expected": expected},
    )


@dg.asset(
    group_name=GROUP,
    partitions_def=broadcast_partitions,
    deps=[viewer_summary, order_attribution, raw_viewer_events],
    check_specs=[
        check_spec(
            "broadcast_kpis",
            "revenue_matches_attributed_orders",
            "Revenue during the live equals the sum of counted net order amounts.",
        )
    ],
)
def broadcast_kpis(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    shop_settings: ShopSettingsResource,
) -> dg.MaterializeResult:
    """The broadcast's KPI report: viewers, buyers, CVR, revenue, follow-up audience size."""
    shop = shop_settings.get()
    currency = shop.currency
    store = warehouse.get()
    broadcast = scheduled_broadcast(store, context.partition_key)
    summary = store.read_partition("viewer_summary", broadcast.broadcast_id)
    attribution = store.read_partition("order_attribution", broadcast.broadcast_id)
    events = store.events.read(
        broadcast.broadcast_id, columns=["member_id", "device_id", "type"], categorical=True
    )
    anonymous = events.loc[
        (events["member_id"] == "") & events["type"].isin(["view_start", "heartbeat", "view_end"]),
        "device_id",
    ].nunique()

    kpis = compute_kpis(summary, attribution, anonymous)

    row = pd.DataFrame([{**kpis, "currency": currency}])
    store.replace_partition("broadcast_kpis", broadcast.broadcast_id, row)
    line = report_line(kpis, currency)
    context.log.info("%s: %s", broadcast.broadcast_id, line)
    checks = record_checks(
        store, broadcast.broadcast_id, "broadcast_kpis", [_revenue_check(kpis, attribution)]
    )

    # The charts need each member's tier. This asset runs before `followup_audience`, so
    # the tiers come from the same segment rules applied to this run's inputs rather
    # than from that asset's table, which may still hold the previous build.
    sessions = store.read_partition(
        "viewing_sessions", broadcast.broadcast_id, columns=["member_id", "started_at", "ended_at"]
    )
    clicks = store.read(
        "raw_viewer_events",
        columns=["type", "occurred_at"],
        broadcast_id=broadcast.broadcast_id,
        type="product_click",
    )
    audience = audience_of(store, broadcast.broadcast_id, summary, attribution, shop.tiers)
    timeline, histogram, peak = broadcast_charts(
        sessions,
        clicks,
        attribution,
        summary,
        audience,
        broadcast.starts_at,
        broadcast.ends_at,
        shop.zone,
    )
    charts = "\n\n".join(
        [
            "**Members watching**, with product clicks and purchases during the live",
            markdown_image(timeline, "members watching per minute"),
            "**Viewing rate by tier**",
            markdown_image(histogram, "viewing rate histogram by tier"),
        ]
    )
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(1),
            "report": dg.MetadataValue.text(line),
            "kpis": dg.MetadataValue.md(kpi_markdown(kpis, currency)),
            "viewing_members": dg.MetadataValue.int(int(kpis["viewing_members"])),
            "buyers_during_live": dg.MetadataValue.int(int(kpis["buyers_during_live"])),
            "cvr": dg.MetadataValue.float(float(kpis["cvr"])),
            "revenue_during_live": dg.MetadataValue.int(int(kpis["revenue_during_live"])),
            "non_buyers": dg.MetadataValue.int(int(kpis["non_buyers"])),
            "peak_concurrent_members": dg.MetadataValue.int(peak),
            "charts": dg.MetadataValue.md(charts),
        },
    )
