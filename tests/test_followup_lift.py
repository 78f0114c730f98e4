"""Lift of follow-up steps against their holdout: the pure computation and the asset."""

import datetime as dt

import dagster as dg
import pandas as pd
import pytest

from livecrm_dagster.defs.followups.ledger import HOLDOUT, SENT, SendLedger, ledger_key
from livecrm_dagster.defs.followups.lift import followup_lift, lift_markdown
from livecrm_dagster.defs.followups.lift_assets import followup_lift as followup_lift_asset
from tests.test_followups_steps import scenarios_file
from tests.test_followups_support import (
    Harness,
    audience_row,
    broadcast,
    load,
    member,
    order,
    tokyo,
)

B = "b300"
SEND = pd.Timestamp("2024-06-11 10:00", tz="Asia/Tokyo").tz_convert("UTC")
HELD = pd.Timestamp("2024-06-11 10:00:05", tz="Asia/Tokyo").tz_convert("UTC")


def ledger_row(step_id: str, member_id: str, status: str, channel: str = "outbox") -> dict:
    return {
        "step_id": step_id,
        "member_id": member_id,
        "channel": channel,
        "status": status,
        "sent_at": SEND if status == SENT else pd.NaT,
        "updated_at": HELD if status == HOLDOUT else SEND,
    }


def ledger(*rows: dict) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows))
    for column in ("sent_at", "updated_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def orders(*rows: tuple[str, pd.Timestamp, str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "member_id": [member_id for member_id, _, _ in rows],
            "paid_at": pd.to_datetime([paid_at for _, paid_at, _ in rows], utc=True),
            "status": [status for _, _, status in rows],
        }
    )


def four_sent_two_held() -> pd.DataFrame:
    return ledger(
        *(ledger_row("hot_archive", m, SENT) for m in ("s1", "s2", "s3", "s4")),
        *(ledger_row("hot_archive", m, HOLDOUT) for m in ("h1", "h2")),
    )


def only_row(lift: pd.DataFrame) -> dict:
    assert len(lift) == 1
    return lift.iloc[0].to_dict()


def test_lift_fifty_points():
    bought = orders(
        ("s1", SEND + pd.Timedelta(hours=2), "paid"),
        ("s2", SEND + pd.Timedelta(days=3), "paid"),
        ("s2", SEND + pd.Timedelta(days=4), "paid"),
    )
    row = only_row(followup_lift(four_sent_two_held(), bought))
    assert row["step_id"] == "hot_archive"
    assert row["sent_members"] == 4
    assert row["sent_conversions"] == 2
    assert row["sent_conversion_rate"] == pytest.approx(0.5)
    assert row["holdout_members"] == 2
    assert row["holdout_conversions"] == 0
    assert row["holdout_conversion_rate"] == pytest.approx(0.0)
    assert row["lift_points"] == pytest.approx(50.0)
    assert row["window_days"] == 7
    assert row["window_closes_at"] == HELD + pd.Timedelta(days=7)


def test_order_before_send_not_counted():
    bought = orders(
        ("s1", SEND - pd.Timedelta(minutes=1), "paid"),
        ("s2", SEND, "paid"),  # at the send instant, so not after it
        ("h1", HELD - pd.Timedelta(seconds=1), "paid"),
    )
    row = only_row(followup_lift(four_sent_two_held(), bought))
    assert row["sent_conversions"] == 0
    assert row["holdout_conversions"] == 0


def test_cancelled_order_not_counted():
    bought = orders(
        ("s1", SEND + pd.Timedelta(hours=1), "cancelled"),
        ("h1", HELD + pd.Timedelta(hours=1), "refunded"),
    )
    row = only_row(followup_lift(four_sent_two_held(), bought))
    assert row["sent_conversions"] == 0
    assert row["holdout_conversions"] == 0


def test_window_end_inclusive():
    bought = orders(
        ("s1", SEND + pd.Timedelta(days=7), "paid"),
        ("s2", SEND + pd.Timedelta(days=7, seconds=1), "paid"),
        ("h1", HELD + pd.Timedelta(days=1), "paid"),
    )
    row = only_row(followup_lift(four_sent_two_held(), bought))
    assert row["sent_conversions"] == 1
    assert row["holdout_conversions"] == 1
    assert row["lift_points"] == pytest.approx(25.0 - 50.0)


def test_holdout_window_starts_when_recorded():
    # Paid between the send of the others and the recording of the holdout.
    bought = orders(("h1", SEND + pd.Timedelta(seconds=2), "paid"))
    row = only_row(followup_lift(four_sent_two_held(), bought))
    assert row["holdout_conversions"] == 0


def test_member_counted_once_per_step():
    rows = ledger(
        ledger_row("s", "m1", SENT, channel="line"),
        ledger_row("s", "m1", SENT, channel="outbox"),
        ledger_row("s", "m2", HOLDOUT, channel="line"),
        ledger_row("s", "m2", SENT, channel="outbox"),
    )
    row = only_row(followup_lift(rows, orders()))
    assert row["sent_members"] == 2
    assert row["holdout_members"] == 0


def test_step_without_holdout_has_no_lift():
    rows = ledger(ledger_row("a", "m1", SENT), ledger_row("b", "m1", "failed"))
    bought = orders(("m1", SEND + pd.Timedelta(days=1), "paid"))
    lift = followup_lift(rows, bought).set_index("step_id")
    assert lift.loc["a", "sent_conversion_rate"] == pytest.approx(1.0)
    assert pd.isna(lift.loc["a", "holdout_conversion_rate"])
    assert pd.isna(lift.loc["a", "lift_points"])
    assert lift.loc["b", "sent_members"] == 0
    assert pd.isna(lift.loc["b", "sent_conversion_rate"])


