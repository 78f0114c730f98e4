"""Send-time rules on frames built in memory: which rule decides a member, and the texts."""

import datetime as dt
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from livecrm_dagster.defs.followups import rules
from livecrm_dagster.defs.followups.plan import step_timing
from livecrm_dagster.defs.followups.scenarios import load_scenarios

ZONE = ZoneInfo("Asia/Tokyo")
ENDS = dt.datetime(2024, 6, 10, 9, 0, tzinfo=dt.UTC)
NOW = ENDS + dt.timedelta(days=1)
PRODUCTS = pd.DataFrame(
    {
        "product_id": ["P-1", "P-2"],
        "name": ["Serum", "Lotion"],
        "category": ["skincare", "skincare"],
        "stock": [3, 50],
        "low_stock_threshold": [5, 5],
        "detail_url": ["https://shop.example.test/p/P-1", "https://shop.example.test/p/P-2"],
        "reviews_url": ["", ""],
    }
).set_index("product_id")


def member_row(member_id: str, **overrides) -> dict:
    row = {
        "member_id": member_id,
        "email": f"{member_id}@example.test",
        "line_user_id": f"U{member_id}",
        "consent_email": True,
        "consent_line": True,
        "unsubscribed_at": pd.NaT,
    }
    row.update(overrides)
    return row


def step_inputs(step_id: str, members: list[dict], audience: list[dict], **changes):
    """Build the inputs of one step with the default scenarios and `changes` applied."""
    settings = load_scenarios()
    if "holdout_share" in changes:
        settings = settings.model_copy(update={"holdout_share": changes.pop("holdout_share")})
    step = settings.step(step_id)
    frame = pd.DataFrame(members)
    frame["unsubscribed_at"] = pd.to_datetime(frame["unsubscribed_at"], utc=True)
    fields = {
        "step": step,
        "settings": settings,
        "zone": ZONE,
        "now": NOW,
        "timing": step_timing(step, ENDS, settings, ZONE),
        "broadcast": {
            "broadcast_id": "b1",
            "title": "Live b1",
            "archive_url": "https://shop.example.test/archive/b1",
            "featured_product_ids": "P-2",
            "next_broadcast_at": None,
        },
        "shop_name": "Shop",
        "audience": pd.DataFrame(audience),
        "members": frame.set_index("member_id"),
        "products": PRODUCTS,
        "buyers": set(),
        "step_ledger": pd.DataFrame(),
        "channel_consent": "consent_email",
        "address_column": "email",
    }
    fields.update(changes)
    return rules.StepInputs(**fields)


def audience(segment: str, member_id: str, product_ids: str = "", answer: str = "") -> dict:
    return {
        "broadcast_id": "b1",
        "segment": segment,
        "member_id": member_id,
        "product_ids": product_ids,
        "answer": answer,
    }


# (member overrides, inputs changes, expected action, expected reason): each case matches
# the expected rule and every rule after it, so only the order of the rules decides.
PRECEDENCE = [
    # The offer comes first, even for a member the members table lacks.
    ({"member_id": "gone"}, {"offer_taken": {"m1"}}, "skipped", "duplicate_offer"),
    ({"member_id": "gone"}, {"buyers": {"m1"}}, "skipped", "unknown_member"),
    (
        {"unsubscribed_at": NOW, "consent_email": False},
        {"buyers": {"m1"}},
        "skipped",
        "unsubscribed",
    ),
    # A consent that is missing (None) counts as no consent.
    ({"consent_email": None, "email": " "}, {"buyers": {"m1"}}, "skipped", "no_consent"),
    ({"email": " "}, {"buyers": {"m1"}, "holdout_share": 1.0}, "skipped", "no_address"),
    ({}, {"buyers": {"m1"}, "holdout_share": 1.0}, "skipped", "bought_since_broadcast"),
    ({}, {"holdout_share": 1.0, "sent_today": {"m1": 1}}, "holdout", None),
    ({}, {"sent_today": {"m1": 1}}, "skipped", "frequency_cap"),
    ({}, {"outranked_by": {"m1": ("b2/hot_archive", False)}}, "skipped", "frequency_cap"),
    ({}, {"outranked_by": {"m1": ("b1/coupon", True)}}, "skipped", "duplicate_offer"),
    # An unsubscription after now does not count yet.
    ({"unsubscribed_at": NOW + dt.timedelta(seconds=1)}, {}, "send", None),
]


