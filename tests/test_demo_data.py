"""Tests of the demo source: the converted UCI order log and the simulated viewing."""

from __future__ import annotations

import json
import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from livecrm_dagster.demo.build import DEFAULT_SOURCE, build_demo_source
from livecrm_dagster.demo.simulator import (
    BROADCAST_ID_PATTERN,
    EVENT_COLUMNS,
    EVENT_TYPES,
    find_window_buyers,
    plan_broadcasts,
    simulate_viewer_events,
)
from livecrm_dagster.demo.uci_online_retail import (
    pounds_to_pence,
    read_invoice_lines,
    to_contract_members,
    to_contract_orders,
    to_contract_products,
)

SEED = 20111209
LONDON = ZoneInfo("Europe/London")
ISO_WITH_OFFSET = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:\d{2}|Z)")
VIEW_TYPES = ["view_start", "heartbeat", "view_end"]

pytestmark = pytest.mark.skipif(
    not DEFAULT_SOURCE.exists(), reason=f"UCI order log not found at {DEFAULT_SOURCE}"
)


@pytest.fixture(scope="module")
def lines() -> pd.DataFrame:
    return read_invoice_lines(DEFAULT_SOURCE)


@pytest.fixture(scope="module")
def orders(lines: pd.DataFrame) -> pd.DataFrame:
    return to_contract_orders(lines)


@pytest.fixture(scope="module")
def members(lines: pd.DataFrame) -> pd.DataFrame:
    return to_contract_members(lines, SEED)


@pytest.fixture(scope="module")
def products(lines: pd.DataFrame) -> pd.DataFrame:
    return to_contract_products(lines, SEED)


@pytest.fixture(scope="module")
def plan(orders: pd.DataFrame) -> pd.DataFrame:
    return plan_broadcasts(orders, 8, SEED)


@pytest.fixture(scope="module")
def events(plan, orders, members, products) -> dict[str, pd.DataFrame]:
    return {
        broadcast["broadcast_id"]: simulate_viewer_events(
            broadcast, orders, members, products, SEED
        )
        for broadcast in plan.to_dict("records")
    }


