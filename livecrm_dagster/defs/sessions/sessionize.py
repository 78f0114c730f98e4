"""Sessions, watched seconds and viewing rate: the definitions of how a member watched.

- A session is a run of one device's viewing events (view_start, heartbeat, view_end)
  with no gap longer than the timeout; a gap of exactly the timeout stays inside. A
  `view_end` closes its device's session; a session without one ends at its last event.
  Events without a device ID count as one device whose `view_end` closes nothing,
  because it cannot be told apart from another device still playing.
- Events of one device at the same instant count in the order stored. Stored events
  are in (occurred_at, event_id) order, so a `view_end` and a heartbeat at the same
  microsecond are ordered by their IDs.
- A member's device sessions that overlap or touch are merged, not added.
- Watched seconds are the length of the merged sessions clipped to the broadcast's
  start and end; the viewing rate is watched seconds over the broadcast's length.
- A viewing member is a member (not anonymous) with at least one viewing event inside
  [start, end], even when the watched time is 0 s.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# pandas' own counting sort, which its groupby uses: a stable order of dense integer
# codes in linear time. It is not public API, so pandas is pinned and the tests run it.
from pandas._libs.algos import groupsort_indexer

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
    """Return one row per merged session of each member, in member and time order.

    Text columns may be strings or categoricals (a large partition is read as
    categoricals); the result is the same.
    """
    member_codes, member_ids = label_codes(events["member_id"])
    type_codes, types = label_codes(events["type"])
    viewing = _lookup(np.isin(types, VIEWING_TYPES), type_codes) & _lookup(
        member_ids != "", member_codes
    )
    rows = np.flatnonzero(viewing)
    if not len(rows):
        return pd.DataFrame(columns=SESSION_COLUMNS)
    occurred = events["occurred_at"]
    ticks = _ticks(occurred)[rows]
    # A partition is stored in time order, which the grouping below keeps; other input
    # is put in time order first.
    if len(rows) > 1 and not np.all(ticks[1:] >= ticks[:-1]):
        in_time = np.argsort(ticks, kind="stable")
        rows, ticks = rows[in_time], ticks[in_time]
    # From here on only the viewing rows' values are used, taken once in row order.
    device_codes, device_ids = label_codes(events["device_id"])
    members, devices = member_codes[rows], device_codes[rows]
    # An empty device ID and a missing one are the same unknown device, code -1.
    devices = np.where(_lookup(device_ids == "", devices), -1, devices)
    closes = _lookup(types == "view_end", type_codes[rows]) & (devices >= 0)
    sessions = _device_sessions(
        members,
        devices,
        ticks,
        closes,
        _ticks_per_second(occurred.dtype) * timeout_seconds,
        len(member_ids),
        len(device_ids),
    )
    return _merge_devices(sessions, member_ids, occurred.dtype, starts_at, ends_at)


def sessions_of_blocks(
    blocks: Iterable[pd.DataFrame],
    starts_at: pd.Timestamp,
    ends_at: pd.Timestamp,
    timeout_seconds: float,
) -> pd.DataFrame:
    """Return `viewing_sessions` of events given in member blocks, in member and time order.

    Each block must hold every event of its members (see `EventFiles.blocks`). A member
    found in two blocks raises ValueError. Blocks keep each piece of work small enough
    for the CPU's caches, so a partition's time grows in step with its events.
    """
    parts = [viewing_sessions(block, starts_at, ends_at, timeout_seconds) for block in blocks]
    parts = [part for part in parts if len(part)]
    if not parts:
        return pd.DataFrame(columns=SESSION_COLUMNS)
    members = pd.concat([part["member_id"].drop_duplicates() for part in parts])
    repeated = members.loc[members.duplicated()]
    if len(repeated):
        raise ValueError(
            f"the events of {repeated.nunique()} members are split over several blocks; "
            "each block must hold every event of its members"
        )
    sessions = pd.concat(parts, ignore_index=True)
    if not member_runs(sessions["member_id"])[1]:
        in_order = np.argsort(sessions["member_id"].to_numpy(dtype=str), kind="stable")
        sessions = sessions.take(in_order).reset_index(drop=True)
    return sessions


def label_codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Return each row's integer code and the labels the codes index; -1 marks a missing value.

    A categorical column already contains its codes, so nothing is hashed. Strings are
    factorized. Working on codes instead of strings is what keeps a partition of ten
    million events fast and small.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        return values.cat.codes.to_numpy(), values.cat.categories.to_numpy(dtype=object)
    codes, labels = pd.factorize(values)
    return codes, np.asarray(labels, dtype=object)


def _lookup(per_label: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Look each row's label flag up by code; a missing label (-1) is never flagged."""
    return np.append(per_label, False)[codes]


