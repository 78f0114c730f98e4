"""Scenario loading and the pure timing rules."""

import datetime as dt

import pytest
import yaml

from livecrm_dagster.defs.followups.plan import (
    due_at,
    in_holdout,
    in_quiet_hours,
    next_allowed,
    shop_day,
    step_timing,
)
from livecrm_dagster.defs.followups.scenarios import (
    DEFAULT_SCENARIOS_PATH,
    QuietHours,
    ScenariosError,
    load_scenarios,
    parse_scenarios,
)
from tests.test_followups_support import TOKYO, tokyo


def default_raw() -> dict:
    return yaml.safe_load(DEFAULT_SCENARIOS_PATH.read_text())


def test_default_scenarios_load():
    settings = load_scenarios()
    assert settings.step_ids() == [
        "hot_thanks_coupon",
        "hot_archive",
        "hot_low_stock",
        "hot_next_live",
        "coupon_same_night",
        "mid_archive",
        "mid_reviews",
        "mid_related",
        "low_teaser",
        "low_other_categories",
        "clicked_detail",
        "survey_match",
        "buyer_follow_up",
    ]
    assert settings.quiet_hours == QuietHours(start="21:00", end="09:00")
    assert settings.frequency_cap.messages_per_shop_day == 1
    assert settings.holdout_share == 0.0
    assert settings.step("hot_thanks_coupon").offer.id == "same_night_coupon"
    assert settings.step("coupon_same_night").offer.id == "same_night_coupon"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda raw: raw["scenarios"]["hot"]["steps"][1].update(delay="soon"),
            "scenarios.hot.steps.1 (hot_archive).delay: invalid delay 'soon'",
        ),
        (
            lambda raw: raw["scenarios"]["mid"]["steps"][0].update(template="nope"),
            "scenarios.mid.steps.0 (mid_archive).template: unknown template 'nope'",
        ),
        (
            lambda raw: raw["scenarios"]["low"]["steps"][0].update(id="mid_archive"),
            "scenarios.low.steps.0 (mid_archive).id: duplicate step id, also in mid",
        ),
        (
            lambda raw: raw["scenarios"]["buyer"]["steps"][0].update(segments=["vip"]),
            "scenarios.buyer.steps.0 (buyer_follow_up).segments: unknown segments ['vip']",
        ),
        (
            lambda raw: raw["scenarios"]["hot"]["steps"][0].update(colour="red"),
            "scenarios.hot.steps.0 (hot_thanks_coupon).colour: Extra inputs are not permitted",
        ),
        (
            lambda raw: raw["templates"]["archive"].update(text="{member_email}"),
            "templates.archive.text: unknown placeholders ['member_email']",
        ),
        (
            lambda raw: raw["scenarios"]["mid"]["steps"][2].update(delay="30d"),
            "scenarios.mid.steps.2 (mid_related): due after the follow-up window of 10.0 days",
        ),
    ],
)
def test_invalid_scenarios_name_step_and_field(change, message):
    raw = default_raw()
    change(raw)
    with pytest.raises(ScenariosError) as error:
        parse_scenarios(raw)
    assert message in str(error.value)


def test_quiet_hours_across_midnight():
    quiet = QuietHours(start="21:00", end="09:00")
    assert not in_quiet_hours(tokyo("2024-06-10 20:59:59"), quiet, TOKYO)
    assert in_quiet_hours(tokyo("2024-06-10 21:00"), quiet, TOKYO)
    assert in_quiet_hours(tokyo("2024-06-11 00:30"), quiet, TOKYO)
    assert in_quiet_hours(tokyo("2024-06-11 08:59:59"), quiet, TOKYO)
    assert not in_quiet_hours(tokyo("2024-06-11 09:00"), quiet, TOKYO)
    assert next_allowed(tokyo("2024-06-10 22:40"), quiet, TOKYO) == tokyo("2024-06-11 09:00")
    assert next_allowed(tokyo("2024-06-11 00:40"), quiet, TOKYO) == tokyo("2024-06-11 09:00")
    assert next_allowed(tokyo("2024-06-11 09:00"), quiet, TOKYO) == tokyo("2024-06-11 09:00")


def test_quiet_hours_inside_one_day_and_off():
    daytime = QuietHours(start="12:00", end="13:00")
    assert in_quiet_hours(tokyo("2024-06-10 12:30"), daytime, TOKYO)
    assert next_allowed(tokyo("2024-06-10 12:30"), daytime, TOKYO) == tokyo("2024-06-10 13:00")
    off = QuietHours(start="00:00", end="00:00")
    assert not in_quiet_hours(tokyo("2024-06-10 03:00"), off, TOKYO)


def test_due_times_in_shop_zone():
    settings = load_scenarios()
    end = tokyo("2024-06-10 22:40")
    assert due_at(settings.step("mid_archive"), end, TOKYO) == tokyo("2024-06-11 22:40")
    timing = step_timing(settings.step("mid_archive"), end, settings, TOKYO)
    assert timing.send_at.isoformat() == "2024-06-12T00:00:00+00:00"
    # 00:30 shop time is still the previous UTC day, but "next morning" is by shop day.
    late = tokyo("2024-06-11 00:30")
    assert due_at(settings.step("hot_archive"), late, TOKYO) == tokyo("2024-06-12 09:00")
    assert shop_day(dt.datetime(2024, 6, 10, 23, 50, tzinfo=dt.UTC), TOKYO) == dt.date(2024, 6, 11)


def test_times_without_zone_are_rejected():
    settings = load_scenarios()
    with pytest.raises(ValueError, match="without a zone"):
        due_at(settings.step("mid_archive"), dt.datetime(2024, 6, 10, 18), TOKYO)


def test_holdout_is_deterministic():
    draws = [in_holdout("b1", "hot", f"m{n}", 0.25) for n in range(1000)]
    assert draws == [in_holdout("b1", "hot", f"m{n}", 0.25) for n in range(1000)]
    assert 200 <= sum(draws) <= 300
    assert not any(in_holdout("b1", "hot", f"m{n}", 0.0) for n in range(100))
    assert all(in_holdout("b1", "hot", f"m{n}", 1.0) for n in range(100))