def test_lift_markdown_rows():
    bought = orders(
        ("s1", SEND + pd.Timedelta(hours=2), "paid"),
        ("s2", SEND + pd.Timedelta(days=3), "paid"),
    )
    text = lift_markdown(followup_lift(four_sent_two_held(), bought))
    assert "| hot_archive | 4 | 2 | 50.0% | 2 | 0 | 0.0% | +50.0 pts |" in text
    assert "within 7 days" in text


def materialize_lift(harness: Harness, broadcast_id: str) -> dict:
    harness.instance.add_dynamic_partitions("broadcast", [broadcast_id])
    result = dg.materialize(
        [followup_lift_asset],
        partition_key=broadcast_id,
        instance=harness.instance,
        resources={"warehouse": harness.resources()["warehouse"]},
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("followup_lift")
    return {key: value.value for key, value in materialization.metadata.items()}


def record_step(store_ledger: SendLedger, sent: list[str], holdout: list[str], now: dt.datetime):
    """Write one step's rows through the ledger's own API: planned, then sent or held out."""
    keys = {m: ledger_key(B, "hot_archive", m, "outbox") for m in sent + holdout}
    store_ledger.insert_planned(
        [
            {
                "idempotency_key": keys[m],
                "broadcast_id": B,
                "step_id": "hot_archive",
                "member_id": m,
                "channel": "outbox",
                "segment": "hot",
                "due_at": now,
            }
            for m in sent + holdout
        ],
        now,
    )
    for m in sent:
        claim = store_ledger.claim(keys[m], "run-1", now, dt.timedelta(minutes=10), None, [None])
        assert claim.outcome == "claimed"
    store_ledger.mark_sent([keys[m] for m in sent], "run-1", now, request_id=None)
    for m in holdout:
        assert store_ledger.record_outcome(keys[m], HOLDOUT, None, "run-1", now)


def test_asset_writes_lift_table(tmp_path, warehouse_url):
    harness = Harness(tmp_path, url=warehouse_url)
    now = tokyo("2024-06-11 10:00")
    load(harness.store, broadcasts=[broadcast(B, "2024-06-10 20:00", "2024-06-10 21:00")])
    record_step(harness.ledger, ["s1", "s2", "s3", "s4"], ["h1", "h2"], now)
    load(
        harness.store,
        orders=[
            order("o1", "s1", now + dt.timedelta(hours=1)),
            order("o2", "s2", now + dt.timedelta(days=2)),
            order("o3", "s3", now - dt.timedelta(hours=1)),
            order("o4", "s4", now + dt.timedelta(hours=1), status="cancelled"),
            order("o5", "h1", now - dt.timedelta(days=1)),
        ],
    )

    metadata = materialize_lift(harness, B)

    row = only_row(harness.store.read("followup_lift", broadcast_id=B))
    assert row["sent_members"] == 4
    assert row["sent_conversions"] == 2
    assert row["holdout_members"] == 2
    assert row["holdout_conversions"] == 0
    assert row["sent_conversion_rate"] == pytest.approx(0.5)
    assert row["holdout_conversion_rate"] == pytest.approx(0.0)
    assert row["lift_points"] == pytest.approx(50.0)
    assert metadata["dagster/row_count"] == 1
    assert "| hot_archive | 4 | 2 | 50.0% | 2 | 0 | 0.0% | +50.0 pts |" in metadata["lift"]


def test_asset_rerun_replaces_rows(tmp_path):
    harness = Harness(tmp_path)
    now = tokyo("2024-06-11 10:00")
    load(harness.store, broadcasts=[broadcast(B, "2024-06-10 20:00", "2024-06-10 21:00")])
    record_step(harness.ledger, ["s1", "s2"], ["h1"], now)
    materialize_lift(harness, B)
    load(harness.store, orders=[order("o1", "h1", now + dt.timedelta(days=1))])
    materialize_lift(harness, B)
    row = only_row(harness.store.read("followup_lift", broadcast_id=B))
    assert row["holdout_conversions"] == 1
    assert row["lift_points"] == pytest.approx(-100.0)


def test_asset_reads_ledger_of_real_sends(tmp_path):
    harness = Harness(tmp_path)
    harness.scenarios_path = scenarios_file(tmp_path, holdout_share=0.5)
    members = [f"h{n:02d}" for n in range(20)]
    load(
        harness.store,
        broadcasts=[broadcast(B, "2024-06-10 17:00", "2024-06-10 18:00")],
        members=[member(m) for m in members],
        followup_audience=[audience_row(B, "mid", m) for m in members],
    )
    sent = harness.run(B, "mid_archive", tokyo("2024-06-11 18:00"))

    metadata = materialize_lift(harness, B)

    row = only_row(harness.store.read("followup_lift", broadcast_id=B))
    assert row["step_id"] == "mid_archive"
    assert row["sent_members"] == sent["sent"]
    assert row["holdout_members"] == sent["holdout"]
    assert row["sent_members"] + row["holdout_members"] == 20
    assert row["sent_conversions"] == 0
    assert "@" not in metadata["lift"]


def test_asset_without_ledger_rows(tmp_path):
    harness = Harness(tmp_path)
    load(harness.store, broadcasts=[broadcast(B, "2024-06-10 20:00", "2024-06-10 21:00")])
    metadata = materialize_lift(harness, B)
    assert harness.store.read("followup_lift", broadcast_id=B).empty
    assert metadata["dagster/row_count"] == 0
