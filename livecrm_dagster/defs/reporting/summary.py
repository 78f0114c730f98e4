"""The viewer summary (one row per viewing member) and the broadcast KPIs."""

from __future__ import annotations

from collections.abc import Iterable
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from livecrm_dagster.defs.sessions.sessionize import (
    VIEWING_TYPES,
    instants_from_ticks,
    label_codes,
)

SUMMARY_COLUMNS = [
    "member_id",
    "age_band",
    "gender",
    "first_seen_at",
    "last_seen_at",
    "watched_seconds",
    "viewing_rate",
    "sessions",
    "chats",
    "likes",
    "clicks",
    "clicked_product_ids",
    "answers",
    "correct_answers",
    "coupon_claimed",
    "bought_during_live",
    "amount",
    "items",
    "products_bought",
    "paid_at",
    "post_live_amount",
]
_AGE_BANDS = [
    (0, 20, "under 20"),
    (20, 30, "20-29"),
    (30, 40, "30-39"),
    (40, 50, "40-49"),
    (50, 60, "50-59"),
    (60, 200, "60 and over"),
]


def age_bands(members: pd.DataFrame, on: pd.Timestamp, zone: ZoneInfo) -> pd.Series:
    """Return each member's age band on the shop-time day of `on`, from age or birth date."""
    birth = pd.to_datetime(members["birth_date"], errors="coerce")
    day = on.tz_convert(zone).tz_localize(None)
    had_birthday = (birth.dt.month < day.month) | (
        (birth.dt.month == day.month) & (birth.dt.day <= day.day)
    )
    from_birth = day.year - birth.dt.year - (~had_birthday).astype(int)
    age = members["age"].astype("Float64").fillna(from_birth.astype("Float64"))
    band = pd.Series("unknown", index=members.index, dtype=object)
    for low, high, label in _AGE_BANDS:
        band[(age >= low) & (age < high)] = label
    return band


def viewer_summary(
    events: pd.DataFrame | Iterable[pd.DataFrame],
    watched: pd.DataFrame,
    attribution: pd.DataFrame,
    members: pd.DataFrame,
    starts_at: pd.Timestamp,
    zone: ZoneInfo,
) -> pd.DataFrame:
    """Build the per-member table of a broadcast's viewing members.

    `events` is the broadcast's events, whole or in member blocks (see
    `EventFiles.blocks`), each block holding every event of its members.
    `watched` is indexed by member_id (see `watched_by_member`). `attribution` contains
    this broadcast's attributed orders. Only counted orders with a positive net amount
    make a member a buyer.
    """
    summary = watched.copy()
    if summary.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    blocks = [events] if isinstance(events, pd.DataFrame) else events
    figures = pd.concat([_event_figures(block, summary.index) for block in blocks])
    repeated = figures.index[figures.index.duplicated()]
    if len(repeated):
        raise ValueError(
            f"the events of {len(repeated.unique())} members are split over several blocks; "
            "each block must hold every event of its members"
        )
    figures = figures.reindex(summary.index)
    for column in ("chats", "likes", "clicks", "correct_answers"):
        figures[column] = figures[column].fillna(0).astype("int64")
    for column in ("clicked_product_ids", "answers"):
        figures[column] = figures[column].fillna("")
    figures["coupon_claimed"] = figures["coupon_claimed"].fillna(False).astype(bool)
    summary = summary.join(figures)
    summary = summary.join(_purchases(attribution), how="left")
    summary["bought_during_live"] = summary["amount"].fillna(0) > 0
    for column in ("amount", "items", "post_live_amount"):
        summary[column] = summary[column].fillna(0).astype("int64")
    summary["products_bought"] = summary["products_bought"].fillna("")
    profile = members.set_index("member_id").reindex(summary.index)
    summary["gender"] = profile["gender"].fillna("").replace("", "unknown")
    summary["age_band"] = age_bands(profile.reset_index(), starts_at, zone).to_numpy()
    return summary.reset_index()[SUMMARY_COLUMNS]


def _event_figures(events: pd.DataFrame, viewing: pd.Index) -> pd.DataFrame:
    """Return the event counts and times of the viewing members found in `events`."""
    # Position of each event's member among those members (-1 for others), so the
    # per-member figures below work on integer codes instead of member ID strings.
    codes, labels = label_codes(events["member_id"])
    in_viewing = viewing.get_indexer(labels)
    present = np.unique(in_viewing[in_viewing >= 0])
    local = np.where(in_viewing >= 0, np.searchsorted(present, in_viewing), -1)
    member_codes = np.append(local, -1)[codes]
    figures = pd.DataFrame(index=viewing[present])
    mine = member_codes >= 0
    ticks = events["occurred_at"].array.asi8
    first_seen = np.full(len(figures), np.iinfo(np.int64).max)
    last_seen = np.full(len(figures), np.iinfo(np.int64).min)
    np.minimum.at(first_seen, member_codes[mine], ticks[mine])
    np.maximum.at(last_seen, member_codes[mine], ticks[mine])
    time_dtype = events["occurred_at"].dtype
    figures["first_seen_at"] = _instants_or_missing(first_seen, time_dtype, figures.index)
    figures["last_seen_at"] = _instants_or_missing(last_seen, time_dtype, figures.index)
    # Viewing events are nearly all of the rows; the other types are counted from the rest,
    # which is small enough to handle as plain strings.
    type_codes, types = label_codes(events["type"])
    engaged = mine & np.append(~np.isin(types, VIEWING_TYPES), True)[type_codes]
    rare = _as_strings(events.loc[engaged])
    rare_codes = member_codes[engaged]
    rare_types = rare["type"].to_numpy()
    for column, event_type in (("chats", "chat"), ("likes", "like"), ("clicks", "product_click")):
        counts = np.bincount(rare_codes[rare_types == event_type], minlength=len(figures))
        figures[column] = counts.astype("int64")
    figures["clicked_product_ids"] = _joined(rare.loc[rare["type"] == "product_click"], figures)
    answers = rare.loc[rare["type"] == "answer"]
    figures["answers"] = _joined(
        answers.assign(product_id=answers["question_id"] + "=" + answers["answer"]), figures
    )
    figures["correct_answers"] = (
        answers.loc[answers["is_correct"].fillna(False).astype(bool)]
        .groupby("member_id")
        .size()
        .reindex(figures.index, fill_value=0)
    )
    figures["coupon_claimed"] = _count(rare, "coupon_claim", figures.index) > 0
    return figures


