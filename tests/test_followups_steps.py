"""Follow-up steps run through the real `followup_sends` asset on a SQLite warehouse."""

import json

import pandas as pd
import pytest
import yaml

from livecrm_dagster.defs.followups.scenarios import DEFAULT_SCENARIOS_PATH
from tests.test_followups_support import (
    Harness,
    audience_row,
    broadcast,
    load,
    member,
    order,
    tokyo,
)

B = "b100"
PRODUCTS = [
    ("P-1", "Serum", "skincare", 3),
    ("P-2", "Lotion", "skincare", 50),
    ("P-3", "Moist cream", "moisturiser", 10),
    ("P-4", "Lipstick", "makeup", 20),
]


def product_rows() -> list[dict]:
    return [
        {
            "product_id": product_id,
            "name": name,
            "category": category,
            "stock": stock,
            "low_stock_threshold": 5,
            "detail_url": f"https://shop.example.test/p/{product_id}",
            "reviews_url": f"https://shop.example.test/r/{product_id}",
            "trial_product_id": None,
        }
        for product_id, name, category, stock in PRODUCTS
    ]


def scenarios_file(tmp_path, **changes) -> str:
    settings = yaml.safe_load(DEFAULT_SCENARIOS_PATH.read_text())
    settings.update(changes)
    path = tmp_path / "scenarios.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


@pytest.fixture
def shop(tmp_path) -> Harness:
    harness = Harness(tmp_path)
    load(
        harness.store,
        broadcasts=[
            broadcast(
                B,
                "2024-06-10 17:00",
                "2024-06-10 18:00",
                featured_product_ids="P-2;P-4",
                next_broadcast_id="b101",
                next_broadcast_at=tokyo("2024-06-17 20:00"),
            )
        ],
        members=[member(f"m0{n}") for n in range(1, 7)]
        + [
            member("m07", unsubscribed_at=tokyo("2024-06-01 10:00")),
            member("m08", consent_email=False),
        ],
        products=product_rows(),
        followup_audience=[
            audience_row(B, "hot", "m01"),
            audience_row(B, "hot", "m02"),
            audience_row(B, "coupon", "m01"),
            audience_row(B, "coupon", "m02"),
            audience_row(B, "coupon", "m03", chats=0),
            audience_row(B, "mid", "m03", chats=0),
            audience_row(B, "mid", "m04", viewing_rate=0.5),
            audience_row(B, "mid", "m08", viewing_rate=0.5),
            audience_row(B, "low", "m05", viewing_rate=0.2),
            audience_row(B, "low", "m07", viewing_rate=0.1),
            audience_row(B, "clicked_not_bought", "m01", product_ids="P-1"),
            audience_row(B, "survey", "m05", question_id="q1", answer="Dry skin "),
            audience_row(B, "buyer", "m06"),
        ],
    )
    return harness


# (step, shop time it runs, members sent, {reason: members skipped})
DEFAULT_STEPS = [
    ("coupon_same_night", "2024-06-10 20:00", ["m03"], {"duplicate_offer": ["m01", "m02"]}),
    ("hot_thanks_coupon", "2024-06-10 20:00", ["m01", "m02"], {}),
    ("hot_archive", "2024-06-11 09:00", ["m01", "m02"], {}),
    ("mid_archive", "2024-06-11 18:00", ["m03", "m04"], {"no_consent": ["m08"]}),
    ("clicked_detail", "2024-06-11 18:00", [], {"frequency_cap": ["m01"]}),
    ("low_teaser", "2024-06-12 18:00", ["m05"], {"unsubscribed": ["m07"]}),
    ("hot_low_stock", "2024-06-13 18:00", ["m01"], {"no_low_stock_product": ["m02"]}),
    ("mid_reviews", "2024-06-13 18:00", ["m03", "m04"], {"no_consent": ["m08"]}),
    ("survey_match", "2024-06-13 18:00", ["m05"], {}),
    ("hot_next_live", "2024-06-17 18:00", ["m01", "m02"], {}),
    ("mid_related", "2024-06-17 18:00", ["m03", "m04"], {"no_consent": ["m08"]}),
    ("low_other_categories", "2024-06-17 18:00", ["m05"], {"unsubscribed": ["m07"]}),
    ("buyer_follow_up", "2024-06-17 18:00", ["m06"], {}),
]