@pytest.mark.parametrize("member, changes, action, reason", PRECEDENCE)
def test_first_matching_rule_decides(member, changes, action, reason):
    # The overrides may rename the member, so that m1 is missing from the members table.
    row = {**member_row("m1"), **member}
    inputs = step_inputs("mid_archive", [row], [audience("mid", "m1")], **changes)

    (decision,) = rules.decide(inputs).to_dict("records")

    assert decision["member_id"] == "m1"
    assert decision["action"] == action
    assert decision["reason"] == reason
    assert decision["recorded"] is False


def test_ledger_outcomes_precede_rules():
    members = [member_row(m, consent_email=False) for m in ("m1", "m2", "m3", "m4")]
    claimed = NOW - dt.timedelta(minutes=5)
    expired = NOW - dt.timedelta(minutes=30)
    step_ledger = pd.DataFrame(
        {
            "member_id": ["m1", "m2", "m3", "m4"],
            "status": ["sent", "sending", "holdout", "sending"],
            "claimed_at": pd.to_datetime([claimed, claimed, None, expired], utc=True),
        }
    )
    inputs = step_inputs(
        "mid_archive",
        members,
        [audience("mid", m) for m in ("m4", "m3", "m2", "m1")],
        step_ledger=step_ledger,
    )

    decisions = rules.decide(inputs).set_index("member_id")

    assert list(decisions.index) == ["m1", "m2", "m3", "m4"]
    assert list(decisions["action"]) == ["skipped", "skipped", "holdout", "skipped"]
    assert list(decisions["reason"]) == ["already_sent", "in_flight", None, "no_consent"]
    assert list(decisions["recorded"]) == [True, True, True, False]


def test_failed_check_skips_unrecorded_members():
    members = [member_row("m1"), member_row("m2")]
    step_ledger = pd.DataFrame({"member_id": ["m1"], "status": ["sent"], "claimed_at": [NOW]})
    inputs = step_inputs(
        "mid_archive",
        members,
        [audience("mid", "m1"), audience("mid", "m2")],
        step_ledger=step_ledger,
        failed_checks=["viewer_summary:viewing_rate_within_bounds"],
    )

    decisions = rules.decide(inputs)

    assert list(decisions["reason"]) == ["already_sent", "blocked_by_failed_check"]


def test_shared_message_built_once():
    members = [member_row(f"m{n}") for n in range(3)]
    inputs = step_inputs("mid_archive", members, [audience("mid", m["member_id"]) for m in members])

    decisions = rules.decide(inputs)

    assert list(decisions["action"]) == ["send"] * 3
    assert decisions["text"].nunique() == 1
    assert "https://shop.example.test/archive/b1" in decisions.at[0, "text"]


def test_member_messages_list_own_products():
    members = [member_row("m1"), member_row("m2"), member_row("m3"), member_row("m4")]
    rows = [
        audience("clicked_not_bought", "m1", "P-1"),
        audience("clicked_not_bought", "m2", "P-2;P-1"),
        audience("clicked_not_bought", "m3", "P-9"),
        # Two rows of one member list the products of both, in row order.
        audience("clicked_not_bought", "m4", "P-2"),
        audience("clicked_not_bought", "m4", "P-1;P-2"),
    ]
    inputs = step_inputs("clicked_detail", members, rows)

    decisions = rules.decide(inputs).set_index("member_id")

    assert list(decisions["action"]) == ["send", "send", "skipped", "send"]
    assert decisions.at["m3", "reason"] == "unknown_product"
    assert decisions.at["m1", "text"].endswith("Serum: https://shop.example.test/p/P-1")
    assert "Serum" not in decisions.at["m3", "text"]
    m2_lines = decisions.at["m2", "text"].splitlines()[-2:]
    assert m2_lines == [
        "Lotion: https://shop.example.test/p/P-2",
        "Serum: https://shop.example.test/p/P-1",
    ]
    assert decisions.at["m4", "text"] == decisions.at["m2", "text"]


def test_first_segment_decides_member():
    inputs = step_inputs(
        "mid_archive",
        [member_row("m1")],
        [audience("low", "m1"), audience("mid", "m1"), audience("mid", "m1")],
    )
    inputs.step = inputs.step.model_copy(update={"segments": ["low", "mid"]})

    decisions = rules.decide(inputs)

    assert list(decisions["segment"]) == ["low"]


def test_empty_audience_gives_no_decisions():
    inputs = step_inputs("mid_archive", [member_row("m1")], [])
    inputs.audience = pd.DataFrame(columns=["broadcast_id", "segment", "member_id"])

    decisions = rules.decide(inputs)

    assert decisions.empty
    assert list(decisions.columns) == rules.DECISION_COLUMNS
