"""Lift of each follow-up step: conversion of the members sent a message against the holdout.

For each step of a broadcast, from its send ledger rows:

- sent members: members with a `sent` row (any channel); their start time is the earliest
  `sent_at`. A member both sent and held out counts as sent only.
- holdout members: members with a `holdout` row. Their start time is the row's
  `updated_at`, the moment the holdout was recorded, which a later run reaching the same
  decision leaves unchanged.
- conversions: members with an order line of status `paid` whose `paid_at` is after their
  start time and at most CONVERSION_WINDOW later.
- conversion rate: conversions / members, missing (NaN) for a group without members.
- lift: sent rate minus holdout rate, in percentage points, missing when either is.

Failed, skipped and planned rows count in neither group.
"""

from __future__ import annotations

import pandas as pd

from livecrm_dagster.defs.followups.ledger import HOLDOUT, SENT

# How long after a send (or a holdout) a paid order counts as a conversion. A module
# constant rather than a setting: neither the shop settings nor the scenarios have a
# section for measurement, and the post-live window there means something else.
CONVERSION_WINDOW = pd.Timedelta(days=7)

LIFT_COLUMNS = [
    "step_id",
    "sent_members",
    "sent_conversions",
    "sent_conversion_rate",
    "holdout_members",
    "holdout_conversions",
    "holdout_conversion_rate",
    "lift_points",
    "window_days",
    "window_closes_at",
]


def step_groups(ledger: pd.DataFrame) -> pd.DataFrame:
    """Return one row per (step, member) in a group: step_id, member_id, group, started_at.

    `group` is "sent" or "holdout", and `started_at` is when the member's conversion window
    opens.
    """
    sent = ledger.loc[ledger["status"] == SENT]
    sent = sent.groupby(["step_id", "member_id"], as_index=False)["sent_at"].min()
    sent = sent.rename(columns={"sent_at": "started_at"}).assign(group="sent")
    holdout = ledger.loc[ledger["status"] == HOLDOUT]
    holdout = holdout.groupby(["step_id", "member_id"], as_index=False)["updated_at"].min()
    holdout = holdout.rename(columns={"updated_at": "started_at"}).assign(group="holdout")
    # Sent rows come first, so a member in both groups of one step stays in `sent`.
    both = pd.concat([sent, holdout], ignore_index=True)
    both = both.drop_duplicates(["step_id", "member_id"], keep="first")
    return both[["step_id", "member_id", "group", "started_at"]].reset_index(drop=True)


def converted(
    groups: pd.DataFrame, orders: pd.DataFrame, window: pd.Timedelta = CONVERSION_WINDOW
) -> pd.Series:
    """Flag each row of `groups` whose member paid an order in (started_at, started_at + window].

    `orders` has `member_id`, `paid_at` and `status`; only `paid` lines count. Returns a
    boolean Series aligned with `groups`.
    """
    paid = orders.loc[(orders["status"] == "paid") & orders["paid_at"].notna()]
    pairs = (
        groups[["member_id", "started_at"]]
        .reset_index()
        .merge(paid[["member_id", "paid_at"]], on="member_id", how="inner")
    )
    inside = (pairs["paid_at"] > pairs["started_at"]) & (
        pairs["paid_at"] <= pairs["started_at"] + window
    )
    hits = set(pairs.loc[inside, "index"])
    return pd.Series(groups.index.isin(list(hits)), index=groups.index)


def followup_lift(
    ledger: pd.DataFrame,
    orders: pd.DataFrame,
    window: pd.Timedelta = CONVERSION_WINDOW,
) -> pd.DataFrame:
    """Compute one row of members, conversions, rates and lift per step in `ledger`.

    `ledger` contains one broadcast's send ledger rows (step_id, member_id, status,
    sent_at, updated_at). Steps whose rows are all failed or skipped get zero members.
    `window_closes_at` is when the last member's window closes: conversions can still
    grow until then.
    """
    steps = sorted(ledger["step_id"].unique())
    if not steps:
        return pd.DataFrame(columns=LIFT_COLUMNS)
    groups = step_groups(ledger)
    groups["converted"] = converted(groups, orders, window)
    counts = groups.pivot_table(
        index="step_id",
        columns="group",
        values="converted",
        aggfunc=["size", "sum"],
        fill_value=0,
    )
    lift = pd.DataFrame(index=pd.Index(steps, name="step_id"))
    for group in ("sent", "holdout"):
        members = _column(counts, "size", group, steps)
        conversions = _column(counts, "sum", group, steps)
        lift[f"{group}_members"] = members
        lift[f"{group}_conversions"] = conversions
        rate = conversions.astype("float64") / members.where(members > 0)
        lift[f"{group}_conversion_rate"] = rate
    lift["lift_points"] = (lift["sent_conversion_rate"] - lift["holdout_conversion_rate"]) * 100
    lift["window_days"] = window / pd.Timedelta(days=1)
    closes = groups.groupby("step_id")["started_at"].max() + window
    lift["window_closes_at"] = closes.reindex(steps)
    return lift.reset_index()[LIFT_COLUMNS]


def _column(counts: pd.DataFrame, measure: str, group: str, steps: list[str]) -> pd.Series:
    if (measure, group) not in counts.columns:
        return pd.Series(0, index=pd.Index(steps, name="step_id"), dtype="int64")
    return counts[(measure, group)].reindex(steps, fill_value=0).astype("int64")


def lift_markdown(lift: pd.DataFrame) -> str:
    """Render the lift rows as a Markdown table, one line per step."""
    header = (
        "| step | sent | bought after send | conversion | holdout | bought | conversion "
        "| lift |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {row.step_id} | {row.sent_members} | {row.sent_conversions} "
        f"| {_percent(row.sent_conversion_rate)} | {row.holdout_members} "
        f"| {row.holdout_conversions} | {_percent(row.holdout_conversion_rate)} "
        f"| {_points(row.lift_points)} |"
        for row in lift.itertuples(index=False)
    ]
    window = lift["window_days"].iloc[0] if len(lift) else CONVERSION_WINDOW.days
    note = f"Conversions: paid orders within {window:g} days after the send or the holdout."
    return "\n".join([header, *lines]) + "\n\n" + note


def _percent(rate: float) -> str:
    return "–" if pd.isna(rate) else f"{rate * 100:.1f}%"


def _points(points: float) -> str:
    return "–" if pd.isna(points) else f"{points:+.1f} pts"