def test_default_steps_exact_members(shop):
    for step_id, at, sent, skipped in DEFAULT_STEPS:
        metadata = shop.run(B, step_id, tokyo(at))
        assert shop.outbox_members(B, step_id) == sent, step_id
        assert metadata["sent"] == len(sent), step_id
        assert metadata["skipped_by_reason"] == {r: len(m) for r, m in skipped.items()}, step_id
        rows = shop.ledger_rows(B)
        rows = rows.loc[rows["step_id"] == step_id]
        assert list(rows.loc[rows["status"] == "sent", "member_id"]) == sent, step_id
        for reason, members in skipped.items():
            assert list(rows.loc[rows["reason"] == reason, "member_id"]) == members, step_id
    assert len(shop.ledger_rows(B)) == sum(
        len(s) + sum(map(len, k.values())) for _, _, s, k in DEFAULT_STEPS
    )


def test_message_contents(shop):
    for step_id, at, _, _ in DEFAULT_STEPS:
        shop.run(B, step_id, tokyo(at))

    def texts(step_id):
        path = shop.outbox / B / f"{step_id}.jsonl"
        return {r["member_id"]: r for r in map(json.loads, path.read_text().splitlines())}

    assert texts("hot_thanks_coupon")["m01"]["offer_expires_at"] == "2024-06-10T23:59:59+09:00"
    assert texts("hot_low_stock")["m01"]["text"].endswith("Serum: https://shop.example.test/p/P-1")
    assert "Lotion: https://shop.example.test/r/P-2" in texts("mid_reviews")["m03"]["text"]
    assert "Lipstick: https://shop.example.test/r/P-4" in texts("mid_reviews")["m03"]["text"]
    assert texts("mid_related")["m04"]["text"].endswith("Serum: https://shop.example.test/p/P-1")
    assert texts("survey_match")["m05"]["text"].endswith(
        "Moist cream: https://shop.example.test/p/P-3"
    )
    assert texts("low_other_categories")["m05"]["text"].endswith(
        "Moist cream: https://shop.example.test/p/P-3"
    )
    assert "2024-06-17 20:00" in texts("hot_next_live")["m02"]["subject"]
    assert texts("buyer_follow_up")["m06"]["offer_expires_at"] == "2024-07-01T23:59:59+09:00"
    outbox_file = shop.outbox / B / "hot_archive.csv"
    assert outbox_file.stat().st_mode & 0o777 == 0o600
    assert (shop.outbox / B).stat().st_mode & 0o777 == 0o700
    assert outbox_file.read_text().splitlines()[0].startswith("idempotency_key,broadcast_id")


def test_purchase_after_planning_removes_member(shop):
    planned = shop.run(B, "mid_archive", tokyo("2024-06-11 18:00"), dry_run=True)
    would_send = [d["member_id"] for d in planned["decisions"] if d["decision"] == "would_send"]
    assert would_send == ["m03", "m04"]
    assert shop.ledger_rows(B).empty
    assert shop.outbox_members(B, "mid_archive") == []

    load(shop.store, orders=[order("o001", "m04", tokyo("2024-06-11 12:00"))])
    metadata = shop.run(B, "mid_archive", tokyo("2024-06-11 18:00"))
    assert shop.outbox_members(B, "mid_archive") == ["m03"]
    assert metadata["skipped_by_reason"] == {"bought_since_broadcast": 1, "no_consent": 1}


def test_cancelled_order_keeps_member(shop):
    load(shop.store, orders=[order("o002", "m04", tokyo("2024-06-11 12:00"), "cancelled")])
    shop.run(B, "mid_archive", tokyo("2024-06-11 18:00"))
    assert shop.outbox_members(B, "mid_archive") == ["m03", "m04"]


def test_rerun_sends_nothing_twice(shop):
    shop.run(B, "mid_archive", tokyo("2024-06-11 18:00"))
    before = shop.ledger_rows(B)
    metadata = shop.run(B, "mid_archive", tokyo("2024-06-11 18:05"))
    assert metadata["sent"] == 0
    assert metadata["skipped_by_reason"] == {"already_sent": 2, "no_consent": 1}
    assert shop.outbox_members(B, "mid_archive") == ["m03", "m04"]
    assert shop.ledger_rows(B).equals(before)


def test_not_due_and_quiet_hours_defer(shop):
    early = shop.run(B, "mid_archive", tokyo("2024-06-11 17:59"))
    assert early["deferred"] == "not_due"
    late_night = shop.run(B, "mid_archive", tokyo("2024-06-11 21:30"))
    assert late_night["deferred"] == "quiet_hours"
    assert shop.ledger_rows(B).empty


