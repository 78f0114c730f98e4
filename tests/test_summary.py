"""The viewer summary: engagement per member, from strings, categoricals or member blocks."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from livecrm_dagster.defs.reporting.summary import viewer_summary
from livecrm_dagster.defs.sessions.sessionize import viewing_sessions, watched_by_member

STARTS_AT = pd.Timestamp("2024-06-10T20:00:00+09:00")
ENDS_AT = pd.Timestamp("2024-06-10T21:00:00+09:00")
TOKYO = ZoneInfo("Asia/Tokyo")


def _events() -> pd.DataFrame:
    rows = [
        # m1 watches, chats twice, clicks two products (one twice) and answers correctly.
        ("m1", "view_start", "20:00:00", "", "", "", None),
        ("m1", "heartbeat", "20:00:10", "", "", "", None),
        ("m1", "chat", "20:00:11", "", "", "", None),
        ("m1", "chat", "20:00:12", "", "", "", None),
        ("m1", "product_click", "20:00:13", "p2", "", "", None),
        ("m1", "product_click", "20:00:14", "p1", "", "", None),
        ("m1", "product_click", "20:00:15", "p2", "", "", None),
        ("m1", "answer", "20:00:16", "", "q1", "b", True),
        ("m1", "heartbeat", "20:00:20", "", "", "", None),
        # m2 likes before the start (first seen), answers wrongly, claims a coupon.
        ("m2", "like", "19:59:00", "", "", "", None),
        ("m2", "heartbeat", "20:30:00", "", "", "", None),
        ("m2", "answer", "20:30:05", "", "q1", "a", False),
        ("m2", "coupon_claim", "20:30:06", "", "", "", None),
        # An anonymous viewer is in no summary.
        ("", "heartbeat", "20:10:00", "", "", "", None),
    ]
    frame = pd.DataFrame(
        rows,
        columns=["member_id", "type", "clock", "product_id", "question_id", "answer", "is_correct"],
    )
    frame["occurred_at"] = pd.to_datetime("2024-06-10T" + frame.pop("clock") + "+09:00", utc=True)
    frame["device_id"] = "d1"
    frame["coupon_code"] = frame["type"].map({"coupon_claim": "LIVE10"}).fillna("")
    frame["is_correct"] = frame["is_correct"].astype("boolean")
    return frame.sort_values("occurred_at", kind="stable").reset_index(drop=True)


def _summary(
    events: pd.DataFrame | list[pd.DataFrame], watched_from: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Summarize `events`, whole or in blocks, with sessions from `watched_from` if given."""
    sessions = viewing_sessions(
        events if watched_from is None else watched_from, STARTS_AT, ENDS_AT, 60.0
    )
    watched = watched_by_member(sessions, STARTS_AT, ENDS_AT)
    attribution = pd.DataFrame(
        {
            "member_id": pd.Series(dtype=object),
            "counted": pd.Series(dtype=bool),
            "net_amount": pd.Series(dtype="int64"),
            "net_items": pd.Series(dtype="int64"),
            "during_live": pd.Series(dtype=bool),
            "post_live": pd.Series(dtype=bool),
            "paid_at": pd.Series(dtype="datetime64[us, UTC]"),
            "product_ids": pd.Series(dtype=object),
        }
    )
    members = pd.DataFrame(
        {"member_id": ["m1", "m2"], "birth_date": ["", ""], "age": [34, 61], "gender": ["", "f"]}
    )
    return viewer_summary(events, watched, attribution, members, STARTS_AT, TOKYO)


def test_summary_counts_engagement_per_member():
    summary = _summary(_events()).set_index("member_id")

    assert summary.loc["m1", ["chats", "likes", "clicks"]].tolist() == [2, 0, 3]
    assert summary.loc["m1", "clicked_product_ids"] == "p1;p2"
    assert summary.loc["m1", "answers"] == "q1=b"
    assert summary.loc["m1", "correct_answers"] == 1
    assert summary.loc["m2", "first_seen_at"] == pd.Timestamp("2024-06-10T19:59:00+09:00")
    assert summary.loc["m2", "last_seen_at"] == pd.Timestamp("2024-06-10T20:30:06+09:00")
    assert bool(summary.loc["m2", "coupon_claimed"])
    assert summary.loc["m2", "correct_answers"] == 0
    assert summary.loc["m2", "age_band"] == "60 and over"


def test_categorical_events_give_the_same_summary():
    events = _events()
    text = ["member_id", "device_id", "type", "product_id", "question_id", "answer", "coupon_code"]
    coded = events.astype({column: "category" for column in text})

    pd.testing.assert_frame_equal(_summary(coded), _summary(events))


def test_member_blocks_give_the_same_summary():
    events = _events()
    blocks = [events.loc[events["member_id"] == member] for member in ("m2", "", "m1")]

    pd.testing.assert_frame_equal(_summary(blocks, watched_from=events), _summary(events))


def test_member_split_over_blocks_rejected():
    events = _events()

    # In time order, the first three events are m2's like and two of m1's.
    with pytest.raises(ValueError, match="2 members are split over several blocks"):
        _summary([events.iloc[:3], events.iloc[3:]], watched_from=events)
