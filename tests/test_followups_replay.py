"""Replay of follow-up timelines through the sensor and the send job."""

import dagster as dg

from livecrm_dagster.defs.followups.replay import replay_followups
from tests.test_followups_support import Harness, audience_row, hot_member_broadcast, load, tokyo


def fixture(tmp_path) -> Harness:
    harness = Harness(tmp_path)
    hot_member_broadcast(harness, "b300", "2024-06-10 18:00", "m301")
    load(
        harness.store,
        followup_audience=[
            audience_row("b300", "coupon", "m301"),
            audience_row("b300", "mid", "m302"),
        ],
    )
    return harness


def project_definitions(harness: Harness, monkeypatch) -> dg.Definitions:
    """Load the project's own definitions, pointed at the test's warehouse and outbox."""
    from livecrm_dagster.definitions import defs

    monkeypatch.setenv("LIVECRM_WAREHOUSE_URL", harness.url)
    monkeypatch.setenv("LIVECRM_OUTBOX_DIR", str(harness.outbox))
    return defs()


def test_replay_counts_per_step(tmp_path, monkeypatch):
    harness = fixture(tmp_path)
    definitions = project_definitions(harness, monkeypatch)
    frame = replay_followups(
        harness.instance, definitions, ["b300"], until=tokyo("2024-06-12 00:00")
    )
    rows = {step: row for step, row in zip(frame["step_id"], frame.to_dict("records"), strict=True)}
    assert list(frame["step_id"]) == [
        "hot_thanks_coupon",
        "coupon_same_night",
        "hot_archive",
        "mid_archive",
        "clicked_detail",
    ]
    assert rows["hot_thanks_coupon"]["sent"] == 1
    assert rows["hot_thanks_coupon"]["run_at"].isoformat() == "2024-06-10T11:00:00+00:00"
    assert rows["coupon_same_night"]["skipped_duplicate_offer"] == 1
    assert rows["coupon_same_night"]["sent"] == 0
    assert rows["hot_archive"]["sent"] == 1
    # m302 is a mid member without a members row: recorded, never sent.
    assert rows["mid_archive"]["skipped_unknown_member"] == 1
    assert rows["clicked_detail"]["audience"] == 0
    assert harness.outbox_members("b300", "hot_thanks_coupon") == ["m301"]
    assert harness.outbox_members("b300", "hot_archive") == ["m301"]

    # A second replay over the same period sends nothing again.
    again = replay_followups(
        harness.instance, definitions, ["b300"], until=tokyo("2024-06-12 00:00")
    )
    assert again["sent"].sum() == 0
    assert harness.outbox_members("b300", "hot_archive") == ["m301"]


def test_replay_dry_run_lists_decisions(tmp_path, monkeypatch):
    harness = fixture(tmp_path)
    definitions = project_definitions(harness, monkeypatch)
    frame = replay_followups(
        harness.instance, definitions, ["b300"], until=tokyo("2024-06-11 09:00"), dry_run=True
    )
    decisions = sorted(
        zip(
            frame["step_id"],
            frame["member_id"],
            frame["decision"],
            frame["reason"].fillna(""),
            strict=True,
        ),
        key=str,
    )
    assert decisions == sorted(
        [
            ("hot_thanks_coupon", "m301", "would_send", ""),
            ("coupon_same_night", "m301", "skipped", "duplicate_offer"),
            ("hot_archive", "m301", "would_send", ""),
        ],
        key=str,
    )
    assert harness.ledger_rows().empty
    assert harness.outbox_members("b300", "hot_thanks_coupon") == []