def test_disabled_scenario_sends_nothing(tmp_path, shop):
    settings = yaml.safe_load(DEFAULT_SCENARIOS_PATH.read_text())
    settings["scenarios"]["mid"]["enabled"] = False
    shop.scenarios_path = scenarios_file(tmp_path, scenarios=settings["scenarios"])
    metadata = shop.run(B, "mid_archive", tokyo("2024-06-11 18:00"))
    assert metadata["deferred"] == "scenario_disabled"
    assert shop.outbox_members(B, "mid_archive") == []


def test_holdout_is_stable_share(tmp_path):
    harness = Harness(tmp_path)
    harness.scenarios_path = scenarios_file(tmp_path, holdout_share=0.3)
    members = [f"h{n:03d}" for n in range(200)]
    load(
        harness.store,
        broadcasts=[broadcast("b200", "2024-06-10 17:00", "2024-06-10 18:00")],
        members=[member(m) for m in members],
        products=product_rows(),
        followup_audience=[audience_row("b200", "mid", m) for m in members],
    )
    first = harness.run("b200", "mid_archive", tokyo("2024-06-11 18:00"))
    assert first["sent"] + first["holdout"] == 200
    assert 40 <= first["holdout"] <= 80
    held = set(harness.ledger_rows().query("status == 'holdout'")["member_id"])
    second = harness.run("b200", "mid_reviews", tokyo("2024-06-13 18:00"))
    assert second["holdout"] == first["holdout"]
    rows = harness.ledger_rows()
    assert set(rows.query("step_id == 'mid_reviews' and status == 'holdout'")["member_id"]) == held
    assert not held & set(harness.outbox_members("b200", "mid_archive"))


def test_unknown_product_does_not_stop_batch(tmp_path):
    """One member's unknown product is recorded, the others are sent."""
    harness = Harness(tmp_path)
    load(
        harness.store,
        broadcasts=[broadcast("b019", "2024-06-10 17:00", "2024-06-10 18:00")],
        members=[member("m030"), member("m031"), member("m032")],
        products=product_rows(),
        followup_audience=[
            audience_row("b019", "clicked_not_bought", "m030", product_ids="P-1"),
            audience_row("b019", "clicked_not_bought", "m031", product_ids="P-9"),
            audience_row("b019", "clicked_not_bought", "m032", product_ids="P-2"),
        ],
    )
    metadata = harness.run("b019", "clicked_detail", tokyo("2024-06-11 18:00"))
    assert harness.outbox_members("b019", "clicked_detail") == ["m030", "m032"]
    assert metadata["skipped_by_reason"] == {"unknown_product": 1}
    rows = harness.ledger_rows()
    assert rows.set_index("member_id").at["m031", "reason"] == "unknown_product"


def test_coupon_deferred_past_expiry_is_skipped(tmp_path):
    """A coupon due at 21:00 would wait until 09:00, after its 23:59 expiry."""
    harness = Harness(tmp_path)
    load(
        harness.store,
        broadcasts=[broadcast("b005b", "2024-06-10 18:00", "2024-06-10 19:00")],
        members=[member("m007")],
        followup_audience=[audience_row("b005b", "hot", "m007")],
    )
    evening = harness.run("b005b", "hot_thanks_coupon", tokyo("2024-06-10 21:00"))
    assert evening["skipped_by_reason"] == {"offer_expired": 1}
    morning = harness.run("b005b", "hot_thanks_coupon", tokyo("2024-06-11 09:00"))
    assert morning["sent"] == 0
    assert harness.outbox_members("b005b", "hot_thanks_coupon") == []
    assert harness.ledger_rows().at[0, "reason"] == "offer_expired"


