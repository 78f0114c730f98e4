"""Validate the reference inputs: the broadcast schedule, members and products."""

from __future__ import annotations

import pandas as pd

from livecrm_dagster.defs.ingestion.contract import (
    RowChecker,
    identifiers,
    invalid_broadcast_id_reason,
    parse_booleans,
    parse_instants,
    parse_integers,
    text,
    url_reasons,
)
from livecrm_dagster.defs.ingestion.files import FILE

BROADCAST_COLUMNS = [
    "broadcast_id",
    "title",
    "starts_at",
    "ends_at",
    "featured_product_ids",
    "archive_url",
    "next_broadcast_id",
    "next_broadcast_at",
    "ad_spend",
]
MEMBER_COLUMNS = [
    "member_id",
    "birth_date",
    "age",
    "gender",
    "email",
    "line_user_id",
    "consent_email",
    "consent_line",
    "consent_webhook",
    "unsubscribed_at",
]
PRODUCT_COLUMNS = [
    "product_id",
    "name",
    "category",
    "stock",
    "low_stock_threshold",
    "detail_url",
    "reviews_url",
    "trial_product_id",
]


def validate_broadcasts(
    rows: pd.DataFrame, zone: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate the schedule; an ID listed twice with the same values counts once.

    A broadcast listed again in a later file (in name order) takes that file's values,
    so an operator corrects a schedule by dropping a new file. An ID listed with two
    different schedules in the same file is quarantined in every copy, because neither
    start time can be trusted to be the right one.
    """
    rows = rows.reset_index(drop=True)
    checker = RowChecker(rows, "broadcasts", "broadcast_id")
    checker.require("broadcast_id", "starts_at", "ends_at")
    broadcast_id = text(rows, "broadcast_id")
    reasons = broadcast_id.map(invalid_broadcast_id_reason)
    checker.flag(reasons.notna() & (broadcast_id != ""), "broadcast_id", reasons)
    starts_at, reasons = parse_instants(text(rows, "starts_at"), "starts_at", zone)
    checker.flag(reasons.notna(), "starts_at", reasons)
    ends_at, reasons = parse_instants(text(rows, "ends_at"), "ends_at", zone)
    checker.flag(reasons.notna(), "ends_at", reasons)
    checker.flag(ends_at <= starts_at, "ends_at", "ends_at is not after starts_at")
    next_at, reasons = parse_instants(text(rows, "next_broadcast_at"), "next_broadcast_at", zone)
    checker.flag(reasons.notna(), "next_broadcast_at", reasons)
    ad_spend, reasons = parse_integers(text(rows, "ad_spend"), "ad_spend")
    checker.flag(reasons.notna(), "ad_spend", reasons)
    reasons = url_reasons(text(rows, "archive_url"), "archive_url")
    checker.flag(reasons.notna(), "archive_url", reasons)

    schedule = pd.DataFrame({column: text(rows, column) for column in BROADCAST_COLUMNS})
    schedule["featured_product_ids"] = identifiers(rows, "featured_product_ids")
    schedule["starts_at"] = starts_at
    schedule["ends_at"] = ends_at
    schedule["next_broadcast_at"] = next_at
    schedule["ad_spend"] = ad_spend
    # Files arrive in name order; a broadcast's row in a later file is a correction.
    file_rank = pd.Series(pd.factorize(text(rows, FILE))[0], index=rows.index)
    usable = ~checker.bad
    latest = file_rank[usable].groupby(broadcast_id[usable]).transform("max")
    in_latest = usable & (file_rank == latest.reindex(rows.index))
    current = schedule.loc[in_latest]
    fingerprint = pd.util.hash_pandas_object(current.astype(str), index=False)
    variants = fingerprint.groupby(current["broadcast_id"]).transform("nunique")
    clashing = variants.reindex(schedule.index, fill_value=1) > 1
    checker.flag(clashing, "broadcast_id", "broadcast_id is listed twice with different values")
    valid, quarantine = checker.split(schedule)
    # Earlier deliveries of a corrected broadcast, and repeats of the same row, drop out.
    valid = valid.loc[in_latest[valid.index]].drop_duplicates("broadcast_id", keep="first")
    return valid.sort_values("starts_at").reset_index(drop=True), quarantine


def validate_members(rows: pd.DataFrame, zone: str | None = None):
    rows = rows.reset_index(drop=True)
    checker = RowChecker(rows, "members", "member_id")
    checker.require("member_id")
    member_id = identifiers(rows, "member_id")
    checker.flag(
        member_id.duplicated(keep="first") & (member_id != ""),
        "member_id",
        "member_id is listed twice",
    )
    members = pd.DataFrame({column: text(rows, column) for column in MEMBER_COLUMNS})
    members["member_id"] = member_id
    age, reasons = parse_integers(text(rows, "age"), "age")
    checker.flag(reasons.notna() | (age < 0) | (age > 130), "age", "age is not between 0 and 130")
    members["age"] = age
    # An exact format, because free inference reads 06/10/1990 month first and fails on
    # a mix of dates with and without an offset.
    birth = pd.to_datetime(
        text(rows, "birth_date").replace("", None), format="%Y-%m-%d", errors="coerce"
    )
    checker.flag(
        (text(rows, "birth_date") != "") & birth.isna(),
        "birth_date",
        "birth_date is not a date (YYYY-MM-DD)",
    )
    for channel in ("consent_email", "consent_line", "consent_webhook"):
        consent, reasons = parse_booleans(text(rows, channel), channel)
        checker.flag(reasons.notna(), channel, reasons)
        members[channel] = consent.fillna(False)
    unsubscribed_at, reasons = parse_instants(
        text(rows, "unsubscribed_at"), "unsubscribed_at", zone
    )
    checker.flag(reasons.notna(), "unsubscribed_at", reasons)
    members["unsubscribed_at"] = unsubscribed_at
    members["birth_date"] = birth.dt.strftime("%Y-%m-%d").where(birth.notna(), None)
    return checker.split(members)


def validate_products(rows: pd.DataFrame):
    rows = rows.reset_index(drop=True)
    checker = RowChecker(rows, "products", "product_id")
    checker.require("product_id")
    product_id = identifiers(rows, "product_id")
    checker.flag(
        product_id.duplicated(keep="first") & (product_id != ""),
        "product_id",
        "product_id is listed twice",
    )
    products = pd.DataFrame({column: text(rows, column) for column in PRODUCT_COLUMNS})
    products["product_id"] = product_id
    products["trial_product_id"] = identifiers(rows, "trial_product_id")
    for column in ("stock", "low_stock_threshold"):
        numbers, reasons = parse_integers(text(rows, column), column)
        checker.flag(reasons.notna(), column, reasons)
        products[column] = numbers
    for column in ("detail_url", "reviews_url"):
        reasons = url_reasons(text(rows, column), column)
        checker.flag(reasons.notna(), column, reasons)
    return checker.split(products)
