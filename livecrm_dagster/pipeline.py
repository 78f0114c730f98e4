"""Run the main job in process: reference data, then every broadcast's partition.

Broadcasts run in two passes: first every broadcast's raw rows and sessions, then
attribution and what follows. An order counts for the latest broadcast the member
watched before paying, so attribution needs every broadcast's sessions in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg
import pandas as pd

from livecrm_dagster.defs.attribution.assets import order_attribution
from livecrm_dagster.defs.ingestion.assets import (
    broadcasts,
    members,
    products,
    raw_orders,
    raw_viewer_events,
    shop_orders,
)
from livecrm_dagster.defs.partitions import broadcast_partitions
from livecrm_dagster.defs.reporting.assets import broadcast_kpis, viewer_summary
from livecrm_dagster.defs.segments.assets import followup_audience
from livecrm_dagster.defs.sessions.assets import viewing_sessions
from livecrm_dagster.resources import ShopSettingsResource, SourceResource, WarehouseResource

REFERENCE_ASSETS = [broadcasts, members, products, shop_orders]
FIRST_PASS = [raw_viewer_events, raw_orders, viewing_sessions]
SECOND_PASS = [order_attribution, viewer_summary, broadcast_kpis, followup_audience]


def pipeline_resources(
    warehouse_url: str, source_folder: str, settings_path: str = ""
) -> dict[str, dg.ConfigurableResource]:
    return {
        "warehouse": WarehouseResource(url=warehouse_url),
        "shop_settings": ShopSettingsResource(path=settings_path),
        "source": SourceResource(folder=source_folder),
    }


def _materialize(assets, resources, instance, partition_key: str | None = None) -> None:
    # Step events stay in the instance's event log; the console shows warnings only.
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    result = dg.materialize(
        assets,
        resources=resources,
        instance=instance,
        partition_key=partition_key,
        run_config=quiet,
        tags={"livecrm/broadcast": partition_key} if partition_key else None,
    )
    if not result.success:
        raise RuntimeError(f"materialization of partition {partition_key!r} failed")


def register_broadcasts(instance: dg.DagsterInstance, broadcast_ids: Sequence[str]) -> None:
    """Add a partition per broadcast; keys already present are kept as they are."""
    instance.add_dynamic_partitions(broadcast_partitions.name, list(broadcast_ids))


def run_main_job(
    instance: dg.DagsterInstance,
    resources: dict[str, dg.ConfigurableResource],
    broadcast_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Load reference data, register and build every broadcast; return the KPI rows."""
    _materialize(REFERENCE_ASSETS, resources, instance)
    store = resources["warehouse"].get()
    scheduled = store.read("broadcasts")["broadcast_id"].tolist()
    keys = [key for key in scheduled if broadcast_ids is None or key in broadcast_ids]
    register_broadcasts(instance, keys)
    for key in keys:
        _materialize(FIRST_PASS, resources, instance, key)
    for key in keys:
        _materialize(SECOND_PASS, resources, instance, key)
    kpis = store.read("broadcast_kpis", broadcast_id=keys)
    return kpis.set_index("broadcast_id").reindex(keys).reset_index()