def test_frequency_cap_counts_shop_days(tmp_path):
    """Quiet hours [23:00, 07:00), one message per member per shop day."""
    harness = Harness(tmp_path)
    harness.scenarios_path = scenarios_file(
        tmp_path, quiet_hours={"start": "23:00", "end": "07:00"}
    )
    later = tokyo("2024-06-20 20:00")

    load(
        harness.store,
        broadcasts=[
            broadcast("b030", "2024-06-10 07:50", "2024-06-10 08:50"),
            broadcast("b031", "2024-06-09 08:10", "2024-06-09 09:10", next_broadcast_at=later),
            broadcast("b032", "2024-06-10 20:50", "2024-06-10 21:50"),
            broadcast("b033", "2024-06-10 06:10", "2024-06-10 07:10", next_broadcast_at=later),
            broadcast("b038", "2024-06-10 17:00", "2024-06-10 18:00"),
        ],
        members=[member("m013"), member("m036"), member("m037")],
        products=product_rows(),
        followup_audience=[
            audience_row("b030", "mid", "m013"),
            audience_row("b031", "low", "m013"),
            audience_row("b032", "mid", "m036"),
            audience_row("b033", "low", "m036"),
            audience_row("b038", "mid", "m037"),
            audience_row("b038", "clicked_not_bought", "m037", product_ids="P-1"),
        ],
    )

    # m013: 08:50 and 09:10 on shop day 06-11, although 08:50 is 06-10 in UTC.
    assert harness.run("b030", "mid_archive", tokyo("2024-06-11 08:50"))["sent"] == 1
    capped = harness.run("b031", "low_teaser", tokyo("2024-06-11 09:10"))
    assert capped["skipped_by_reason"] == {"frequency_cap": 1}
    # m036: 06-11 21:50 and 06-12 07:10 are two shop days on one UTC date (06-11).
    assert harness.run("b032", "mid_archive", tokyo("2024-06-11 21:50"))["sent"] == 1
    assert harness.run("b033", "low_teaser", tokyo("2024-06-12 07:10"))["sent"] == 1
    # m037: two steps due in the same tick; the lower priority one runs first and yields.
    lower = harness.run("b038", "mid_archive", tokyo("2024-06-11 18:00"))
    higher = harness.run("b038", "clicked_detail", tokyo("2024-06-11 18:00"))
    assert lower["skipped_by_reason"] == {"frequency_cap": 1}
    assert higher["sent"] == 1
    sent = harness.ledger_rows().query("status == 'sent'")
    assert sorted(zip(sent["broadcast_id"], sent["member_id"], strict=True)) == [
        ("b030", "m013"),
        ("b032", "m036"),
        ("b033", "m036"),
        ("b038", "m037"),
    ]


def test_same_offer_once_across_rebuilds(tmp_path):
    """Hot and coupon audiences share one offer, also after the segments change."""
    harness = Harness(tmp_path)
    load(
        harness.store,
        broadcasts=[broadcast("b034", "2024-06-10 17:00", "2024-06-10 18:00")],
        members=[member("m014")],
    )
    inside = [audience_row("b034", "hot", "m014"), audience_row("b034", "coupon", "m014")]
    outside = [audience_row("b034", "mid", "m014", viewing_rate=0.7)]
    sent_rows = None
    for minute, audience in enumerate([inside, outside, inside]):
        harness.store.replace_partition("followup_audience", "b034", pd.DataFrame(audience))
        now = tokyo(f"2024-06-10 20:{minute:02d}")
        harness.run("b034", "coupon_same_night", now)
        harness.run("b034", "hot_thanks_coupon", now)
        rows = harness.ledger_rows()
        if sent_rows is None:
            sent_rows = rows.query("status == 'sent'")
        assert rows.query("status == 'sent'").equals(sent_rows)
    coupons = harness.outbox_members("b034", "hot_thanks_coupon") + harness.outbox_members(
        "b034", "coupon_same_night"
    )
    assert coupons == ["m014"]
    rows = harness.ledger_rows().set_index("step_id")
    assert rows.at["coupon_same_night", "reason"] == "duplicate_offer"


def test_cap_ignores_competitor_that_skips_member(tmp_path):
    """A higher-priority step that will skip the member does not take their daily slot."""
    harness = Harness(tmp_path)
    harness.scenarios_path = scenarios_file(tmp_path)
    load(
        harness.store,
        broadcasts=[
            broadcast("b050", "2024-06-10 17:00", "2024-06-10 18:00", featured_product_ids="P-2")
        ],
        members=[member("m070"), member("m071")],
        products=product_rows(),
        followup_audience=[
            audience_row("b050", "mid", "m070"),
            audience_row("b050", "mid", "m071"),
            # m070's answer maps to no category, so survey_match (priority 55) skips m070;
            # m071's answer matches, so survey_match sends to m071 and mid_reviews yields.
            audience_row("b050", "survey", "m070", question_id="shopping_for", answer="none"),
            audience_row("b050", "survey", "m071", question_id="shopping_for", answer="dry skin"),
        ],
    )
    due = tokyo("2024-06-13 18:00")

    reviews = harness.run("b050", "mid_reviews", due)
    survey = harness.run("b050", "survey_match", due)

    assert harness.outbox_members("b050", "mid_reviews") == ["m070"]
    assert reviews["skipped_by_reason"] == {"frequency_cap": 1}
    assert harness.outbox_members("b050", "survey_match") == ["m071"]
    assert survey["skipped_by_reason"] == {"no_matching_answer": 1}
