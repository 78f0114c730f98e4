"""Validate one broadcast's viewer events and remove delivery duplicates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from livecrm_dagster.defs.ingestion.contract import (
    EVENT_TYPES,
    RowChecker,
    empty_quarantine,
    identifiers,
    parse_booleans,
    parse_instants,
    quarantine_frame,
    text,
)
from livecrm_dagster.defs.ingestion.files import FILE, LINE

EVENT_COLUMNS = [
    "event_id",
    "member_id",
    "device_id",
    "type",
    "occurred_at",
    "product_id",
    "question_id",
    "answer",
    "is_correct",
    "coupon_code",
    "text",
]
# IDs that join viewer events to members and products; see `contract.identifiers`.
_ID_COLUMNS = ("member_id", "product_id")
# Fields a type needs before its event means anything.
_REQUIRED_BY_TYPE = {
    "product_click": ("product_id",),
    "answer": ("question_id", "answer"),
    "coupon_claim": ("coupon_code",),
}


@dataclass(frozen=True)
class EventBatch:
    """The outcome of validating a broadcast's events."""

    events: pd.DataFrame
    quarantine: pd.DataFrame
    duplicates_dropped: int
    rows_read: int


# Rows checked at a time. The checks make several string copies of the rows they look
# at, so checking a partition in chunks bounds that memory whatever the partition's size.
# The valid rows of each chunk are kept as compact Arrow-backed strings.
CHUNK_ROWS = 250_000


def validate_viewer_events(
    rows: pd.DataFrame,
    broadcast_id: str,
    starts_at: pd.Timestamp,
    ends_at: pd.Timestamp,
    implausible_hours: float,
    zone: str | None = None,
) -> EventBatch:
    """Validate the rows read for one broadcast.

    Rows of other broadcasts are expected to be filtered out by the caller, except in
    files that belong to this broadcast, where they are quarantined. Events further
    than `implausible_hours` from the broadcast are quarantined: a device clock years
    off or a tab woken the next day tells nothing about this broadcast.
    """
    rows = rows.reset_index(drop=True)
    checked = [
        _check_rows(
            rows.iloc[start : start + CHUNK_ROWS],
            broadcast_id,
            starts_at,
            ends_at,
            implausible_hours,
            zone,
        )
        for start in range(0, max(len(rows), 1), CHUNK_ROWS)
    ]
    valid = pd.concat([events for events, _ in checked], ignore_index=True)
    quarantine = pd.concat([rejected for _, rejected in checked], ignore_index=True)
    valid, conflicts, dropped = drop_duplicate_events(valid)
    quarantine = pd.concat([quarantine, conflicts], ignore_index=True)
    return EventBatch(
        _in_time_order(valid.drop(columns=[FILE, LINE])), quarantine, dropped, len(rows)
    )


def _check_rows(
    rows: pd.DataFrame,
    broadcast_id: str,
    starts_at: pd.Timestamp,
    ends_at: pd.Timestamp,
    implausible_hours: float,
    zone: str | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (valid events, quarantine rows) of a chunk of rows; see `validate_viewer_events`."""
    checker = RowChecker(rows, "viewer_events", "event_id")
    checker.require("event_id", "broadcast_id")
    other = text(rows, "broadcast_id") != broadcast_id
    checker.flag(other, "broadcast_id", "broadcast_id does not match the broadcast being loaded")
    event_type = text(rows, "type")
    checker.flag(
        ~event_type.isin(EVENT_TYPES),
        "type",
        "unknown event type: " + event_type.str.slice(0, 40),
    )
    occurred_at, reasons = parse_instants(text(rows, "occurred_at"), "occurred_at", zone)
    checker.flag(reasons.notna(), "occurred_at", reasons)
    checker.require("occurred_at")
    for kind, fields in _REQUIRED_BY_TYPE.items():
        for field in fields:
            missing = (event_type == kind) & (text(rows, field) == "")
            checker.flag(missing, field, f"{field} is missing on a {kind} event")
    is_correct, reasons = parse_booleans(text(rows, "is_correct"), "is_correct")
    checker.flag(reasons.notna(), "is_correct", reasons)

    window = pd.Timedelta(hours=implausible_hours)
    implausible = (occurred_at < starts_at - window) | (occurred_at > ends_at + window)
    checker.flag(
        implausible,
        "occurred_at",
        f"occurred_at is more than {implausible_hours:g} h before the start or after the end",
    )

    events = pd.DataFrame({column: text(rows, column) for column in EVENT_COLUMNS})
    for column in _ID_COLUMNS:
        events[column] = identifiers(rows, column)
    events["occurred_at"] = occurred_at
    events["is_correct"] = is_correct
    events[FILE] = text(rows, FILE)
    events[LINE] = rows[LINE] if LINE in rows.columns else 0
    valid, quarantine = checker.split(events)
    compact = {column: _COMPACT_TEXT for column in [*_TEXT_COLUMNS, FILE]}
    return valid.astype(compact), quarantine


_TEXT_COLUMNS = [column for column in EVENT_COLUMNS if column not in ("occurred_at", "is_correct")]
_COMPACT_TEXT = pd.StringDtype("pyarrow", na_value=np.nan)


def _in_time_order(events: pd.DataFrame) -> pd.DataFrame:
    """Sort events by (occurred_at, event_id) with Arrow, which sorts strings natively."""
    keys = pa.table(
        {
            "occurred_at": pa.array(events["occurred_at"]),
            "event_id": pa.array(events["event_id"], pa.string()),
        }
    )
    order = pc.sort_indices(
        keys, sort_keys=[("occurred_at", "ascending"), ("event_id", "ascending")]
    )
    return events.take(order.to_numpy()).reset_index(drop=True)


def drop_duplicate_events(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Keep the first copy of each event_id; quarantine copies whose payload differs.

    Sources deliver at least once, so an identical copy is expected and dropped (and
    counted). A copy with another payload means two different events share an ID, and
    neither can be trusted to be the other, so the later copy is quarantined.
    """
    if events.empty:
        return events, empty_quarantine(), 0
    # Only IDs that occur more than once need their payloads compared. They are a few
    # percent of a partition, so the other rows are never hashed or grouped.
    shared_at = np.flatnonzero(events["event_id"].duplicated(keep=False).to_numpy())
    shared = events.iloc[shared_at]
    fingerprint = pd.util.hash_pandas_object(shared[EVENT_COLUMNS], index=False).to_numpy()
    ids = shared["event_id"].to_numpy()
    first = pd.Series(fingerprint).groupby(ids, sort=False).transform("first").to_numpy()
    repeat = shared["event_id"].duplicated(keep="first").to_numpy()
    conflicting = repeat & (fingerprint != first)
    identical = repeat & ~conflicting
    conflicts = quarantine_frame(
        "viewer_events",
        shared.iloc[np.flatnonzero(conflicting)],
        "event_id",
        "event_id",
        "conflicting duplicate: event_id already seen with another payload",
    )
    dropped = np.zeros(len(events), dtype=bool)
    dropped[shared_at[repeat]] = True
    kept = events.loc[~dropped]
    return kept, conflicts, int(identical.sum())
