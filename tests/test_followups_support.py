"""Shared fixtures of the follow-up tests: a small warehouse and a step runner."""

import datetime as dt
import json
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pandas as pd

from livecrm_dagster.defs.followups.assets import FollowupSendConfig, followup_sends
from livecrm_dagster.defs.followups.ledger import SendLedger
from livecrm_dagster.defs.followups.resources import (
    FollowupChannelsResource,
    FollowupClockResource,
    FollowupScenariosResource,
)
from livecrm_dagster.resources import ShopSettingsResource, WarehouseResource
from livecrm_dagster.tables import PARTITIONED_BY_BROADCAST
from livecrm_dagster.warehouse import Warehouse

TOKYO = ZoneInfo("Asia/Tokyo")


def tokyo(text: str) -> dt.datetime:
    """Parse 'YYYY-MM-DD HH:MM[:SS]' as shop time."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=TOKYO)


def member(member_id: str, **overrides) -> dict:
    row = {
        "member_id": member_id,
        "email": f"{member_id}@example.test",
        "line_user_id": f"U{member_id}",
        "consent_email": True,
        "consent_line": True,
        "consent_webhook": True,
        "unsubscribed_at": None,
    }
    row.update(overrides)
    return row


def broadcast(broadcast_id: str, starts: str, ends: str, **overrides) -> dict:
    row = {
        "broadcast_id": broadcast_id,
        "title": f"Live {broadcast_id}",
        "starts_at": tokyo(starts),
        "ends_at": tokyo(ends),
        "featured_product_ids": "",
        "archive_url": f"https://shop.example.test/archive/{broadcast_id}",
        "next_broadcast_id": None,
        "next_broadcast_at": None,
    }
    row.update(overrides)
    return row


def audience_row(broadcast_id: str, segment: str, member_id: str, **overrides) -> dict:
    row = {
        "broadcast_id": broadcast_id,
        "segment": segment,
        "member_id": member_id,
        "viewing_rate": 0.9,
        "watched_seconds": 3000.0,
        "chats": 1,
        "product_ids": "",
        "question_id": "",
        "answer": "",
    }
    row.update(overrides)
    return row


def load(store: Warehouse, **tables: list[dict]) -> None:
    """Add rows to warehouse tables (broadcasts, members, products, orders, followup_audience)."""
    for name, rows in tables.items():
        frame = pd.DataFrame(rows)
        existing = store.read(name)
        keys = list(dict.fromkeys(store.table(name).primary_key.columns.keys()))
        combined = pd.concat([existing, frame], ignore_index=True) if len(existing) else frame
        combined = combined.drop_duplicates(keys, keep="last")
        if name not in PARTITIONED_BY_BROADCAST:
            store.replace_table(name, combined)
            continue
        for broadcast_id, rows_of_broadcast in combined.groupby("broadcast_id"):
            store.replace_partition(name, str(broadcast_id), rows_of_broadcast)


def order(order_id: str, member_id: str, paid_at: dt.datetime, status: str = "paid") -> dict:
    return {
        "order_id": order_id,
        "line_no": 1,
        "member_id": member_id,
        "ordered_at": paid_at,
        "paid_at": paid_at,
        "status": status,
        "product_id": "P-1",
        "quantity": 1,
        "unit_price": 3000,
        "refund_of": None,
    }


class Harness:
    """A warehouse, an outbox folder and a Dagster instance to run `followup_sends` in."""

    def __init__(self, tmp_path: Path, url: str | None = None, scenarios: str = "", **channels):
        self.url = url or f"sqlite:///{tmp_path / 'warehouse.db'}"
        self.store = Warehouse(self.url)
        self.outbox = tmp_path / "outbox"
        self.scenarios_path = scenarios
        self.channels = FollowupChannelsResource(outbox_dir=str(self.outbox), **channels)
        self.instance = dg.DagsterInstance.ephemeral()

    @property
    def ledger(self) -> SendLedger:
        return SendLedger(self.store.engine)

    def resources(self, now: str = "") -> dict:
        return {
            "warehouse": WarehouseResource(url=self.url),
            "shop_settings": ShopSettingsResource(),
            "followup_scenarios": FollowupScenariosResource(path=self.scenarios_path),
            "followup_channels": self.channels,
            "followup_clock": FollowupClockResource(now=now),
        }

    def run(self, broadcast_id: str, step_id: str, now: dt.datetime, dry_run: bool = False):
        """Materialize one (broadcast, step) partition; return its materialization metadata."""
        self.instance.add_dynamic_partitions("broadcast", [broadcast_id])
        result = dg.materialize(
            [followup_sends],
            partition_key=dg.MultiPartitionKey({"broadcast": broadcast_id, "step": step_id}),
            instance=self.instance,
            resources=self.resources(),
            run_config=dg.RunConfig(
                ops={"followup_sends": FollowupSendConfig(now=now.isoformat(), dry_run=dry_run)}
            ),
        )
        assert result.success
        (materialization,) = result.asset_materializations_for_node("followup_sends")
        return {key: value.value for key, value in materialization.metadata.items()}

    def outbox_members(self, broadcast_id: str, step_id: str) -> list[str]:
        path = self.outbox / broadcast_id / f"{step_id}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line)["member_id"] for line in path.read_text().splitlines()]

    def ledger_rows(self, broadcast_id: str | None = None) -> pd.DataFrame:
        rows = self.ledger.read()
        if broadcast_id is not None:
            rows = rows.loc[rows["broadcast_id"] == broadcast_id]
        return rows.sort_values(["broadcast_id", "step_id", "member_id"]).reset_index(drop=True)


def tick(harness: Harness, now: dt.datetime, cursor: str | None):
    """Evaluate the due-step sensor at `now`, run what it requests; return (requests, cursor)."""
    from livecrm_dagster.defs.followups.assets import due_followup_steps

    context = dg.build_sensor_context(
        instance=harness.instance, cursor=cursor, resources=harness.resources(now.isoformat())
    )
    result = due_followup_steps(context)
    requests = list(result.run_requests or [])
    for request in requests:
        harness.run(request.tags["livecrm/broadcast"], request.tags["livecrm/step"], now)
    return requests, result.cursor


def hot_member_broadcast(harness: Harness, broadcast_id: str, ends: str, member_id: str) -> None:
    """Add a one-hour broadcast ending at `ends` (shop time) with one hot non-buyer."""
    ends_at = tokyo(ends)
    starts = (ends_at - dt.timedelta(hours=1)).strftime("%Y-%m-%d %H:%M")
    load(
        harness.store,
        broadcasts=[
            broadcast(
                broadcast_id,
                starts,
                ends,
                featured_product_ids="P-1",
                next_broadcast_at=ends_at + dt.timedelta(days=14),
            )
        ],
        members=[member(member_id)],
        products=[
            {
                "product_id": "P-1",
                "name": "Serum",
                "category": "skincare",
                "stock": 3,
                "low_stock_threshold": 5,
                "detail_url": "https://shop.example.test/p/P-1",
                "reviews_url": "https://shop.example.test/r/P-1",
                "trial_product_id": None,
            }
        ],
        followup_audience=[audience_row(broadcast_id, "hot", member_id)],
    )
    harness.instance.add_dynamic_partitions("broadcast", [broadcast_id])


def dst_day_instants(harness: Harness) -> dict[str, list[tuple]]:
    """Run b006, which ends 2024-03-10 18:30 shop time (the day US clocks moved forward).

    Returns, per step with a ledger row, the sensor ticks that requested it and the
    ledger's due and sent instants.
    """
    hot_member_broadcast(harness, "b006", "2024-03-10 18:30", "m009")
    expected_ticks = [
        "2024-03-10T11:30:00+00:00",
        "2024-03-11T00:00:00+00:00",
        "2024-03-13T09:30:00+00:00",
        "2024-03-17T09:30:00+00:00",
    ]
    cursor = None
    requested: dict[str, list[str]] = {}
    for text in expected_ticks:
        instant = dt.datetime.fromisoformat(text)
        for now in (instant - dt.timedelta(minutes=1), instant):
            requests, cursor = tick(harness, now, cursor)
            for request in requests:
                requested.setdefault(request.tags["livecrm/step"], []).append(now.isoformat())
    rows = harness.ledger_rows()
    return {
        step_id: (
            requested.get(step_id),
            [t.isoformat() for t in rows.loc[rows["step_id"] == step_id, "due_at"]],
            [t.isoformat() for t in rows.loc[rows["step_id"] == step_id, "sent_at"]],
        )
        for step_id in sorted(set(rows["step_id"]))
    }


DST_DAY_EXPECTED = {
    "hot_thanks_coupon": (
        ["2024-03-10T11:30:00+00:00"],
        ["2024-03-10T11:30:00+00:00"],
        ["2024-03-10T11:30:00+00:00"],
    ),
    "hot_archive": (
        ["2024-03-11T00:00:00+00:00"],
        ["2024-03-11T00:00:00+00:00"],
        ["2024-03-11T00:00:00+00:00"],
    ),
    "hot_low_stock": (
        ["2024-03-13T09:30:00+00:00"],
        ["2024-03-13T09:30:00+00:00"],
        ["2024-03-13T09:30:00+00:00"],
    ),
    "hot_next_live": (
        ["2024-03-17T09:30:00+00:00"],
        ["2024-03-17T09:30:00+00:00"],
        ["2024-03-17T09:30:00+00:00"],
    ),
}
