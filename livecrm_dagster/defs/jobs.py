"""Jobs an operator launches or backfills from the UI."""

import dagster as dg
from dagster_celery import celery_executor

BROADCAST_ASSETS = (
    dg.AssetSelection.groups("ingestion", "sessions", "attribution", "reporting", "segments")
    - dg.AssetSelection.assets("broadcasts", "members", "products", "shop_orders")
    # The lift reads the send ledger and the orders, so each rebuild refreshes it too.
    | dg.AssetSelection.assets("followup_lift")
)

broadcast_analytics = dg.define_asset_job(
    name="broadcast_analytics",
    selection=BROADCAST_ASSETS,
    description="Rebuild one broadcast's tables, from raw events to the follow-up lift.",
)

# The run config names the broker, for example
# {"execution": {"config": {"broker": "redis://host:6379/0", "backend": "redis://host:6379/0"}}},
# and the workers started with `dagster-celery worker start` must listen on the same broker.
broadcast_analytics_celery = dg.define_asset_job(
    name="broadcast_analytics_celery",
    selection=BROADCAST_ASSETS,
    executor_def=celery_executor,
    description=(
        "Rebuild one broadcast's tables like broadcast_analytics, each step as a task on the "
        "Celery workers."
    ),
)

reference_data = dg.define_asset_job(
    name="reference_data",
    selection=dg.AssetSelection.assets("broadcasts", "members", "products", "shop_orders"),
    description="Reload the schedule, members, products and orders from the sources.",
)
