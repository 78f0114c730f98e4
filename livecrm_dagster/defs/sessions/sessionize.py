"""Sessions, watched seconds and viewing rate: the definitions of how a member watched.

- A session is a run of one device's viewing events (view_start, heartbeat, view_end)
  with no gap longer than the timeout; a gap of exactly the timeout stays inside. A
  `view_end` closes its device's session; a session without one ends at its last event.
  Events without a device ID count as one device whose `view_end` closes nothing,
  because it cannot be told apart from another device still playing.
- A member's device sessions that overlap or touch are merged, not added.
- Watched seconds are the length of the merged sessions clipped to the broadcast's
  start and end; the viewing rate is watched seconds over the broadcast's length.
- A viewing member is a member (not anonymous) with at least one viewing event inside
  [start, end], even when the watched time is 0 s.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

VIEWING_TYPES = ("view_start", "heartbeat", "view_end")
SESSION_COLUMNS = [
    "member_id",
    "session_no",
    "started_at",
    "ended_at",
    "watched_seconds",
    "events",
    "events_inside",
    "devices",
]


def viewing_sessions(
    events: pd.DataFrame,
    starts_at: pd.Timestamp,
    ends_at: pd.Timestamp,
    timeout_seconds: float,
) -> pd.DataFrame:
    """Return one row per merged session of each member, in member and time order."""
    viewing = events.loc[
        events["type"].isin(VIEWING_TYPES) & (events["member_id"] != ""),
        ["member_id", "device_id", "type", "occurred_at"],
    ]
    if viewing.empty:
        return pd.DataFrame(columns=SESSION_COLUMNS)
    device_sessions = _device_sessions(viewing, timeout_seconds, starts_at, ends_at)
    return _merge_devices(device_sessions, starts_at, ends_at)


def _device_sessions(
    viewing: pd.DataFrame, timeout_seconds: float, starts_at: pd.Timestamp, ends_at: pd.Timestamp
) -> pd.DataFrame:
    # Work on integer codes and numpy arrays: sorting and grouping object strings is what
    # made this step slow. `factorize(sort=True)` numbers members and devices in string
    # order, so sorting by the codes gives the same order as sorting by the strings.
    member_codes, member_ids = pd.factorize(viewing["member_id"], sort=True)
    device_codes, device_ids = pd.factorize(viewing["device_id"], sort=True)
    pairs = member_codes.astype(np.int64) * len(device_ids) + device_codes
    pair_codes, _ = pd.factorize(pairs, sort=True)
    occurred = viewing["occurred_at"]
    instants = _utc_instants(occurred)
    ticks = instants.view(np.int64)
    # One stable sort by (member, device, time): ties keep their input order, as before.
    order = np.lexsort((ticks, pair_codes))
    pair_codes = pair_codes[order]
    instants = instants[order]
    is_view_end = (viewing["type"].to_numpy() == "view_end")[order]
    device_known = (device_ids.to_numpy() != "")[device_codes[order]]
    same_device = np.empty(len(order), dtype=bool)
    same_device[0] = False
    same_device[1:] = pair_codes[1:] == pair_codes[:-1]
    gap_seconds = np.zeros(len(order))
    gap_seconds[1:] = (instants[1:] - instants[:-1]) / np.timedelta64(1, "s")
    closed_before = np.zeros(len(order), dtype=bool)
    closed_before[1:] = is_view_end[:-1] & device_known[:-1]
    starts_new = ~same_device | (gap_seconds > timeout_seconds) | closed_before
    inside = (instants >= _utc_instant(starts_at)) & (instants <= _utc_instant(ends_at))

    # Rows are in time order within each device session, so its first row has the
    # start and its last row the end.
    first = np.flatnonzero(starts_new)
    last = np.append(first[1:], len(order)) - 1
    inside_counts = np.add.reduceat(inside.astype(np.int64), first) if len(first) else first
    return pd.DataFrame(
        {
            "member_code": member_codes[order][first],
            "device_code": device_codes[order][first],
            "started_at": _as_dtype(instants[first], occurred.dtype),
            "ended_at": _as_dtype(instants[last], occurred.dtype),
            "events": last - first + 1,
            "events_inside": inside_counts,
        }
    ).assign(
        member_id=lambda frame: pd.Series(
            member_ids.to_numpy()[frame["member_code"].to_numpy()],
            index=frame.index,
            dtype=viewing["member_id"].dtype,
        )
    )


def _utc_instants(times: pd.Series) -> np.ndarray:
    """Return naive datetime64 values in UTC (the column's own unit), for numpy arithmetic."""
    unit = times.dt.unit
    return times.to_numpy(dtype=f"datetime64[{unit}]")


def _utc_instant(instant: pd.Timestamp) -> np.datetime64:
    if instant.tzinfo is not None:
        instant = instant.tz_convert("UTC").tz_localize(None)
    return instant.to_datetime64()


def _as_dtype(values: np.ndarray, dtype) -> pd.Series:
    """Turn naive UTC datetime64 values back into the column's dtype, zone included."""
    series = pd.Series(values)
    if getattr(dtype, "tz", None) is not None:
        series = series.dt.tz_localize("UTC")
    return series.astype(dtype)


def _merge_devices(
    sessions: pd.DataFrame, starts_at: pd.Timestamp, ends_at: pd.Timestamp
) -> pd.DataFrame:
    # Rows arrive in (member, device, time) order; a stable sort by (member, start)
    # matches the previous string-keyed sort because member codes follow string order.
    sessions = sessions.sort_values(["member_code", "started_at"], kind="stable")
    member_codes = sessions["member_code"].to_numpy()
    ended = sessions["ended_at"].to_numpy()
    started = sessions["started_at"].to_numpy()
    latest_end = pd.Series(ended).groupby(member_codes).cummax().to_numpy()
    new_member = np.ones(len(sessions), dtype=bool)
    new_member[1:] = member_codes[1:] != member_codes[:-1]
    after_previous = np.zeros(len(sessions), dtype=bool)
    after_previous[1:] = started[1:] > latest_end[:-1]
    merged_codes = np.cumsum(new_member | after_previous)
    merged = (
        sessions.assign(merged=merged_codes)
        .groupby("merged", sort=True)
        .agg(
            member_id=("member_id", "first"),
            member_code=("member_code", "first"),
            started_at=("started_at", "min"),
            ended_at=("ended_at", "max"),
            events=("events", "sum"),
            events_inside=("events_inside", "sum"),
            devices=("device_code", "nunique"),
        )
        .reset_index(drop=True)
    )
    clipped_start = merged["started_at"].clip(lower=starts_at)
    clipped_end = merged["ended_at"].clip(upper=ends_at)
    watched = (clipped_end - clipped_start).dt.total_seconds()
    merged["watched_seconds"] = np.maximum(watched.to_numpy(), 0.0)
    merged["session_no"] = merged.groupby("member_code").cumcount() + 1
    merged["events"] = merged["events"].astype("int64")
    merged["events_inside"] = merged["events_inside"].astype("int64")
    merged["devices"] = merged["devices"].astype("int64")
    return merged[SESSION_COLUMNS]


def broadcast_seconds(starts_at: pd.Timestamp, ends_at: pd.Timestamp) -> float:
    return (ends_at - starts_at).total_seconds()


def watched_by_member(
    sessions: pd.DataFrame, starts_at: pd.Timestamp, ends_at: pd.Timestamp
) -> pd.DataFrame:
    """Return watched seconds, viewing rate and session count of each viewing member.

    Only sessions that touch the broadcast count: a stray heartbeat hours later forms a
    session row of its own but is no session of this broadcast.
    """
    touching = (sessions["events_inside"] > 0) | (sessions["watched_seconds"] > 0)
    per_member = (
        sessions.assign(touching=touching)
        .groupby("member_id")
        .agg(
            watched_seconds=("watched_seconds", "sum"),
            sessions=("touching", "sum"),
            events_inside=("events_inside", "sum"),
        )
    )
    per_member["sessions"] = per_member["sessions"].astype("int64")
    per_member = per_member.loc[per_member["events_inside"] > 0].drop(columns="events_inside")
    length = broadcast_seconds(starts_at, ends_at)
    if length <= 0:
        raise ValueError(f"broadcast length must be positive, got {length} s")
    per_member["viewing_rate"] = (per_member["watched_seconds"] / length).clip(0.0, 1.0)
    return per_member
