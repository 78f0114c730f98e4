"""Look up a broadcast's schedule and record quarantined rows, shared by every stage."""

from __future__ import annotations

import dagster as dg
import pandas as pd

from livecrm_dagster.defs.attribution.attribute import Broadcast
from livecrm_dagster.defs.ingestion.contract import invalid_broadcast_id_reason
from livecrm_dagster.defs.segments.segment import followup_audience
from livecrm_dagster.settings import TierSettings
from livecrm_dagster.warehouse import Warehouse


def scheduled_broadcast(warehouse: Warehouse, broadcast_id: str) -> Broadcast:
    """Return the schedule of a broadcast, or fail with what the operator should do."""
    reason = invalid_broadcast_id_reason(broadcast_id)
    if reason:
        raise dg.Failure(description=reason)
    rows = warehouse.read("broadcasts", broadcast_id=broadcast_id)
    if rows.empty:
        raise dg.Failure(
            description=(
                f"broadcast {broadcast_id!r} is not in the broadcasts table; materialize the "
                "`broadcasts` asset after adding it to the schedule files"
            )
        )
    row = rows.iloc[0]
    return Broadcast(broadcast_id, row["starts_at"], row["ends_at"])


def audience_of(
    store: Warehouse,
    broadcast_id: str,
    summary: pd.DataFrame,
    attribution: pd.DataFrame,
    tiers: TierSettings,
) -> pd.DataFrame:
    """Build a broadcast's follow-up audience from its summary, orders and survey answers."""
    answers = store.read(
        "raw_viewer_events",
        columns=["member_id", "type", "occurred_at", "question_id", "answer", "is_correct"],
        broadcast_id=broadcast_id,
        type="answer",
    )
    return followup_audience(
        summary,
        attribution,
        answers,
        hot_rate=tiers.hot_rate,
        mid_rate=tiers.mid_rate,
        hot_min_chats=tiers.hot_min_chats,
        coupon_rate=tiers.coupon_rate,
    )


def write_quarantine(
    warehouse: Warehouse, scope: str, input_name: str, quarantine: pd.DataFrame
) -> None:
    """Replace the quarantine rows of one input in one scope (a broadcast or a whole input)."""
    rows = quarantine.assign(scope=scope)
    rows["line"] = pd.to_numeric(rows["line"]).fillna(0).astype("int64")
    rows = rows.drop_duplicates(["file", "line", "record_key"], keep="first")
    warehouse.replace_rows("quarantine", {"scope": scope, "input": input_name}, rows)


def quarantine_counts(quarantine: pd.DataFrame) -> dict[str, int]:
    """Count quarantined rows per reason, with values cut from the reason text."""
    if quarantine.empty:
        return {}
    # Reasons may end with the offending value; group on the part before it.
    kinds = quarantine["reason"].astype(str).str.split(":").str[0]
    return {kind: int(count) for kind, count in kinds.value_counts().sort_index().items()}


def quarantine_metadata(quarantine: pd.DataFrame, rows_read: int) -> dict[str, dg.MetadataValue]:
    counts = quarantine_counts(quarantine)
    share = len(quarantine) / rows_read if rows_read else 0.0
    table = "\n".join(f"| {reason} | {count:,} |" for reason, count in counts.items())
    summary = "| reason | rows |\n|---|---|\n" + table if counts else "No row was quarantined."
    return {
        "rows_read": dg.MetadataValue.int(rows_read),
        "quarantined": dg.MetadataValue.int(len(quarantine)),
        "quarantined_share": dg.MetadataValue.float(share),
        "quarantine_by_reason": dg.MetadataValue.md(summary),
    }


def describe_quarantine(quarantine: pd.DataFrame, rows_read: int) -> str:
    """Return a log line such as 'quarantined 12 of 48,210 rows (9 no offset, 3 unknown type)'."""
    counts = quarantine_counts(quarantine)
    parts = ", ".join(f"{count:,} {reason}" for reason, count in counts.items())
    detail = f" ({parts})" if parts else ""
    return f"quarantined {len(quarantine):,} of {rows_read:,} rows{detail}"
