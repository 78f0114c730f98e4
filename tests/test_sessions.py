"""Sessions, watched seconds and viewing rate, computed by hand on one-hour broadcasts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from livecrm_dagster import event_files
from livecrm_dagster.defs.sessions.sessionize import (
    member_runs,
    sessions_of_blocks,
    viewing_sessions,
    watched_by_member,
)
from livecrm_dagster.event_files import EventFiles

STARTS_AT = pd.Timestamp("2024-06-10T20:00:00+09:00")
ENDS_AT = pd.Timestamp("2024-06-10T21:00:00+09:00")
TIMEOUT = 60.0


def _at(clock: str) -> pd.Timestamp:
    """Return the instant of a wall-clock time on the broadcast's evening in Tokyo."""
    return pd.Timestamp(f"2024-06-10T{clock}+09:00")


def _event(member_id: str, clock: str, event_type: str = "heartbeat", device_id: str = ""):
    return {
        "member_id": member_id,
        "device_id": device_id,
        "type": event_type,
        "occurred_at": _at(clock),
    }


def _every_ten_seconds(member_id: str, first: str, last: str, device_id: str = ""):
    times = pd.date_range(_at(first), _at(last), freq="10s")
    return [
        {"member_id": member_id, "device_id": device_id, "type": "heartbeat", "occurred_at": t}
        for t in times
    ]