@pytest.fixture(scope="module")
def all_events(events: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(events.values(), ignore_index=True)


@pytest.fixture(scope="module")
def three_day_source(lines: pd.DataFrame, tmp_path_factory) -> Path:
    """The first three trading days of the log, small enough to build twice."""
    days = lines["InvoiceDate"].str[:10]
    path = tmp_path_factory.mktemp("uci") / "three_days.csv"
    lines[days <= "2010-12-03"].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def small_build(three_day_source: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    build_demo_source(out, broadcasts=1, seed=SEED, source=three_day_source)
    return out


def _pounds(unit_price: str) -> Decimal:
    """Read an output price back in pounds: whole pence, or the source string kept as is."""
    if re.fullmatch(r"-?\d+", unit_price):
        return Decimal(unit_price) / 100
    return Decimal(unit_price)


def _sessions(events: pd.DataFrame) -> pd.DataFrame:
    """Cut each device's viewing events into sessions at every view_start."""
    viewing = events[events["type"].isin(VIEW_TYPES)].drop_duplicates("event_id")
    viewing = viewing.assign(at=pd.to_datetime(viewing["occurred_at"], utc=True))
    viewing = viewing.sort_values(["device_id", "at"], kind="stable")
    number = (viewing["type"] == "view_start").groupby(viewing["device_id"]).cumsum()
    grouped = viewing.groupby([viewing["device_id"], number])
    return grouped.agg(member_id=("member_id", "first"), start=("at", "min"), last=("at", "max"))


def _utc_paid_times(orders: pd.DataFrame) -> pd.Series:
    naive = pd.to_datetime(orders["paid_at"], format="%Y-%m-%d %H:%M:%S")
    return naive.dt.tz_localize(LONDON).dt.tz_convert("UTC")


# --- Order log ------------------------------------------------------------------------


def test_order_log_maps_row_for_row(lines: pd.DataFrame, orders: pd.DataFrame) -> None:
    assert len(orders) == len(lines)
    assert (orders["order_id"] == lines["InvoiceNo"]).all()
    assert (orders["product_id"] == lines["StockCode"]).all()
    absolute = lines["Quantity"].str.removeprefix("-")
    assert (orders["quantity"].str.removeprefix("-") == absolute).all()
    assert (orders["ordered_at"] == lines["InvoiceDate"]).all()
    assert (orders["paid_at"] == lines["InvoiceDate"]).all()
    restored = orders["unit_price"].map(_pounds)
    assert (restored == lines["UnitPrice"].map(Decimal)).all()
    assert (orders["member_id"] == lines["CustomerID"].str.removesuffix(".0")).all()


def test_only_credit_notes_change_quantity(lines: pd.DataFrame, orders: pd.DataFrame) -> None:
    is_credit = lines["InvoiceNo"].str.startswith("C")
    assert (orders.loc[~is_credit, "quantity"] == lines.loc[~is_credit, "Quantity"]).all()
    assert (orders.loc[is_credit, "quantity"].astype(int) > 0).all()
    assert (orders.loc[is_credit, "status"] == "refunded").all()
    assert (orders.loc[~is_credit, "status"] == "paid").all()


def test_credit_note_links_earlier_invoice(lines: pd.DataFrame, orders: pd.DataFrame) -> None:
    linked = orders[orders["refund_of"] != ""]
    invoices = orders[~orders["order_id"].str.startswith("C")]
    targets = invoices.drop_duplicates("order_id").set_index("order_id")
    target_lines = set(zip(invoices["order_id"], invoices["product_id"], strict=True))

    # Of 8,905 credit-note lines with a customer, 7,599 match an earlier invoice.
    assert len(linked) == 7599
    assert linked["order_id"].str.startswith("C").all()
    assert linked["refund_of"].isin(targets.index).all()
    assert (linked["member_id"] == targets.loc[linked["refund_of"], "member_id"].to_numpy()).all()
    assert (linked["paid_at"] > targets.loc[linked["refund_of"], "paid_at"].to_numpy()).all()
    pairs = zip(linked["refund_of"], linked["product_id"], strict=True)
    assert all(pair in target_lines for pair in pairs)


def test_refund_picks_latest_earlier_invoice() -> None:
    lines = pd.DataFrame(
        {
            "InvoiceNo": ["500001", "500002", "500003", "C500004", "500005"],
            "StockCode": ["22423", "22423", "85123A", "22423", "22423"],
            "Description": ["CAKESTAND"] * 5,
            "Quantity": ["2", "1", "6", "-1", "4"],
            "InvoiceDate": [
                "2011-01-03 09:00:00",
                "2011-01-04 09:00:00",
                "2011-01-05 09:00:00",
                "2011-01-06 09:00:00",
                "2011-01-07 09:00:00",
            ],
            "UnitPrice": ["12.75"] * 5,
            "CustomerID": ["12346.0"] * 5,
            "Country": ["United Kingdom"] * 5,
        }
    )
    refund_of = to_contract_orders(lines)["refund_of"].tolist()
    assert refund_of == ["", "", "", "500002", ""]


@pytest.mark.parametrize(
    ("pounds", "pence"),
    [
        ("2.55", "255"),
        ("18.0", "1800"),
        ("0", "0"),
        ("-11062.06", "-1106206"),  # bad-debt adjustment, kept negative for the quarantine
        ("0.001", "0.001"),  # a tenth of a penny cannot be stored, so it stays for quarantine
        ("", ""),
    ],
)
def test_unit_price_converts_exactly(pounds: str, pence: str) -> None:
    assert pounds_to_pence(pounds) == pence


def test_stock_adjustments_pass_through(lines: pd.DataFrame, orders: pd.DataFrame) -> None:
    adjustment = lines["Quantity"].str.startswith("-") & ~lines["InvoiceNo"].str.startswith("C")
    assert adjustment.sum() == 1336
    assert (orders.loc[adjustment, "quantity"] == lines.loc[adjustment, "Quantity"]).all()
    assert (orders.loc[adjustment, "refund_of"] == "").all()


def test_line_numbers_restart_per_invoice(orders: pd.DataFrame) -> None:
    counts = orders.groupby("order_id")["line_no"].agg(["min", "max", "size"])
    assert (counts["min"] == 1).all()
    assert (counts["max"] == counts["size"]).all()


def test_member_ids_stay_strings(orders, members, small_build: Path) -> None:
    assert pd.api.types.is_string_dtype(orders["member_id"])
    assert orders["member_id"].str.fullmatch(r"\d{5}|").all()
    assert pd.api.types.is_string_dtype(members["member_id"])
    assert members["member_id"].str.fullmatch(r"\d{5}").all()
    rows = [
        json.loads(line)
        for path in sorted((small_build / "viewer_events").glob("*/*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]
    assert rows
    assert all(isinstance(row["member_id"], str) for row in rows)
    assert not any(row["member_id"].endswith(".0") for row in rows)


# --- Members and products ---------------------------------------------------------------


def test_members_cover_every_customer(lines: pd.DataFrame, members: pd.DataFrame) -> None:
    customers = set(lines.loc[lines["CustomerID"] != "", "CustomerID"].str.removesuffix(".0"))
    assert set(members["member_id"]) == customers
    assert members["member_id"].is_unique
    assert members["age"].between(18, 79).all()
    assert members["line_user_id"].str.fullmatch(r"U[0-9a-f]{32}").all()
    assert members["email"].str.endswith("@example.invalid").all()
    unsubscribed = members.loc[members["unsubscribed_at"] != "", "unsubscribed_at"]
    assert unsubscribed.str.fullmatch(ISO_WITH_OFFSET).all()


def test_products_cover_every_stock_code(lines: pd.DataFrame, products: pd.DataFrame) -> None:
    assert set(products["product_id"]) == set(lines["StockCode"])
    assert products["product_id"].is_unique
    is_product = products["category"] != "non-product"
    low = products["stock"] < products["low_stock_threshold"]
    assert 0.07 < low[is_product].mean() < 0.13
    assert set(products.loc[~is_product, "product_id"]) >= {"POST", "DOT", "M", "AMAZONFEE"}
    trials = products.loc[products["trial_product_id"] != "", "trial_product_id"]
    assert trials.isin(products["product_id"]).all()


def test_product_category_follows_description(products: pd.DataFrame) -> None:
    category = products.set_index("product_id")["category"]
    assert category["85123A"] == "candles-and-lights"  # WHITE HANGING HEART T-LIGHT HOLDER
    assert category["POST"] == "non-product"
    assert category["gift_0001_20"] == "non-product"


# --- Broadcast plan -----------------------------------------------------------------------


def test_broadcasts_run_weekday_lunchtimes(plan: pd.DataFrame) -> None:
    starts = [datetime.fromisoformat(value) for value in plan["starts_at"]]
    assert len(plan) == 8
    assert all(start.astimezone(LONDON).hour == 12 for start in starts)
    assert all(start.astimezone(LONDON).minute == 0 for start in starts)
    assert all(start.weekday() < 5 for start in starts)
    assert plan["broadcast_id"].str.fullmatch(BROADCAST_ID_PATTERN).all()


def test_broadcast_offsets_follow_summer_time(plan: pd.DataFrame) -> None:
    for value in pd.concat([plan["starts_at"], plan["ends_at"]]):
        moment = datetime.fromisoformat(value)
        expected = moment.replace(tzinfo=None).replace(tzinfo=LONDON).utcoffset()
        assert moment.utcoffset() == expected, value
    offsets = set(plan["starts_at"].str[-6:])
    assert offsets == {"+00:00", "+01:00"}


def test_broadcasts_chain_to_next(plan: pd.DataFrame) -> None:
    assert plan["next_broadcast_id"].iloc[:-1].tolist() == plan["broadcast_id"].iloc[1:].tolist()
    assert plan["next_broadcast_at"].iloc[:-1].tolist() == plan["starts_at"].iloc[1:].tolist()
    assert plan["next_broadcast_id"].iloc[-1] == ""


def test_featured_products_are_real(plan: pd.DataFrame, orders: pd.DataFrame) -> None:
    featured = [product for ids in plan["featured_product_ids"] for product in ids]
    assert len(featured) == 4 * len(plan)
    assert set(featured) <= set(orders["product_id"])


# --- Simulated viewer events ----------------------------------------------------------------


def test_simulator_is_deterministic_for_seed(plan, orders, members, products) -> None:
    broadcast = plan.iloc[0].to_dict()
    first = simulate_viewer_events(broadcast, orders, members, products, SEED)
    again = simulate_viewer_events(broadcast, orders, members, products, SEED)
    other = simulate_viewer_events(broadcast, orders, members, products, SEED + 1)
    pd.testing.assert_frame_equal(first, again)
    assert not first.equals(other)


def test_build_writes_identical_files(three_day_source: Path, small_build: Path, tmp_path) -> None:
    build_demo_source(tmp_path, broadcasts=1, seed=SEED, source=three_day_source)
    expected = sorted(p.relative_to(small_build) for p in small_build.rglob("*") if p.is_file())
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written == expected
    for relative in expected:
        assert (tmp_path / relative).read_bytes() == (small_build / relative).read_bytes()


def test_events_satisfy_contract(all_events: pd.DataFrame, plan: pd.DataFrame) -> None:
    assert list(all_events.columns) == EVENT_COLUMNS
    assert all_events["occurred_at"].str.fullmatch(ISO_WITH_OFFSET).all()
    assert all_events["type"].isin(EVENT_TYPES).all()
    assert all_events["broadcast_id"].str.fullmatch(BROADCAST_ID_PATTERN).all()
    assert all_events["broadcast_id"].isin(plan["broadcast_id"]).all()
    assert (all_events["device_id"] != "").all()
    by_type = all_events.groupby("type")
    assert (by_type.get_group("product_click")["product_id"] != "").all()
    assert (by_type.get_group("answer")["question_id"] != "").all()
    assert (by_type.get_group("answer")["answer"] != "").all()
    assert (by_type.get_group("coupon_claim")["coupon_code"] != "").all()


def test_repeated_events_have_identical_payload(all_events: pd.DataFrame) -> None:
    repeated = all_events[all_events["event_id"].duplicated(keep=False)]
    share = all_events["event_id"].duplicated().mean()
    assert 0.002 < share < 0.01
    assert len(repeated.astype(str).drop_duplicates()) == repeated["event_id"].nunique()


def test_member_viewers_per_broadcast(events: dict[str, pd.DataFrame]) -> None:
    for broadcast_id, frame in events.items():
        viewers = frame.loc[frame["member_id"] != "", "member_id"].nunique()
        assert 250 <= viewers <= 400, broadcast_id


def test_live_buyers_watch_at_paid_time(events, orders, plan) -> None:
    checked = 0
    for broadcast in plan.to_dict("records"):
        frame = events[broadcast["broadcast_id"]]
        start_ms = int(datetime.fromisoformat(broadcast["starts_at"]).timestamp() * 1000)
        buyers = find_window_buyers(orders, start_ms)
        during = buyers.loc[buyers["during"], "member_id"]
        viewing = during[during.isin(frame["member_id"])]
        sessions = _sessions(frame[frame["member_id"].isin(viewing)])
        paid = orders[orders["member_id"].isin(viewing) & (orders["status"] == "paid")]
        paid_at = _utc_paid_times(paid)
        starts_at = pd.Timestamp(broadcast["starts_at"]).tz_convert("UTC")
        ends_at = pd.Timestamp(broadcast["ends_at"]).tz_convert("UTC")
        live = paid[(paid_at >= starts_at) & (paid_at <= ends_at)]
        for member_id, moment in zip(live["member_id"], _utc_paid_times(live), strict=True):
            own = sessions[sessions["member_id"] == member_id]
            covered = (own["start"] <= moment) & (own["last"] >= moment)
            assert covered.any(), f"{member_id} paid at {moment} outside every session"
            checked += 1
    assert checked > 0


def test_live_buyers_click_before_paying(events, orders, plan) -> None:
    for broadcast in plan.to_dict("records"):
        frame = events[broadcast["broadcast_id"]]
        start_ms = int(datetime.fromisoformat(broadcast["starts_at"]).timestamp() * 1000)
        buyers = find_window_buyers(orders, start_ms)
        during = buyers[buyers["during"] & buyers["member_id"].isin(frame["member_id"])]
        clicks = frame[frame["type"] == "product_click"]
        for buyer in during.itertuples(index=False):
            own = clicks[clicks["member_id"] == buyer.member_id]
            assert own["product_id"].isin(buyer.products).any(), buyer.member_id
