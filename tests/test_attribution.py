"""Order attribution rules on hand-built orders of a 20:00-21:00 broadcast in Tokyo."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from livecrm_dagster.defs.attribution.attribute import Broadcast, attribute_orders
from livecrm_dagster.defs.ingestion.files import FILE, LINE
from livecrm_dagster.defs.ingestion.orders import net_order_lines, validate_orders
from livecrm_dagster.defs.reporting.summary import broadcast_kpis

TOKYO = ZoneInfo("Asia/Tokyo")
B1 = Broadcast(
    "b1",
    pd.Timestamp("2024-06-10T20:00:00+09:00").tz_convert("UTC"),
    pd.Timestamp("2024-06-10T21:00:00+09:00").tz_convert("UTC"),
)
B2 = Broadcast(
    "b2",
    pd.Timestamp("2024-06-12T20:00:00+09:00").tz_convert("UTC"),
    pd.Timestamp("2024-06-12T21:00:00+09:00").tz_convert("UTC"),
)
NO_CLICKS = pd.DataFrame(columns=["member_id", "product_id", "occurred_at"])
NO_OTHER_VIEWING = pd.DataFrame(columns=["member_id", "broadcast_id", "starts_at"])


def _line(
    order_id,
    paid_at,
    member_id="m1",
    product_id="P-1",
    quantity=1,
    unit_price=1000,
    status="paid",
    refund_of="",
    file="export-1.csv",
):
    return {
        "order_id": order_id,
        "member_id": member_id,
        "ordered_at": paid_at,
        "paid_at": paid_at,
        "status": status,
        "product_id": product_id,
        "quantity": str(quantity),
        "unit_price": str(unit_price),
        "refund_of": refund_of,
        FILE: file,
    }


def _netted(rows: list[dict]) -> pd.DataFrame:
    """Validate order rows as the export reader returns them and net them as raw_orders does."""
    frame = pd.DataFrame(rows)
    frame[LINE] = range(2, len(frame) + 2)
    batch = validate_orders(frame)
    assert batch.quarantine.empty, batch.quarantine["reason"].tolist()
    return net_order_lines(batch.lines, batch.lines)


def _attribute(
    rows,
    broadcast=B1,
    viewers=("m1",),
    clicks=NO_CLICKS,
    other=NO_OTHER_VIEWING,
    post_live_days=7.0,
    clicked_then_bought_days=7.0,
) -> pd.DataFrame:
    result = attribute_orders(
        broadcast,
        _netted(rows),
        pd.Index(list(viewers)),
        clicks,
        other,
        post_live_days,
        clicked_then_bought_days,
        TOKYO,
    )
    return result.set_index("order_id")


@pytest.mark.parametrize(
    ("paid_at", "during_live", "post_live"),
    [
        # Exactly at the start counts as during the live.
        ("2024-06-10T20:00:00+09:00", True, False),
        # The same instant written in UTC.
        ("2024-06-10T11:00:00Z", True, False),
        # Exactly at the end still counts as during the live.
        ("2024-06-10T21:00:00+09:00", True, False),
        # One second after the end is post-live only.
        ("2024-06-10T21:00:01+09:00", False, True),
        # Seven days after the end is the last post-live second.
        ("2024-06-17T21:00:00+09:00", False, True),
    ],
)
def test_paid_at_decides_the_window(paid_at, during_live, post_live):
    order = _attribute([_line("o1", paid_at)]).loc["o1"]
    assert bool(order["during_live"]) is during_live
    assert bool(order["post_live"]) is post_live


@pytest.mark.parametrize(
    "paid_at",
    [
        # One second before the start.
        "2024-06-10T19:59:59+09:00",
        # Seven days and one second after the end, with no click.
        "2024-06-17T21:00:01+09:00",
    ],
)
def test_paid_outside_windows_is_not_attributed(paid_at):
    assert _attribute([_line("o1", paid_at)]).empty


@pytest.mark.parametrize(
    ("paid_at", "same_night"),
    [
        # 23:59:59 in Tokyo is still the night of the broadcast.
        ("2024-06-10T23:59:59+09:00", True),
        # Half a second before midnight in Tokyo is still the same night.
        ("2024-06-10T23:59:59.500+09:00", True),
        # Midnight in Tokyo is the next day.
        ("2024-06-11T00:00:00+09:00", False),
        # 00:30 in Tokyo is 15:30 UTC on the broadcast's UTC day, but a later shop day.
        ("2024-06-10T15:30:00Z", False),
        # The next evening is post-live but not the same night.
        ("2024-06-11T20:30:00+09:00", False),
    ],
)
def test_same_night_uses_shop_time(paid_at, same_night):
    order = _attribute([_line("o1", paid_at)]).loc["o1"]
    assert bool(order["post_live"])
    assert bool(order["same_night"]) is same_night


def test_same_night_after_midnight_broadcast():
    # A broadcast ending at 00:30 on 11 June: same night runs until 23:59:59 on 11 June.
    late = Broadcast(
        "late",
        pd.Timestamp("2024-06-10T23:30:00+09:00").tz_convert("UTC"),
        pd.Timestamp("2024-06-11T00:30:00+09:00").tz_convert("UTC"),
    )
    result = _attribute(
        [_line("o1", "2024-06-11T23:00:00+09:00"), _line("o2", "2024-06-12T00:10:00+09:00")],
        broadcast=late,
    )
    assert bool(result.loc["o1", "same_night"])
    assert not bool(result.loc["o2", "same_night"])


def test_during_live_is_not_same_night():
    order = _attribute([_line("o1", "2024-06-10T20:30:00+09:00")]).loc["o1"]
    assert not bool(order["same_night"])


def _clicks(*rows: tuple[str, str, str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["member_id", "product_id", "occurred_at"])
    frame["occurred_at"] = pd.to_datetime(frame["occurred_at"], utc=True)
    return frame


@pytest.mark.parametrize(
    ("click", "paid_at", "clicked_then_bought"),
    [
        # Clicked P-1 during the live, paid for it two days later.
        (("m1", "P-1", "2024-06-10T20:10:00+09:00"), "2024-06-12T12:00:00+09:00", True),
        # Clicked at the very instant of payment.
        (("m1", "P-1", "2024-06-12T12:00:00+09:00"), "2024-06-12T12:00:00+09:00", True),
        # Clicked after paying does not count.
        (("m1", "P-1", "2024-06-12T12:00:01+09:00"), "2024-06-12T12:00:00+09:00", False),
        # Clicked another product than the one bought.
        (("m1", "P-2", "2024-06-10T20:10:00+09:00"), "2024-06-12T12:00:00+09:00", False),
        # Another member clicked the product.
        (("m2", "P-1", "2024-06-10T20:10:00+09:00"), "2024-06-12T12:00:00+09:00", False),
        # Paid eight days after the click, beyond the seven-day window.
        (("m1", "P-1", "2024-06-10T20:10:00+09:00"), "2024-06-18T20:10:01+09:00", False),
    ],
)
def test_clicked_then_bought_needs_click_first(click, paid_at, clicked_then_bought):
    # Post-live is off so the order is attributed by the click rule alone.
    result = _attribute(
        [_line("o1", paid_at)],
        clicks=_clicks(click),
        viewers=("m1", "m2"),
        post_live_days=0.0,
        clicked_then_bought_days=7.0,
    )
    assert ("o1" in result.index) is clicked_then_bought
    if clicked_then_bought:
        assert bool(result.loc["o1", "clicked_then_bought"])


def test_click_after_paying_during_live():
    result = _attribute(
        [_line("o1", "2024-06-10T20:05:00+09:00")],
        clicks=_clicks(("m1", "P-1", "2024-06-10T20:10:00+09:00")),
    )
    assert bool(result.loc["o1", "during_live"])
    assert not bool(result.loc["o1", "clicked_then_bought"])


def test_later_cancellation_nets_to_zero():
    paid_at = "2024-06-10T20:20:00+09:00"
    result = _attribute(
        [
            _line("o1", paid_at, quantity=2, unit_price=1500, file="export-1.csv"),
            _line(
                "o1", paid_at, quantity=2, unit_price=1500, status="cancelled", file="export-2.csv"
            ),
        ]
    )
    assert len(result) == 1
    assert result.loc["o1", "status"] == "cancelled"
    assert result.loc["o1", "gross_amount"] == 3000
    assert result.loc["o1", "net_amount"] == 0
    assert result.loc["o1", "net_items"] == 0


def test_cancellation_listed_first_still_wins():
    paid_at = "2024-06-10T20:20:00+09:00"
    result = _attribute(
        [
            _line("o1", paid_at, status="cancelled", file="export-1.csv"),
            _line("o1", paid_at, file="export-2.csv"),
        ]
    )
    assert result.loc["o1", "status"] == "cancelled"
    assert result.loc["o1", "net_amount"] == 0


def test_credit_note_nets_part_of_order():
    paid_at = "2024-06-10T20:20:00+09:00"
    rows = [
        _line("o1", paid_at, product_id="P-1", quantity=2, unit_price=1500),
        _line("o1", paid_at, product_id="P-2", quantity=1, unit_price=1000),
        # Credit note cn1 refunds one P-1 of o1 on the next day.
        _line(
            "cn1",
            "2024-06-11T10:00:00+09:00",
            product_id="P-1",
            quantity=1,
            unit_price=1500,
            status="refunded",
            refund_of="o1",
        ),
    ]
    result = _attribute(rows)
    assert result.index.tolist() == ["o1"]
    assert result.loc["o1", "gross_amount"] == 4000
    assert result.loc["o1", "net_amount"] == 2500
    assert result.loc["o1", "net_items"] == 2
    assert result.loc["o1", "status"] == "paid"


def test_credit_note_for_all_units_drops_product():
    paid_at = "2024-06-10T20:20:00+09:00"
    rows = [
        _line("o1", paid_at, product_id="P-1", quantity=1, unit_price=1500),
        _line("o1", paid_at, product_id="P-2", quantity=1, unit_price=1000),
        _line(
            "cn1",
            "2024-06-11T10:00:00+09:00",
            product_id="P-1",
            quantity=1,
            unit_price=1500,
            status="refunded",
            refund_of="o1",
        ),
    ]
    result = _attribute(rows)
    assert result.loc["o1", "net_amount"] == 1000
    assert result.loc["o1", "product_ids"] == "P-2"


def test_guest_order_is_ignored():
    result = _attribute(
        [
            _line("o1", "2024-06-10T20:20:00+09:00", member_id=""),
            _line("o2", "2024-06-10T20:20:00+09:00", member_id="m1"),
        ]
    )
    assert result.index.tolist() == ["o2"]


def test_non_viewer_order_is_ignored():
    result = _attribute([_line("o1", "2024-06-10T20:20:00+09:00", member_id="m9")])
    assert result.empty


def _watched_b1() -> pd.DataFrame:
    return pd.DataFrame({"member_id": ["m1"], "broadcast_id": ["b1"], "starts_at": [B1.starts_at]})


def _watched_b2() -> pd.DataFrame:
    return pd.DataFrame({"member_id": ["m1"], "broadcast_id": ["b2"], "starts_at": [B2.starts_at]})


def test_order_counts_for_later_broadcast():
    # m1 watched b1 (10 June) and b2 (12 June) and paid once during b2.
    rows = [_line("o1", "2024-06-12T20:30:00+09:00")]
    from_b1 = _attribute(rows, broadcast=B1, other=_watched_b2()).loc["o1"]
    from_b2 = _attribute(rows, broadcast=B2, other=_watched_b1()).loc["o1"]
    assert bool(from_b1["post_live"])
    assert from_b1["claimed_by"] == "b2"
    assert not bool(from_b1["counted"])
    assert bool(from_b2["during_live"])
    assert from_b2["claimed_by"] == "b2"
    assert bool(from_b2["counted"])


def test_order_before_later_broadcast_stays():
    # m1 paid on 11 June, before b2 started, so b1 keeps the order.
    rows = [_line("o1", "2024-06-11T12:00:00+09:00")]
    order = _attribute(rows, broadcast=B1, other=_watched_b2()).loc["o1"]
    assert order["claimed_by"] == "b1"
    assert bool(order["counted"])


def test_large_yen_amounts_sum_exactly():
    # 800 × ¥2,980,000 = ¥2,384,000,000, above 2**31, plus ¥500,000.
    paid_at = "2024-06-10T20:30:00+09:00"
    rows = [
        _line("o1001", paid_at, quantity=800, unit_price=2_980_000),
        _line("o1002", paid_at, member_id="m2", unit_price=500_000),
    ]
    attribution = _attribute(rows, viewers=("m1", "m2"))
    assert attribution.loc["o1001", "net_amount"] == 2_384_000_000
    assert attribution["net_amount"].dtype == "int64"
    summary = pd.DataFrame(
        {
            "member_id": ["m1", "m2"],
            "bought_during_live": [True, True],
            "viewing_rate": [0.5, 0.5],
            "watched_seconds": [1800.0, 1800.0],
            "chats": [0, 0],
            "likes": [0, 0],
            "clicks": [0, 0],
        }
    )
    kpis = broadcast_kpis(summary, attribution.reset_index(), anonymous_viewers=0)
    assert kpis["revenue_during_live"] == 2_384_500_000
    assert isinstance(kpis["revenue_during_live"], int)


def test_amount_beyond_int64_is_rejected():
    frame = pd.DataFrame([_line("o1", "2024-06-10T20:30:00+09:00", unit_price=2**63)])
    batch = validate_orders(frame)
    assert batch.lines.empty
    assert batch.quarantine["reason"].tolist() == ["unit_price is out of range"]