def _frame(events: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(events, columns=["member_id", "device_id", "type", "occurred_at"])
    frame["occurred_at"] = pd.to_datetime(frame["occurred_at"], utc=True)
    return frame


def _sessions(events: list[dict]) -> pd.DataFrame:
    return viewing_sessions(_frame(events), STARTS_AT, ENDS_AT, TIMEOUT)


def _watched(events: list[dict]) -> pd.DataFrame:
    return watched_by_member(_sessions(events), STARTS_AT, ENDS_AT)


@pytest.mark.parametrize(
    ("gap_seconds", "sessions", "watched_seconds"),
    [
        # One second under the timeout: 59 s gap plus 30 s after it, one session.
        (59, 1, 89.0),
        # Exactly the timeout stays inside the session: 60 s plus 30 s.
        (60, 1, 90.0),
        # One second over the timeout cuts: a 0 s session, then a 30 s one.
        (61, 2, 30.0),
        # A ten-minute gap cuts as well: a 0 s session, then a 30 s one.
        (600, 2, 30.0),
    ],
)
def test_gap_against_timeout_cuts_sessions(gap_seconds, sessions, watched_seconds):
    first = _at("20:10:00")
    times = [first, first + pd.Timedelta(seconds=gap_seconds)]
    times.append(times[1] + pd.Timedelta(seconds=30))
    events = [
        {"member_id": "m1", "device_id": "", "type": "heartbeat", "occurred_at": t} for t in times
    ]
    result = _sessions(events)
    assert len(result) == sessions
    assert result["watched_seconds"].sum() == pytest.approx(watched_seconds)


def test_gap_of_exactly_timeout_stays_in_session():
    events = [_event("m1", "20:10:00"), _event("m1", "20:11:00")]
    result = _sessions(events)
    assert len(result) == 1
    assert result.loc[0, "ended_at"] == _at("20:11:00")


def test_missing_view_end_ends_at_last_heartbeat():
    events = [_event("m1", "20:00:00", "view_start")] + _every_ten_seconds(
        "m1", "20:00:10", "20:05:00"
    )
    result = _sessions(events)
    assert len(result) == 1
    assert result.loc[0, "started_at"] == _at("20:00:00")
    assert result.loc[0, "ended_at"] == _at("20:05:00")
    assert result.loc[0, "watched_seconds"] == pytest.approx(300.0)


def test_view_end_closes_its_device_session():
    # d1 ends at 20:10:00 and starts again 30 s later, inside the timeout.
    events = (
        _every_ten_seconds("m1", "20:00:00", "20:09:50", device_id="d1")
        + [_event("m1", "20:10:00", "view_end", device_id="d1")]
        + _every_ten_seconds("m1", "20:10:30", "20:20:00", device_id="d1")
    )
    result = _sessions(events)
    assert len(result) == 2
    assert result["watched_seconds"].tolist() == [600.0, 570.0]


def test_view_end_of_one_device_keeps_other():
    events = (
        _every_ten_seconds("m1", "20:00:00", "20:09:50", device_id="d1")
        + [_event("m1", "20:10:00", "view_end", device_id="d1")]
        + _every_ten_seconds("m1", "20:05:00", "20:30:00", device_id="d2")
    )
    result = _sessions(events)
    assert len(result) == 1
    assert result.loc[0, "ended_at"] == _at("20:30:00")
    assert result.loc[0, "watched_seconds"] == pytest.approx(1800.0)
    assert result.loc[0, "devices"] == 2


def test_view_end_without_device_closes_nothing():
    # Without device IDs, the view_end may come from a second tab while the first plays on.
    events = _every_ten_seconds("m1", "20:00:00", "20:30:00") + [
        _event("m1", "20:10:05", "view_end")
    ]
    result = _sessions(events)
    assert len(result) == 1
    assert result.loc[0, "watched_seconds"] == pytest.approx(1800.0)


def test_overlapping_devices_merged_not_added():
    # d1 plays 20:00-20:40 and d2 20:20-20:50: the union is 50 min, not 40 + 30 min.
    events = _every_ten_seconds("m1", "20:00:00", "20:40:00", device_id="d1")
    events += _every_ten_seconds("m1", "20:20:00", "20:50:00", device_id="d2")
    result = _sessions(events)
    assert len(result) == 1
    assert result.loc[0, "watched_seconds"] == pytest.approx(3000.0)
    assert result.loc[0, "devices"] == 2
    assert result.loc[0, "events"] == 241 + 181


def test_touching_device_sessions_merge():
    events = _every_ten_seconds("m1", "20:00:00", "20:10:00", device_id="d1")
    events += _every_ten_seconds("m1", "20:10:00", "20:20:00", device_id="d2")
    result = _sessions(events)
    assert len(result) == 1
    assert result.loc[0, "watched_seconds"] == pytest.approx(1200.0)


@pytest.mark.parametrize(
    ("first", "last", "watched_seconds"),
    [
        # Joined ten minutes early: only 20:00-20:10 counts.
        ("19:50:00", "20:10:00", 600.0),
        # Stayed ten minutes after the end: only 20:50-21:00 counts.
        ("20:50:00", "21:10:00", 600.0),
        # Watched from before the start to after the end: the whole hour.
        ("19:30:00", "21:30:00", 3600.0),
    ],
)
def test_viewing_outside_broadcast_is_clipped(first, last, watched_seconds):
    watched = _watched(_every_ten_seconds("m1", first, last))
    assert watched.loc["m1", "watched_seconds"] == pytest.approx(watched_seconds)


def test_anonymous_viewers_are_excluded():
    events = _every_ten_seconds("", "20:00:00", "20:30:00", device_id="anon")
    events += _every_ten_seconds("m1", "20:00:00", "20:10:00")
    assert _sessions(events)["member_id"].tolist() == ["m1"]
    assert _watched(events).index.tolist() == ["m1"]


def test_stray_events_only_is_not_viewer():
    # m1 sent heartbeats at 19:00-19:05 and at 22:00 only, all outside [20:00, 21:00].
    events = _every_ten_seconds("m1", "19:00:00", "19:05:00") + [_event("m1", "22:00:00")]
    assert len(_sessions(events)) == 2
    assert "m1" not in _watched(events).index


def test_single_event_inside_makes_viewer():
    # One heartbeat inside the broadcast gives 0 s of watched time but a viewing member.
    watched = _watched([_event("m1", "20:30:00")])
    assert watched.loc["m1", "watched_seconds"] == 0.0
    assert watched.loc["m1", "viewing_rate"] == 0.0


def test_heartbeat_exactly_at_end_counts():
    watched = _watched([_event("m1", "21:00:00")])
    assert watched.index.tolist() == ["m1"]


def test_chat_alone_is_not_viewing():
    watched = _watched([_event("m1", "20:30:00", "chat")])
    assert watched.empty


@pytest.mark.parametrize(
    ("events", "viewing_rate"),
    [
        # Two devices each covering the whole hour and more: capped by the union, 1.0.
        (
            _every_ten_seconds("m1", "19:00:00", "22:00:00", device_id="d1")
            + _every_ten_seconds("m1", "19:30:00", "21:30:00", device_id="d2"),
            1.0,
        ),
        # Half the broadcast: 20:00-20:30.
        (_every_ten_seconds("m1", "20:00:00", "20:30:00"), 0.5),
        # Two separate sessions of 9 min each (20:00-20:09, 20:30-20:39): 1080 s.
        (
            _every_ten_seconds("m1", "20:00:00", "20:09:00")
            + _every_ten_seconds("m1", "20:30:00", "20:39:00"),
            0.3,
        ),
    ],
)
def test_viewing_rate_stays_in_unit_interval(events, viewing_rate):
    rate = _watched(events).loc["m1", "viewing_rate"]
    assert rate == pytest.approx(viewing_rate)
    assert 0.0 <= rate <= 1.0


def test_members_sessions_are_numbered_separately():
    events = _every_ten_seconds("m1", "20:00:00", "20:05:00")
    events += _every_ten_seconds("m1", "20:20:00", "20:25:00")
    events += _every_ten_seconds("m2", "20:00:00", "20:05:00")
    result = _sessions(events)
    assert result["member_id"].tolist() == ["m1", "m1", "m2"]
    assert result["session_no"].tolist() == [1, 2, 1]


def test_no_viewing_events_give_no_sessions():
    assert _sessions([_event("m1", "20:30:00", "chat")]).empty


def test_zero_length_broadcast_is_rejected():
    sessions = _sessions(_every_ten_seconds("m1", "20:00:00", "20:05:00"))
    with pytest.raises(ValueError, match="broadcast length must be positive"):
        watched_by_member(sessions, STARTS_AT, STARTS_AT)


def _reference_sessions(events: pd.DataFrame) -> list[tuple]:
    """Sessions by the written definitions, one device and one member at a time in Python.

    Slow but plain: it is the yardstick for the vectorized code on random partitions.
    """
    viewing = events.loc[
        events["type"].isin(["view_start", "heartbeat", "view_end"]) & (events["member_id"] != "")
    ]
    # Time order, ties in the order of the partition.
    viewing = viewing.iloc[viewing["occurred_at"].argsort(kind="stable")]
    spans: dict[str, list[list]] = {}
    for (member, device), rows in viewing.groupby(["member_id", "device_id"], sort=False):
        current = None
        for instant, event_type in zip(rows["occurred_at"], rows["type"], strict=True):
            gap = None if current is None else (instant - current[1]).total_seconds()
            if current is None or gap > TIMEOUT or current[4]:
                current = [instant, instant, 0, {device}, False]
                spans.setdefault(member, []).append(current)
            current[1] = instant
            current[2] += 1
            current[4] = event_type == "view_end" and device != ""
    result = []
    for member in sorted(spans):
        merged: list[list] = []
        for span in sorted(spans[member], key=lambda span: span[0]):
            if merged and span[0] <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], span[1])
                merged[-1][2] += span[2]
                merged[-1][3] |= span[3]
            else:
                merged.append([span[0], span[1], span[2], set(span[3])])
        for number, (start, end, count, devices) in enumerate(merged, start=1):
            watched = (min(end, ENDS_AT) - max(start, STARTS_AT)).total_seconds()
            result.append((member, number, start, end, max(watched, 0.0), count, len(devices)))
    return result


