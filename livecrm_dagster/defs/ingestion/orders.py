"""Validate order lines, merge repeated exports, and net credit notes into their orders."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from livecrm_dagster.defs.ingestion.contract import (
    ORDER_STATUSES,
    STATUS_RANK,
    RowChecker,
    identifiers,
    parse_instants,
    parse_integers,
    quarantine_frame,
    text,
)
from livecrm_dagster.defs.ingestion.files import FILE, LINE

ORDER_LINE_COLUMNS = [
    "order_id",
    "line_no",
    "member_id",
    "ordered_at",
    "paid_at",
    "status",
    "product_id",
    "quantity",
    "unit_price",
    "refund_of",
]
# The fields that must agree when one order line arrives in several exports; the
# status and paid_at may move on between exports.
_LINE_PAYLOAD = ["member_id", "product_id", "quantity", "unit_price", "refund_of"]
# The largest quantity and the largest quantity × unit_price of one line. A line beyond
# it is a data error (10^15 yen is far beyond any shop's revenue), and the cap keeps sums
# of line amounts within int64.
MAX_LINE_AMOUNT = 10**15


@dataclass(frozen=True)
class OrderBatch:
    lines: pd.DataFrame
    quarantine: pd.DataFrame
    duplicates_dropped: int
    rows_read: int


def validate_orders(rows: pd.DataFrame, zone: str | None = None) -> OrderBatch:
    """Validate order lines and resolve each order's status across exports.

    The returned lines carry the order's resolved status, the earliest `ordered_at`
    and `paid_at` any export reports, and `line_no` (numbered in file order within an
    order where the source has none).
    """
    rows = rows.reset_index(drop=True)
    checker = RowChecker(rows, "orders", "order_id")
    checker.require("order_id", "ordered_at", "status", "product_id", "quantity", "unit_price")
    status = text(rows, "status").str.lower()
    checker.flag(~status.isin(ORDER_STATUSES), "status", "unknown order status: " + status)
    ordered_at, reasons = parse_instants(text(rows, "ordered_at"), "ordered_at", zone)
    checker.flag(reasons.notna(), "ordered_at", reasons)
    paid_at, reasons = parse_instants(text(rows, "paid_at"), "paid_at", zone)
    checker.flag(reasons.notna(), "paid_at", reasons)
    checker.flag(
        (status == "paid") & paid_at.isna(), "paid_at", "paid_at is missing on a paid order"
    )
    checker.flag(paid_at < ordered_at, "paid_at", "paid_at is before ordered_at")
    quantity, reasons = parse_integers(text(rows, "quantity"), "quantity")
    checker.flag(reasons.notna(), "quantity", reasons)
    checker.flag(quantity < 1, "quantity", "quantity is below 1")
    unit_price, reasons = parse_integers(text(rows, "unit_price"), "unit_price")
    checker.flag(reasons.notna(), "unit_price", reasons)
    checker.flag(unit_price < 0, "unit_price", "unit_price is negative")
    checker.flag(
        quantity > MAX_LINE_AMOUNT,
        "quantity",
        f"quantity is above the maximum of {MAX_LINE_AMOUNT:,}",
    )
    # Python integers, so the product itself cannot overflow.
    amount = pd.Series(
        [
            int(count) * int(price) if pd.notna(count) and pd.notna(price) else 0
            for count, price in zip(quantity, unit_price, strict=True)
        ],
        index=rows.index,
        dtype=object,
    )
    checker.flag(
        amount > MAX_LINE_AMOUNT,
        "unit_price",
        f"quantity × unit_price is above the maximum line amount of {MAX_LINE_AMOUNT:,}",
    )
    line_no, reasons = parse_integers(text(rows, "line_no"), "line_no")
    checker.flag(reasons.notna() | (line_no < 1), "line_no", "line_no is not a positive number")
    refund_of = identifiers(rows, "refund_of")
    checker.flag(
        (refund_of != "") & (status != "refunded"),
        "refund_of",
        "a credit note (refund_of set) must have status refunded",
    )

    lines = pd.DataFrame(
        {
            "order_id": identifiers(rows, "order_id"),
            "line_no": line_no,
            "member_id": identifiers(rows, "member_id"),
            "ordered_at": ordered_at,
            "paid_at": paid_at,
            "status": status,
            "product_id": identifiers(rows, "product_id"),
            "quantity": quantity,
            "unit_price": unit_price,
            "refund_of": refund_of,
            FILE: text(rows, FILE),
            LINE: rows[LINE] if LINE in rows.columns else 0,
        }
    )
    numbered = lines.groupby([FILE, "order_id"], sort=False).cumcount() + 1
    lines["line_no"] = lines["line_no"].fillna(numbered.astype("Int64"))
    valid, quarantine = checker.split(lines)
    valid, conflicts, dropped, statuses = _merge_exports(valid)
    quarantine = pd.concat([quarantine, conflicts], ignore_index=True)
    valid = _resolve_orders(valid.drop(columns=[FILE, LINE]), statuses)
    return OrderBatch(valid, quarantine, dropped, len(rows))


def _merge_exports(
    lines: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame, int, pd.DataFrame]:
    """Keep one copy of each (order_id, line_no); quarantine copies that disagree.

    Also returns the status and times every agreeing copy reports, because status and
    payment time may differ between otherwise identical lines of two exports.
    """
    key = ["order_id", "line_no"]
    payload = lines[_LINE_PAYLOAD].astype(str)
    fingerprint = pd.util.hash_pandas_object(payload, index=False)
    first = fingerprint.groupby([lines[column] for column in key]).transform("first")
    repeat = lines.duplicated(key, keep=False) & lines.duplicated(key, keep="first")
    conflicting = repeat & (fingerprint != first)
    conflicts = quarantine_frame(
        "orders",
        lines.loc[conflicting],
        "order_id",
        "line_no",
        "conflicting duplicate: this order line was exported before with other values",
    )
    statuses = lines.loc[~conflicting, ["order_id", "status", "ordered_at", "paid_at"]]
    kept = lines.loc[~repeat].copy()
    return kept, conflicts, int((repeat & ~conflicting).sum()), statuses


def _resolve_orders(lines: pd.DataFrame, statuses: pd.DataFrame) -> pd.DataFrame:
    rank = statuses["status"].map(STATUS_RANK)
    furthest = statuses.assign(rank=rank).sort_values("rank", kind="stable")
    per_order = furthest.groupby("order_id").agg(
        status=("status", "last"),
        ordered_at=("ordered_at", "min"),
        paid_at=("paid_at", "min"),
    )
    lines = lines.drop(columns=["status", "ordered_at", "paid_at"]).join(per_order, on="order_id")
    return lines[ORDER_LINE_COLUMNS].sort_values(["order_id", "line_no"]).reset_index(drop=True)


def net_order_lines(lines: pd.DataFrame, credit_notes: pd.DataFrame) -> pd.DataFrame:
    """Add refunded and net quantities and the net amount to each sales order line.

    A cancelled or refunded order nets to zero. A credit note refunds units of a product
    of the order it names, so those units leave the earliest lines of that product. A
    refund larger than what was bought cannot take the net below zero.
    """
    sales = lines.loc[lines["refund_of"] == ""].copy()
    refunded = (
        credit_notes.loc[credit_notes["refund_of"] != ""]
        .groupby(["refund_of", "product_id"])["quantity"]
        .sum()
        .rename("refunded_total")
    )
    sales = sales.join(refunded, on=["order_id", "product_id"])
    sales["refunded_total"] = sales["refunded_total"].fillna(0).astype("int64")
    quantity = sales["quantity"].astype("int64")
    bought_before = quantity.groupby([sales["order_id"], sales["product_id"]]).cumsum() - quantity
    refunded_here = (sales["refunded_total"] - bought_before).clip(lower=0)
    sales["refunded_quantity"] = pd.concat([refunded_here, quantity], axis=1).min(axis=1)
    undone = sales["status"].isin(["cancelled", "refunded"])
    sales.loc[undone, "refunded_quantity"] = quantity[undone]
    sales["net_quantity"] = (quantity - sales["refunded_quantity"]).astype("int64")
    sales["net_amount"] = (sales["net_quantity"] * sales["unit_price"].astype("int64")).astype(
        "int64"
    )
    sales["refunded_quantity"] = sales["refunded_quantity"].astype("int64")
    return sales.drop(columns=["refunded_total"])