def _instants_or_missing(ticks: np.ndarray, dtype, index: pd.Index) -> pd.Series:
    """Turn per-member ticks into times; a member without events (a sentinel) gets NaT."""
    missing = (ticks == np.iinfo(np.int64).max) | (ticks == np.iinfo(np.int64).min)
    values = instants_from_ticks(np.where(missing, 0, ticks), dtype)
    return values.set_axis(index).mask(missing)


def _as_strings(events: pd.DataFrame) -> pd.DataFrame:
    """Return a small slice of events with categorical text turned into plain strings."""
    events = events.copy()
    for column in events.columns:
        if isinstance(events[column].dtype, pd.CategoricalDtype):
            events[column] = events[column].astype(object)
    return events


def _count(events: pd.DataFrame, event_type: str, index: pd.Index) -> pd.Series:
    counts = events.loc[events["type"] == event_type].groupby("member_id").size()
    return counts.reindex(index, fill_value=0).astype("int64")


def _joined(events: pd.DataFrame, summary: pd.DataFrame) -> pd.Series:
    values = events.groupby("member_id")["product_id"].agg(lambda ids: ";".join(sorted(set(ids))))
    return values.reindex(summary.index, fill_value="")


def _purchases(attribution: pd.DataFrame) -> pd.DataFrame:
    counted = attribution.loc[attribution["counted"].astype(bool) & (attribution["net_amount"] > 0)]
    live = counted.loc[counted["during_live"].astype(bool)]
    post = counted.loc[counted["post_live"].astype(bool)]
    purchases = live.groupby("member_id").agg(
        amount=("net_amount", "sum"),
        items=("net_items", "sum"),
        paid_at=("paid_at", "min"),
        products_bought=(
            "product_ids",
            lambda ids: ";".join(sorted(set(";".join(ids).split(";")))),
        ),
    )
    post_amount = post.groupby("member_id")["net_amount"].sum().rename("post_live_amount")
    return purchases.join(post_amount, how="outer")


def broadcast_kpis(
    summary: pd.DataFrame, attribution: pd.DataFrame, anonymous_viewers: int
) -> dict[str, float | int]:
    """Compute the KPI row of one broadcast; CVR is buyers during the live / viewing members."""
    viewing_members = len(summary)
    buyers = int(summary["bought_during_live"].sum()) if viewing_members else 0
    counted = attribution.loc[attribution["counted"].astype(bool) & (attribution["net_amount"] > 0)]
    live = counted.loc[counted["during_live"].astype(bool)]
    post = counted.loc[counted["post_live"].astype(bool)]
    clicked = counted.loc[counted["clicked_then_bought"].astype(bool)]
    revenue = int(live["net_amount"].sum())
    return {
        "viewing_members": viewing_members,
        "anonymous_viewers": int(anonymous_viewers),
        "buyers_during_live": buyers,
        "cvr": buyers / viewing_members if viewing_members else 0.0,
        "orders_during_live": len(live),
        "revenue_during_live": revenue,
        "average_order_value": revenue / len(live) if len(live) else 0.0,
        "non_buyers": viewing_members - buyers,
        "average_viewing_rate": _mean(summary, "viewing_rate"),
        "average_watched_seconds": _mean(summary, "watched_seconds"),
        "chats": _total(summary, "chats"),
        "likes": _total(summary, "likes"),
        "clicks": _total(summary, "clicks"),
        "post_live_buyers": int(post["member_id"].nunique()),
        "post_live_revenue": int(post["net_amount"].sum()),
        "same_night_revenue": int(post.loc[post["same_night"].astype(bool), "net_amount"].sum()),
        "clicked_then_bought_revenue": int(clicked["net_amount"].sum()),
    }


def _mean(frame: pd.DataFrame, column: str) -> float:
    return float(frame[column].mean()) if len(frame) else 0.0


def _total(frame: pd.DataFrame, column: str) -> int:
    return int(np.asarray(frame[column], dtype="int64").sum()) if len(frame) else 0


def format_money(amount: int, currency: str) -> str:
    """Format an amount in the currency's smallest unit for a report line."""
    if currency == "JPY":
        return f"¥{amount:,}"
    symbol = {"GBP": "£", "USD": "$", "EUR": "€"}.get(currency, currency + " ")
    return f"{symbol}{amount // 100:,}.{amount % 100:02d}"


def report_line(kpis: dict[str, float | int], currency: str) -> str:
    """Return the one-line report: watched, bought during the live with CVR, revenue, follow-up."""
    return (
        f"{kpis['viewing_members']:,} members watched, {kpis['buyers_during_live']:,} bought "
        f"during the live (CVR {kpis['cvr'] * 100:.1f}%), revenue "
        f"{format_money(int(kpis['revenue_during_live']), currency)}, "
        f"{kpis['non_buyers']:,} to follow up"
    )