def _random_partition(seed: int) -> pd.DataFrame:
    """Return shuffled viewing events of a few members with gaps, ties and several devices."""
    rng = np.random.default_rng(seed)
    size = 3_000
    offsets = np.sort(rng.integers(-600, 4_200, size)).astype("int64")
    # Same-second events across devices and members, and exact timeout gaps, are common.
    frame = pd.DataFrame(
        {
            "member_id": rng.choice(["", "m1", "m2", "m3", "m10", "ｍ4"], size),
            "device_id": rng.choice(["", "d1", "d2", "d3"], size),
            "type": rng.choice(
                ["heartbeat", "heartbeat", "heartbeat", "view_start", "view_end", "chat"], size
            ),
            "occurred_at": STARTS_AT.tz_convert("UTC") + pd.to_timedelta(offsets * 5, unit="s"),
        }
    )
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_partitions_match_the_reference(seed):
    events = _random_partition(seed)

    sessions = viewing_sessions(events, STARTS_AT, ENDS_AT, TIMEOUT)

    got = [
        (
            row.member_id,
            row.session_no,
            row.started_at,
            row.ended_at,
            row.watched_seconds,
            row.events,
            row.devices,
        )
        for row in sessions.itertuples()
    ]
    assert got == _reference_sessions(events)


@pytest.mark.parametrize("seed", [4, 5])
def test_categorical_events_give_the_same_sessions(seed):
    events = _random_partition(seed)
    coded = events.astype({"member_id": "category", "device_id": "category", "type": "category"})

    plain = viewing_sessions(events, STARTS_AT, ENDS_AT, TIMEOUT)

    pd.testing.assert_frame_equal(viewing_sessions(coded, STARTS_AT, ENDS_AT, TIMEOUT), plain)


def test_empty_and_missing_device_same():
    events = [
        _event("m1", "20:00:00", device_id=""),
        _event("m1", "20:00:10", device_id=None),
        _event("m1", "20:00:20", "view_end", device_id=""),
        _event("m1", "20:00:30", device_id=None),
    ]

    sessions = _sessions(events)

    # The view_end of an unknown device closes nothing, so one session runs to 20:00:30.
    assert sessions["devices"].tolist() == [1]
    assert sessions["events"].tolist() == [4]
    assert sessions["watched_seconds"].tolist() == [30.0]


