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
    viewing = viewing.sort_values(["member_id", "device_id", "occurred_at"], kind="stable")
    same_device = (viewing["member_id"] == viewing["member_id"].shift()) & (
        viewing["device_id"] == viewing["device_id"].shift()
    )
    gap = (viewing["occurred_at"] - viewing["occurred_at"].shift()).dt.total_seconds()
    closed_before = (viewing["type"].shift() == "view_end") & (viewing["device_id"].shift() != "")
    starts_new = ~same_device | (gap > timeout_seconds) | closed_before
    inside = (viewing["occurred_at"] >= starts_at) & (viewing["occurred_at"] <= ends_at)
    return (
        viewing.assign(device_session=starts_new.cumsum(), inside=inside)
        .groupby("device_session")
        .agg(
            member_id=("member_id", "first"),
            device_id=("device_id", "first"),
            started_at=("occurred_at", "min"),
            ended_at=("occurred_at", "max"),
            events=("occurred_at", "size"),
            events_inside=("inside", "sum"),
        )
    )


def _merge_devices(
    sessions: pd.DataFrame, starts_at: pd.Timestamp, ends_at: pd.Timestamp
) -> pd.DataFrame:
    sessions = sessions.sort_values(["member_id", "started_at"], kind="stable")
    latest_end = sessions.groupby("member_id")["ended_at"].cummax()
    previous_end = latest_end.groupby(sessions["member_id"]).shift()
    new_member = sessions["member_id"] != sessions["member_id"].shift()
    starts_new = new_member | (sessions["started_at"] > previous_end)
    merged = (
        sessions.assign(merged=starts_new.cumsum())
        .groupby("merged")
        .agg(
            member_id=("member_id", "first"),
            started_at=("started_at", "min"),
            ended_at=("ended_at", "max"),
            events=("events", "sum"),
            events_inside=("events_inside", "sum"),
            devices=("device_id", "nunique"),
        )
        .reset_index(drop=True)
    )
    clipped_start = merged["started_at"].clip(lower=starts_at)
    clipped_end = merged["ended_at"].clip(upper=ends_at)
    watched = (clipped_end - clipped_start).dt.total_seconds()
    merged["watched_seconds"] = np.maximum(watched.to_numpy(), 0.0)
    merged["session_no"] = merged.groupby("member_id").cumcount() + 1
    merged["events"] = merged["events"].astype("int64")
    merged["events_inside"] = merged["events_inside"].astype("int64")
    return merged[SESSION_COLUMNS]


def broadcast_seconds(starts_at: pd.Timestamp, ends_at: pd.Timestamp) -> float:
    return (ends_at - starts_at).total_seconds()


def watched_by_member(
    sessions: pd.DataFrame, starts_at: pd.Timestamp, ends_at: pd.Timestamp
) -> pd.DataFrame:
    """Return watched seconds, viewing rate and session count of each viewing member."""
    per_member = sessions.groupby("member_id").agg(
        watched_seconds=("watched_seconds", "sum"),
        sessions=("session_no", "size"),
        events_inside=("events_inside", "sum"),
    )
    per_member = per_member.loc[per_member["events_inside"] > 0].drop(columns="events_inside")
    length = broadcast_seconds(starts_at, ends_at)
    if length <= 0:
        raise ValueError(f"broadcast length must be positive, got {length} s")
    per_member["viewing_rate"] = (per_member["watched_seconds"] / length).clip(0.0, 1.0)
    return per_member
