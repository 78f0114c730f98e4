"""Order attribution: which orders a broadcast earned, under three rules side by side.

- During the live: paid_at in [start, end], both ends included.
- Post-live: paid_at after the end and at most `post_live_days` later; `same_night`
  marks those paid by 23:59:59 of the end's day in shop time.
- Clicked then bought: the order contains a product the member clicked in this broadcast,
  paid after the click and at most `clicked_then_bought_days` later.

Only orders of the broadcast's viewing members are considered. An order counts for one
broadcast at most: the latest-starting broadcast the member watched that had started
before the order was paid. Amounts are net of cancellations and credit notes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import pandas as pd

ATTRIBUTION_COLUMNS = [
    "order_id",
    "member_id",
    "paid_at",
    "status",
    "gross_amount",
    "net_amount",
    "net_items",
    "product_ids",
    "during_live",
    "post_live",
    "same_night",
    "clicked_then_bought",
    "claimed_by",
    "counted",
]


@dataclass(frozen=True)
class Broadcast:
    broadcast_id: str
    starts_at: pd.Timestamp
    ends_at: pd.Timestamp


def end_of_shop_day(instant: pd.Timestamp, zone: ZoneInfo) -> pd.Timestamp:
    """Return the last microsecond (23:59:59.999999) of the shop-time day of `instant`.

    Times are stored with microsecond precision, so a payment at 23:59:59.5 is still
    inside the day.
    """
    local = instant.tz_convert(zone)
    midnight = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(0), tzinfo=zone)
    return pd.Timestamp(midnight).tz_convert("UTC") - pd.Timedelta(microseconds=1)


def attribute_orders(
    broadcast: Broadcast,
    order_lines: pd.DataFrame,
    viewing_members: pd.Index,
    clicks: pd.DataFrame,
    other_viewing: pd.DataFrame,
    post_live_days: float,
    clicked_then_bought_days: float,
    zone: ZoneInfo,
) -> pd.DataFrame:
    """Return one row per order of a viewing member paid inside the attribution window.

    `order_lines` are netted sales lines (see `net_order_lines`), and `clicks` are this
    broadcast's product_click events. `other_viewing` lists (member_id, broadcast_id,
    starts_at) of the other broadcasts where each member was a viewing member.
    """
    window_end = broadcast.ends_at + pd.Timedelta(
        days=max(post_live_days, clicked_then_bought_days)
    )
    lines = order_lines.loc[
        order_lines["member_id"].isin(viewing_members)
        & (order_lines["paid_at"] >= broadcast.starts_at)
        & (order_lines["paid_at"] <= window_end)
    ]
    if lines.empty:
        return pd.DataFrame(columns=ATTRIBUTION_COLUMNS)

    orders = _per_order(lines)
    paid_at = orders["paid_at"]
    orders["during_live"] = (paid_at >= broadcast.starts_at) & (paid_at <= broadcast.ends_at)
    after_end = paid_at > broadcast.ends_at
    post_live_end = broadcast.ends_at + pd.Timedelta(days=post_live_days)
    orders["post_live"] = after_end & (paid_at <= post_live_end)
    orders["same_night"] = after_end & (paid_at <= end_of_shop_day(broadcast.ends_at, zone))
    orders["clicked_then_bought"] = _clicked_then_bought(
        lines, clicks, clicked_then_bought_days
    ).reindex(orders.index, fill_value=False)
    orders["claimed_by"] = _claiming_broadcast(orders, broadcast, other_viewing)
    orders["counted"] = orders["claimed_by"] == broadcast.broadcast_id
    relevant = orders["during_live"] | orders["post_live"] | orders["clicked_then_bought"]
    return orders.loc[relevant].reset_index()[ATTRIBUTION_COLUMNS]


def _per_order(lines: pd.DataFrame) -> pd.DataFrame:
    lines = lines.assign(
        gross=lines["quantity"].astype("int64") * lines["unit_price"].astype("int64")
    )
    bought = lines.loc[lines["net_quantity"] > 0]
    products = bought.groupby("order_id")["product_id"].agg(lambda ids: ";".join(sorted(set(ids))))
    orders = lines.groupby("order_id").agg(
        member_id=("member_id", "first"),
        paid_at=("paid_at", "first"),
        status=("status", "first"),
        gross_amount=("gross", "sum"),
        net_amount=("net_amount", "sum"),
        net_items=("net_quantity", "sum"),
    )
    orders["product_ids"] = products.reindex(orders.index, fill_value="")
    for column in ("gross_amount", "net_amount", "net_items"):
        orders[column] = orders[column].astype("int64")
    return orders


def _clicked_then_bought(
    lines: pd.DataFrame, clicks: pd.DataFrame, within_days: float
) -> pd.Series:
    if clicks.empty:
        return pd.Series(False, index=pd.Index([], name="order_id"))
    pairs = lines.loc[lines["net_quantity"] > 0, ["order_id", "member_id", "product_id", "paid_at"]]
    pairs = pairs.merge(
        clicks[["member_id", "product_id", "occurred_at"]], on=["member_id", "product_id"]
    )
    delay = pairs["paid_at"] - pairs["occurred_at"]
    followed = (delay >= pd.Timedelta(0)) & (delay <= pd.Timedelta(days=within_days))
    return followed.groupby(pairs["order_id"]).any()


def _claiming_broadcast(
    orders: pd.DataFrame, broadcast: Broadcast, other_viewing: pd.DataFrame
) -> pd.Series:
    """Return, per order, the latest-starting watched broadcast that began before payment."""
    this = pd.DataFrame(
        {
            "member_id": orders["member_id"].unique(),
            "broadcast_id": broadcast.broadcast_id,
            "starts_at": broadcast.starts_at,
        }
    )
    watched = pd.concat([this, other_viewing[["member_id", "broadcast_id", "starts_at"]]])
    candidates = orders[["member_id", "paid_at"]].reset_index().merge(watched, on="member_id")
    candidates = candidates.loc[candidates["starts_at"] <= candidates["paid_at"]]
    latest = (
        candidates.sort_values(["order_id", "starts_at", "broadcast_id"])
        .groupby("order_id")["broadcast_id"]
        .last()
    )
    return latest.reindex(orders.index)
