"""Rules that pick the broadcasts due for a first build or a late-data rebuild."""

from __future__ import annotations

import datetime as dt
import hashlib

import pandas as pd


def settled(schedule: pd.DataFrame, now: dt.datetime, settle_minutes: float) -> pd.DataFrame:
    """Return broadcasts that ended at least `settle_minutes` before `now`."""
    cutoff = pd.Timestamp(now) - pd.Timedelta(minutes=settle_minutes)
    return schedule.loc[schedule["ends_at"] <= cutoff]


def recently_ended(schedule: pd.DataFrame, now: dt.datetime, days: float) -> pd.DataFrame:
    """Return broadcasts that ended in the `days` before `now`, when late orders still arrive."""
    now = pd.Timestamp(now)
    ended = schedule["ends_at"] <= now
    recent = schedule["ends_at"] >= now - pd.Timedelta(days=days)
    return schedule.loc[ended & recent]


def schedule_fingerprint(schedule: pd.DataFrame) -> str:
    """Return a short hash of the schedule's content: changes when any broadcast changes."""
    text = schedule.sort_values("broadcast_id").astype(str).to_csv(index=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
