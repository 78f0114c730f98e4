"""The due-step sensor evaluated with build_sensor_context at chosen instants."""

import datetime as dt
import os
import time

import dagster as dg
import pandas as pd
import pytest

from livecrm_dagster.defs.followups.assets import due_followup_steps
from livecrm_dagster.defs.followups.plan import step_timing
from livecrm_dagster.defs.followups.resources import FollowupClockResource
from livecrm_dagster.defs.followups.scenarios import load_scenarios
from tests.test_followups_support import (
    DST_DAY_EXPECTED,
    TOKYO,
    Harness,
    audience_row,
    dst_day_instants,
    hot_member_broadcast,
    load,
    member,
    tick,
    tokyo,
)


def evaluate(harness: Harness, now: dt.datetime, cursor: str | None = None):
    context = dg.build_sensor_context(
        instance=harness.instance, cursor=cursor, resources=harness.resources(now.isoformat())
    )
    return due_followup_steps(context)


@pytest.fixture
def b017(tmp_path) -> Harness:
    harness = Harness(tmp_path)
    hot_member_broadcast(harness, "b017", "2024-06-10 18:00", "m001")
    load(
        harness.store,
        members=[member("m002"), member("m003")],
        followup_audience=[
            audience_row("b017", segment, member_id)
            for member_id in ("m001", "m002", "m003")
            for segment in ("hot", "coupon")
        ],
    )
    return harness


def test_sensor_requests_due_step_once(b017):
    """One request per (broadcast, step) at 20:01, nothing more at 20:02."""
    first = evaluate(b017, tokyo("2024-06-10 20:01"))
    keys = sorted(request.run_key for request in first.run_requests)
    assert keys == ["followup:b017:coupon_same_night", "followup:b017:hot_thanks_coupon"]
    again = evaluate(b017, tokyo("2024-06-10 20:01"))
    assert sorted(request.run_key for request in again.run_requests) == keys
    (hot,) = [r for r in first.run_requests if r.run_key.endswith("hot_thanks_coupon")]
    assert hot.partition_key == dg.MultiPartitionKey(
        {"broadcast": "b017", "step": "hot_thanks_coupon"}
    )
    assert hot.run_config["ops"]["followup_sends"]["config"]["now"] == ("2024-06-10T11:01:00+00:00")

    second = evaluate(b017, tokyo("2024-06-10 20:02"), first.cursor)
    assert second.run_requests == []
    assert (
        "1 broadcast(s) in the follow-up window, 2 step(s) may run now, all already requested"
        in (second.skip_reason.skip_message)
    )
    assert "next: hot_archive of b017 at 2024-06-11T00:00:00+00:00" in (
        second.skip_reason.skip_message
    )


def test_sensor_runs_send_each_member_once(b017):
    """After the runs of the 20:01 tick the outbox contains one coupon per member."""
    requests, cursor = tick(b017, tokyo("2024-06-10 20:01"), None)
    assert len(requests) == 2
    requests, _ = tick(b017, tokyo("2024-06-10 20:02"), cursor)
    assert requests == []
    coupons = b017.outbox_members("b017", "hot_thanks_coupon")
    coupons += b017.outbox_members("b017", "coupon_same_night")
    assert coupons == ["m001", "m002", "m003"]


def test_sensor_before_due_and_outside_window(b017):
    early = evaluate(b017, tokyo("2024-06-10 19:59"))
    assert early.run_requests == []
    assert "0 step(s) may run now" in early.skip_reason.skip_message
    late = evaluate(b017, tokyo("2024-06-25 12:00"))
    assert late.run_requests == []
    assert "0 broadcast(s) in the follow-up window" in late.skip_reason.skip_message


def test_sensor_waits_for_partition(b017):
    b017.instance.delete_dynamic_partition("broadcast", "b017")
    waiting = evaluate(b017, tokyo("2024-06-10 20:01"))
    assert waiting.run_requests == []
    assert "1 waiting for a partition" in waiting.skip_reason.skip_message
    b017.instance.add_dynamic_partitions("broadcast", ["b017"])
    assert len(evaluate(b017, tokyo("2024-06-10 20:02"), waiting.cursor).run_requests) == 2