@pytest.mark.parametrize("seed", [6, 7])
def test_devices_of_one_member_each_match_the_reference(seed):
    # Real devices belong to one member, and the grouping then needs one pass by device.
    events = _random_partition(seed)
    own = events["device_id"] != ""
    events.loc[own, "device_id"] = events["member_id"] + "/" + events["device_id"]

    sessions = viewing_sessions(events, STARTS_AT, ENDS_AT, TIMEOUT)

    got = [
        (row.member_id, row.session_no, row.started_at, row.ended_at, row.watched_seconds,
         row.events, row.devices)
        for row in sessions.itertuples()
    ]  # fmt: skip
    assert got == _reference_sessions(events)


@pytest.mark.parametrize("seed", [8, 9])
def test_member_blocks_give_the_same_sessions(seed, tmp_path, monkeypatch):
    monkeypatch.setattr(event_files, "_ROW_GROUP", 500)
    events = _random_partition(seed)
    events["event_id"] = [f"e{number}" for number in range(len(events))]
    files = EventFiles(tmp_path)
    files.replace("b1", events)
    columns = ["member_id", "device_id", "type", "occurred_at"]

    blocks = list(files.blocks("b1", columns=columns, categorical=True))
    whole = files.read("b1", columns=columns, categorical=True)

    assert len(blocks) > 2
    pd.testing.assert_frame_equal(
        sessions_of_blocks(blocks, STARTS_AT, ENDS_AT, TIMEOUT),
        viewing_sessions(whole, STARTS_AT, ENDS_AT, TIMEOUT),
    )


def test_member_split_over_blocks_rejected():
    events = _frame([_event("m1", "20:00:00"), _event("m1", "20:00:10"), _event("m2", "20:00:20")])

    with pytest.raises(ValueError, match="1 members are split over several blocks"):
        sessions_of_blocks([events.iloc[:1], events.iloc[1:]], STARTS_AT, ENDS_AT, TIMEOUT)


def test_blocks_out_of_order_sorted():
    events = _frame([_event("m1", "20:00:00"), _event("m2", "20:00:10")])

    sessions = sessions_of_blocks([events.iloc[1:], events.iloc[:1]], STARTS_AT, ENDS_AT, TIMEOUT)

    assert sessions["member_id"].tolist() == ["m1", "m2"]
    assert sessions.index.tolist() == [0, 1]


@pytest.mark.parametrize("seed", [10, 11])
# The sessions code builds "str" member IDs, and a warehouse read returns objects.
@pytest.mark.parametrize("member_dtype", ["str", object])
def test_watched_by_member_matches_groupby(seed, member_dtype):
    sessions = viewing_sessions(_random_partition(seed), STARTS_AT, ENDS_AT, TIMEOUT)
    sessions["member_id"] = sessions["member_id"].astype(member_dtype)
    touching = (sessions["events_inside"] > 0) | (sessions["watched_seconds"] > 0)
    grouped = sessions.assign(touching=touching).groupby("member_id")
    expected = pd.DataFrame(
        {
            "watched_seconds": grouped["watched_seconds"].sum(),
            "sessions": grouped["touching"].sum().astype("int64"),
        }
    ).loc[grouped["events_inside"].sum() > 0]
    expected["viewing_rate"] = (expected["watched_seconds"] / 3_600).clip(0.0, 1.0)

    in_order = watched_by_member(sessions, STARTS_AT, ENDS_AT)
    shuffled = watched_by_member(sessions.sample(frac=1.0, random_state=seed), STARTS_AT, ENDS_AT)

    pd.testing.assert_frame_equal(in_order, expected, check_index_type=False)
    pd.testing.assert_frame_equal(shuffled, in_order)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("member_dtype", ["str", object])
def test_member_runs_match_a_plain_loop(seed, member_dtype):
    rng = np.random.default_rng(seed)
    ids = ["a", "a\x00", "b", "m10", "m2", "ｍ1", "é", "e\u0301"]
    values = [ids[i] for i in np.sort(rng.integers(0, len(ids), rng.integers(0, 30)))]
    if seed % 2:
        rng.shuffle(values)

    heads, in_order = member_runs(pd.Series(values, dtype=member_dtype))

    assert heads.tolist() == [i for i in range(len(values)) if i == 0 or values[i] != values[i - 1]]
    assert in_order == all(
        values[i - 1].encode() <= values[i].encode() for i in range(1, len(values))
    )


@pytest.mark.parametrize("member_dtype", ["str", object])
def test_watched_by_member_rejects_missing_member(member_dtype):
    sessions = pd.DataFrame(
        {
            "member_id": pd.Series(["b", None, "a", "b"], dtype=member_dtype),
            "watched_seconds": [60.0] * 4,
            "events_inside": [1] * 4,
        }
    )

    with pytest.raises(ValueError, match="1 sessions have a missing member_id"):
        watched_by_member(sessions, STARTS_AT, ENDS_AT)
