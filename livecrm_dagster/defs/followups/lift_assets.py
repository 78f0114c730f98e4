"""Dagster asset of the follow-up lift: each step's conversion against its holdout."""

import dagster as dg
import pandas as pd

from livecrm_dagster.broadcasts import scheduled_broadcast
from livecrm_dagster.defs.followups.ledger import HOLDOUT, SENT, SendLedger, send_ledger
from livecrm_dagster.defs.followups.lift import (
    CONVERSION_WINDOW,
    lift_markdown,
)
from livecrm_dagster.defs.followups.lift import (
    followup_lift as compute_lift,
)
from livecrm_dagster.defs.partitions import broadcast_partitions
from livecrm_dagster.defs.segments.assets import followup_audience
from livecrm_dagster.resources import WarehouseResource
from livecrm_dagster.warehouse import Warehouse

# Members per IN list when reading their orders, as the send ledger does.
_MEMBERS_PER_READ = 1000


# Declared on `followup_audience`, not on `followup_sends`: the sends are partitioned by
# (broadcast, step), so this asset reads their `send_ledger` table directly.
@dg.asset(
    group_name="followups",
    partitions_def=broadcast_partitions,
    deps=[followup_audience],
)
def followup_lift(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """Conversion of each follow-up step's sent members against its holdout, and the lift."""
    store = warehouse.get()
    broadcast = scheduled_broadcast(store, context.partition_key)
    ledger = SendLedger(store.engine).read(
        send_ledger.c.broadcast_id == broadcast.broadcast_id,
        send_ledger.c.status.in_([SENT, HOLDOUT]),
    )
    ledger = _utc_times(ledger, ["sent_at", "updated_at"])
    orders = _paid_orders(store, sorted(set(ledger["member_id"])))

    lift = compute_lift(ledger, orders, CONVERSION_WINDOW)

    store.replace_partition("followup_lift", broadcast.broadcast_id, lift)
    context.log.info(
        "%s: lift of %d steps, %d sent and %d held-out members in all",
        broadcast.broadcast_id,
        len(lift),
        int(lift["sent_members"].sum()),
        int(lift["holdout_members"].sum()),
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(lift)),
            "lift": dg.MetadataValue.md(lift_markdown(lift)),
            "conversion_window_days": dg.MetadataValue.float(
                CONVERSION_WINDOW / pd.Timedelta(days=1)
            ),
        }
    )


def _utc_times(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Give the ledger's time columns a UTC datetime dtype, also when the frame is empty."""
    frame = frame.copy()
    for column in columns:
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def _paid_orders(store: Warehouse, member_ids: list[str]) -> pd.DataFrame:
    """Read the paid order lines of some members, in chunks to bound the IN list."""
    columns = ["member_id", "paid_at", "status"]
    frames = [
        store.read(
            "orders",
            columns=columns,
            member_id=member_ids[start : start + _MEMBERS_PER_READ],
            status="paid",
        )
        for start in range(0, len(member_ids), _MEMBERS_PER_READ)
    ]
    if not frames:
        return store.read("orders", columns=columns, member_id=[])
    return pd.concat(frames, ignore_index=True)