def test_quiet_hours_deferral_and_expiry(tmp_path):
    """Deferral to 09:00 shop time, the expired coupon, and one message per tick range."""
    harness = Harness(tmp_path)
    hot_member_broadcast(harness, "b005a", "2024-06-10 18:00", "m006")
    hot_member_broadcast(harness, "b005b", "2024-06-10 19:00", "m007")
    hot_member_broadcast(harness, "b005c", "2024-06-10 22:40", "m008")
    harness.store.replace_partition(
        "followup_audience",
        "b005c",
        pd.DataFrame([audience_row("b005c", "mid", "m008")]),
    )
    ticks = [tokyo("2024-06-10 20:00"), tokyo("2024-06-10 21:00")]
    ticks += [tokyo("2024-06-11 09:00") + dt.timedelta(minutes=n) for n in range(16)]
    ticks += [tokyo("2024-06-11 22:40"), tokyo("2024-06-12 08:59"), tokyo("2024-06-12 09:00")]
    cursor = None
    requested = []
    for now in ticks:
        requests, cursor = tick(harness, now, cursor)
        requested += [(now.astimezone(dt.UTC).isoformat(), r.run_key) for r in requests]

    # Steps of these broadcasts whose audience is empty are requested too and send nothing.
    assert requested == [
        ("2024-06-10T11:00:00+00:00", "followup:b005a:hot_thanks_coupon"),
        ("2024-06-10T11:00:00+00:00", "followup:b005a:coupon_same_night"),
        ("2024-06-10T12:00:00+00:00", "followup:b005b:hot_thanks_coupon"),
        ("2024-06-10T12:00:00+00:00", "followup:b005b:coupon_same_night"),
        ("2024-06-11T00:00:00+00:00", "followup:b005a:hot_archive"),
        ("2024-06-11T00:00:00+00:00", "followup:b005b:hot_archive"),
        ("2024-06-11T00:00:00+00:00", "followup:b005c:hot_thanks_coupon"),
        ("2024-06-11T00:00:00+00:00", "followup:b005c:hot_archive"),
        ("2024-06-11T00:00:00+00:00", "followup:b005c:coupon_same_night"),
        # Due at 18:00 while no tick ran; the 22:40 tick falls in quiet hours, so they wait.
        ("2024-06-12T00:00:00+00:00", "followup:b005a:mid_archive"),
        ("2024-06-12T00:00:00+00:00", "followup:b005a:clicked_detail"),
        ("2024-06-12T00:00:00+00:00", "followup:b005b:mid_archive"),
        ("2024-06-12T00:00:00+00:00", "followup:b005b:clicked_detail"),
        ("2024-06-12T00:00:00+00:00", "followup:b005c:mid_archive"),
        ("2024-06-12T00:00:00+00:00", "followup:b005c:clicked_detail"),
    ]
    rows = harness.ledger_rows().set_index(["member_id", "step_id"])
    assert rows.at[("m006", "hot_thanks_coupon"), "sent_at"].isoformat() == (
        "2024-06-10T11:00:00+00:00"
    )
    assert rows.at[("m006", "hot_archive"), "sent_at"].isoformat() == "2024-06-11T00:00:00+00:00"
    assert rows.at[("m007", "hot_thanks_coupon"), "status"] == "skipped"
    assert rows.at[("m007", "hot_thanks_coupon"), "reason"] == "offer_expired"
    assert rows.at[("m008", "mid_archive"), "sent_at"].isoformat() == "2024-06-12T00:00:00+00:00"
    assert harness.outbox_members("b005a", "hot_thanks_coupon") == ["m006"]
    assert harness.outbox_members("b005a", "hot_archive") == ["m006"]
    assert harness.outbox_members("b005b", "hot_thanks_coupon") == []
    assert harness.outbox_members("b005b", "hot_archive") == ["m007"]
    assert harness.outbox_members("b005c", "mid_archive") == ["m008"]


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Europe/London"])
def test_server_time_zone_does_not_matter(tmp_path, zone):
    """The same instants whatever the process's TZ is."""
    previous = os.environ.get("TZ")
    os.environ["TZ"] = zone
    time.tzset()
    try:
        assert dst_day_instants(Harness(tmp_path)) == DST_DAY_EXPECTED
    finally:
        if previous is None:
            os.environ.pop("TZ")
        else:
            os.environ["TZ"] = previous
        time.tzset()


def test_coupon_expiry_instant():
    """The coupon of a broadcast ending 2024-03-10 18:30 expires at 14:59:59Z."""
    settings = load_scenarios()
    timing = step_timing(
        settings.step("hot_thanks_coupon"), tokyo("2024-03-10 18:30"), settings, TOKYO
    )
    assert timing.send_at.isoformat() == "2024-03-10T11:30:00+00:00"
    assert timing.expires_at.isoformat() == "2024-03-10T14:59:59+00:00"


def test_live_clock_leaves_now_to_the_run(b017, monkeypatch):
    """With the wall clock, a run decides at the time it executes, not at the tick."""
    monkeypatch.setattr(
        "livecrm_dagster.defs.followups.resources.FollowupClockResource.current_time",
        lambda self: tokyo("2024-06-10 20:01"),
    )
    context = dg.build_sensor_context(
        instance=b017.instance,
        resources={**b017.resources(), "followup_clock": FollowupClockResource()},
    )
    result = due_followup_steps(context)
    assert len(result.run_requests) == 2
    assert all(not request.run_config for request in result.run_requests)
