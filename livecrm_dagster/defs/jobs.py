"""Jobs an operator launches or backfills from the UI."""

import dagster as dg

broadcast_analytics = dg.define_asset_job(
    name="broadcast_analytics",
    selection=dg.AssetSelection.groups(
        "ingestion", "sessions", "attribution", "reporting", "segments"
    )
    - dg.AssetSelection.assets("broadcasts", "members", "products", "shop_orders")
    # The lift reads the send ledger and the orders, so each rebuild refreshes it too.
    | dg.AssetSelection.assets("followup_lift"),
    description="Rebuild one broadcast's tables, from raw events to the follow-up lift.",
)

reference_data = dg.define_asset_job(
    name="reference_data",
    selection=dg.AssetSelection.assets("broadcasts", "members", "products", "shop_orders"),
    description="Reload the schedule, members, products and orders from the sources.",
)