def _ticks(times: pd.Series) -> np.ndarray:
    """Return the instants as integers in the column's own unit, UTC."""
    if times.isna().any():
        raise ValueError("viewing events without occurred_at cannot be sessionized")
    return times.array.asi8


def _unit(times_dtype) -> str:
    return getattr(times_dtype, "unit", None) or np.datetime_data(times_dtype)[0]


def _ticks_per_second(times_dtype) -> int:
    return int(np.timedelta64(1, "s") / np.timedelta64(1, _unit(times_dtype)))


def _tick(instant: pd.Timestamp, times_dtype) -> int:
    """Return an instant as an integer in the events' unit; a zoned instant counts in UTC."""
    utc = instant.to_datetime64().astype(f"datetime64[{_unit(times_dtype)}]")
    return int(utc.astype(np.int64))


def _device_sessions(
    members: np.ndarray,
    devices: np.ndarray,
    ticks: np.ndarray,
    closes: np.ndarray,
    timeout_ticks: float,
    member_count: int,
    device_count: int,
) -> dict[str, np.ndarray]:
    """Cut each (member, device)'s events into sessions, with one array entry per session.

    The arguments hold one entry per viewing event, in time order: member and device
    codes, the instant, and whether the event closes its device's session.
    """
    positions, new_group = _stable_group_order(members, devices, member_count, device_count)
    times = ticks[positions]
    starts_new = np.ones(len(positions), dtype=bool)
    starts_new[1:] = new_group | ((times[1:] - times[:-1]) > timeout_ticks) | closes[positions[:-1]]
    first = np.flatnonzero(starts_new)
    last = np.append(first[1:], len(positions)) - 1
    heads = positions[first]
    return {
        "member": members[heads],
        "device": devices[heads],
        "start": times[first],
        "end": times[last],
        "events": last - first + 1,
        "times": times,
        "first": first,
    }


