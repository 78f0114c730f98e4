"""The follow-up audience: each viewing member's segments for the follow-up scenarios.

Buyers are members with a counted order of positive net amount attributed to this
broadcast (during the live or after it). Among the other viewing members:

- hot: viewing rate >= hot_rate and at least hot_min_chats chat messages;
- mid: mid_rate <= rate < hot_rate, and also rate >= hot_rate without enough chats;
- low: rate < mid_rate;
- coupon: every non-buyer with rate >= coupon_rate, chat or not (a hot member is in both
  segments; the sending side messages a member once per offer);
- clicked_not_bought: any viewing member who clicked products they did not buy, with
  those products;
- survey: one row per survey answer (answers without a correct/incorrect mark).
"""

from __future__ import annotations

import pandas as pd

SEGMENTS = ("hot", "mid", "low", "coupon", "clicked_not_bought", "survey", "buyer")
AUDIENCE_COLUMNS = [
    "segment",
    "member_id",
    "viewing_rate",
    "watched_seconds",
    "chats",
    "product_ids",
    "question_id",
    "answer",
]


def followup_audience(
    summary: pd.DataFrame,
    attribution: pd.DataFrame,
    events: pd.DataFrame,
    hot_rate: float,
    mid_rate: float,
    hot_min_chats: int,
    coupon_rate: float,
) -> pd.DataFrame:
    """Return one row per (segment, member, survey question) of a broadcast."""
    counted = attribution.loc[attribution["counted"].astype(bool) & (attribution["net_amount"] > 0)]
    buyer = summary["member_id"].isin(counted["member_id"])
    rate = summary["viewing_rate"]
    chatted = summary["chats"] >= hot_min_chats
    masks = {
        "hot": ~buyer & (rate >= hot_rate) & chatted,
        "mid": ~buyer & (rate >= mid_rate) & ~((rate >= hot_rate) & chatted),
        "low": ~buyer & (rate < mid_rate),
        "coupon": ~buyer & (rate >= coupon_rate),
        "buyer": buyer,
    }
    parts = [summary.loc[mask].assign(segment=name) for name, mask in masks.items()]

    bought = counted.groupby("member_id")["product_ids"].agg(
        lambda ids: set(";".join(ids).split(";"))
    )
    clicked = summary.set_index("member_id")["clicked_product_ids"]
    not_bought = {
        member: sorted(set(ids.split(";")) - bought.get(member, set()))
        for member, ids in clicked.items()
        if ids
    }
    not_bought = {member: ids for member, ids in not_bought.items() if ids}
    clickers = summary.loc[summary["member_id"].isin(list(not_bought))].copy()
    clickers["product_ids"] = clickers["member_id"].map(lambda m: ";".join(not_bought[m]))
    parts.append(clickers.assign(segment="clicked_not_bought"))

    answers = events.loc[
        (events["type"] == "answer")
        & events["is_correct"].isna()
        & events["member_id"].isin(summary["member_id"])
    ]
    answers = answers.sort_values("occurred_at").drop_duplicates(
        ["member_id", "question_id"], keep="last"
    )
    survey = answers[["member_id", "question_id", "answer"]].merge(summary, on="member_id")
    parts.append(survey.assign(segment="survey"))

    audience = pd.concat(parts, ignore_index=True)
    for column in ("product_ids", "question_id", "answer"):
        audience[column] = audience[column].fillna("") if column in audience else ""
    order = {name: rank for rank, name in enumerate(SEGMENTS)}
    audience = audience.sort_values(
        ["segment", "member_id", "question_id"],
        key=lambda s: s.map(order) if s.name == "segment" else s,
    )
    return audience[AUDIENCE_COLUMNS].reset_index(drop=True)