def _stable_group_order(
    members: np.ndarray, devices: np.ndarray, member_count: int, device_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Group rows by (member, device), keeping row order inside each group.

    Return the permutation and, between each row and the next in that order, whether a
    new group starts. Member and device codes are dense, so a counting sort orders them
    in linear time. A device normally belongs to one member, and one pass by device
    suffices; an unknown device (-1) counts as a device of its own per member. Only when
    one device carries several members does a second, stable pass sort by member.
    """
    buckets = np.where(devices >= 0, devices, device_count + members.astype(np.int64))
    order = groupsort_indexer(buckets.astype(np.intp), device_count + member_count)[0]
    in_order = members[order]
    buckets = buckets[order]
    new_bucket = buckets[1:] != buckets[:-1]
    new_member = in_order[1:] != in_order[:-1]
    if (new_member & ~new_bucket).any():
        by_member = groupsort_indexer(in_order.astype(np.intp), member_count)[0]
        order, in_order, buckets = order[by_member], in_order[by_member], buckets[by_member]
        return order, (buckets[1:] != buckets[:-1]) | (in_order[1:] != in_order[:-1])
    return order, new_bucket


def _merge_devices(
    device_sessions: dict[str, np.ndarray],
    member_ids: np.ndarray,
    times_dtype,
    starts_at: pd.Timestamp,
    ends_at: pd.Timestamp,
) -> pd.DataFrame:
    """Merge each member's device sessions that overlap or touch into one session."""
    starts_tick, ends_tick = _tick(starts_at, times_dtype), _tick(ends_at, times_dtype)
    times, first = device_sessions["times"], device_sessions["first"]
    inside = ((times >= starts_tick) & (times <= ends_tick)).astype(np.int64)
    inside_counts = np.add.reduceat(inside, first)

    # Members in ID order (the result's order), then by start.
    used = np.unique(device_sessions["member"])
    rank = np.empty(len(member_ids), dtype=np.int64)
    rank[used] = np.argsort(np.argsort(member_ids[used].astype(str), kind="stable"))
    member_rank = rank[device_sessions["member"]]
    order = np.lexsort((device_sessions["start"], member_rank))
    member_rank = member_rank[order]
    start = device_sessions["start"][order]
    end = device_sessions["end"][order]
    new_member = np.ones(len(order), dtype=bool)
    new_member[1:] = member_rank[1:] != member_rank[:-1]
    latest_end = pd.Series(end).groupby(member_rank).cummax().to_numpy()
    starts_merged = new_member.copy()
    starts_merged[1:] |= start[1:] > latest_end[:-1]
    heads = np.flatnonzero(starts_merged)
    merged = np.cumsum(starts_merged) - 1

    devices = device_sessions["device"][order].astype(np.int64) + 1
    distinct = np.unique(merged * (int(devices.max(initial=0)) + 1) + devices)
    device_counts = np.bincount(distinct // (int(devices.max(initial=0)) + 1), minlength=len(heads))
    merged_start = start[heads]
    merged_end = np.maximum.reduceat(end, heads)
    watched_ticks = np.minimum(merged_end, ends_tick) - np.maximum(merged_start, starts_tick)
    member_heads = np.flatnonzero(new_member[heads])
    session_no = np.arange(len(heads)) - np.repeat(
        member_heads, np.diff(np.append(member_heads, len(heads)))
    )
    return pd.DataFrame(
        {
            "member_id": pd.Series(
                member_ids[device_sessions["member"][order][heads]], dtype="str"
            ),
            "session_no": session_no + 1,
            "started_at": instants_from_ticks(merged_start, times_dtype),
            "ended_at": instants_from_ticks(merged_end, times_dtype),
            "watched_seconds": np.maximum(watched_ticks, 0) / _ticks_per_second(times_dtype),
            "events": np.add.reduceat(device_sessions["events"][order], heads).astype(np.int64),
            "events_inside": np.add.reduceat(inside_counts[order], heads).astype(np.int64),
            "devices": device_counts.astype(np.int64),
        }
    )[SESSION_COLUMNS]


def instants_from_ticks(ticks: np.ndarray, times_dtype) -> pd.Series:
    """Turn integer ticks (see `_ticks`) back into the events' time dtype, zone included."""
    values = pd.Series(ticks.view(f"datetime64[{_unit(times_dtype)}]"))
    if getattr(times_dtype, "tz", None) is not None:
        values = values.dt.tz_localize("UTC").dt.tz_convert(times_dtype.tz)
    return values.astype(times_dtype)


def broadcast_seconds(starts_at: pd.Timestamp, ends_at: pd.Timestamp) -> float:
    return (ends_at - starts_at).total_seconds()


def watched_by_member(
    sessions: pd.DataFrame, starts_at: pd.Timestamp, ends_at: pd.Timestamp
) -> pd.DataFrame:
    """Return watched seconds, viewing rate and session count of each viewing member.

    Only sessions that touch the broadcast count: a stray heartbeat hours later forms a
    session row of its own but is no session of this broadcast.
    """
    length = broadcast_seconds(starts_at, ends_at)
    if length <= 0:
        raise ValueError(f"broadcast length must be positive, got {length} s")
    # Sessions come in member order, so each member's rows are one run. Summing runs
    # instead of hashing member IDs keeps the time in step with the sessions.
    heads, in_order = member_runs(sessions["member_id"])
    if not in_order:
        order = np.argsort(sessions["member_id"].to_numpy(dtype=object), kind="stable")
        sessions = sessions.take(order)
        heads, _ = member_runs(sessions["member_id"])
    seconds = sessions["watched_seconds"].to_numpy(dtype=np.float64)
    inside = sessions["events_inside"].to_numpy(dtype=np.int64)
    watched = _run_sums(seconds, heads)
    touching = (inside > 0) | (seconds > 0)
    viewing = _run_sums(inside, heads) > 0
    # The frame is built from filtered arrays, because a lookup in an index of a hundred
    # thousand member IDs would first hash them all.
    members = sessions["member_id"].iloc[heads[viewing]]
    return pd.DataFrame(
        {
            "watched_seconds": watched[viewing],
            "sessions": _run_sums(touching.astype(np.int64), heads)[viewing],
            "viewing_rate": (watched[viewing] / length).clip(0.0, 1.0),
        },
        index=pd.Index(members.array, name="member_id"),
    )


def member_runs(members: pd.Series) -> tuple[np.ndarray, bool]:
    """Return where each run of equal member IDs starts, and whether no ID is below the one before.

    A missing member ID raises ValueError, because every session belongs to a member.

    Sessions built here carry their member IDs as Arrow strings (pandas' `str`), which
    Arrow compares in place. Python strings, as a warehouse read returns them, are
    compared one object at a time, and a partition's hundred thousand members spill out
    of the CPU's caches.
    """
    if len(members) == 0:
        return np.zeros(0, dtype=np.int64), True
    missing = int(members.isna().sum())
    if missing:
        raise ValueError(f"{missing} sessions have a missing member_id, but each needs one")
    if isinstance(members.dtype, pd.StringDtype) and members.dtype.storage == "pyarrow":
        values = pa.array(members.array)
        later, earlier = values.slice(1), values.slice(0, len(values) - 1)
        changes = pc.not_equal(later, earlier).to_numpy(zero_copy_only=False)
        falls = pc.any(pc.less(later, earlier)).as_py() or False
    else:
        values = members.to_numpy(dtype=object)
        changes = values[1:] != values[:-1]
        falls = bool((values[1:][changes] < values[:-1][changes]).any())
    return np.flatnonzero(np.append(True, changes)), not falls


def _run_sums(values: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """Sum each run of `values` that starts at one of `heads`."""
    return np.add.reduceat(values, heads) if len(heads) else values[:0]
