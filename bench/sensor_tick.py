"""Time one tick of the follow-up sensor with many broadcast partitions and a large ledger.

The warehouse gets `--broadcasts` broadcasts, one ending every `--spacing-hours`, and
`--ledger-rows` send-ledger rows spread over them; the Dagster instance gets a partition
per broadcast. The sensor `due_followup_steps` is then evaluated twice at the same
instant: the first tick requests every due step, the second (with the first tick's
cursor) requests nothing. Each tick is timed over `--repeat` evaluations.

    .venv/bin/python bench/sensor_tick.py --broadcasts 1000 --ledger-rows 1000000
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import statistics
import time
import uuid

import dagster as dg
import numpy as np
import pandas as pd
import psycopg
import sqlalchemy as sa

from livecrm_dagster.defs.followups.assets import due_followup_steps
from livecrm_dagster.defs.followups.ledger import SendLedger, send_ledger
from livecrm_dagster.defs.followups.resources import (
    FollowupClockResource,
    FollowupScenariosResource,
)
from livecrm_dagster.resources import ShopSettingsResource, WarehouseResource

SERVER = "postgresql://root@127.0.0.1:5432"


def _broadcasts(count: int, now: dt.datetime, spacing_hours: float) -> pd.DataFrame:
    ends = [now - dt.timedelta(hours=spacing_hours * n) for n in range(count)]
    return pd.DataFrame(
        {
            "broadcast_id": [f"b{n:05d}" for n in range(count)],
            "title": "benchmark broadcast",
            "starts_at": [end - dt.timedelta(hours=1) for end in ends],
            "ends_at": ends,
            "featured_product_ids": "",
            "archive_url": "",
        }
    )


def _copy_ledger(url: str, broadcast_ids: list[str], rows: int, now: dt.datetime) -> None:
    """Bulk-load sent ledger rows with COPY (a test fixture, not the product's write path)."""
    rng = np.random.default_rng(7)
    broadcasts = rng.choice(broadcast_ids, size=rows)
    members = rng.integers(0, 200_000, size=rows)
    frame = pd.DataFrame(
        {
            "broadcast_id": broadcasts,
            "step_id": "mid_archive",
            "member_id": [f"m{n}-{i}" for i, n in enumerate(members)],
            "channel": "outbox",
            "idempotency_key": [str(uuid.UUID(int=i + 1)) for i in range(rows)],
            "status": "sent",
            "attempts": 1,
            "sent_at": now.isoformat(),
            "updated_at": now.isoformat(),
        }
    )
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, header=False)
    columns = ", ".join(frame.columns)
    with psycopg.connect(url.replace("+psycopg", "")) as connection:
        with connection.cursor().copy(
            f"COPY send_ledger ({columns}) FROM STDIN (FORMAT csv)"
        ) as copy:
            copy.write(buffer.getvalue())


def _tick_seconds(context_factory, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        context = context_factory()
        started = time.perf_counter()
        result = due_followup_steps(context)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broadcasts", type=int, default=1000, help="broadcast partitions")
    parser.add_argument("--ledger-rows", type=int, default=1_000_000, help="send-ledger rows")
    parser.add_argument("--spacing-hours", type=float, default=6.0, help="hours between ends")
    parser.add_argument("--repeat", type=int, default=5, help="evaluations per timed tick")
    args = parser.parse_args()

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://root@127.0.0.1:5432/{name}"
    try:
        now = dt.datetime(2024, 6, 30, 3, 0, tzinfo=dt.UTC)  # 12:00 in Tokyo: no quiet hours
        warehouse = WarehouseResource(url=url)
        store = warehouse.get()
        schedule = _broadcasts(args.broadcasts, now, args.spacing_hours)
        store.replace_table("broadcasts", schedule)
        SendLedger(store.engine)
        loading = time.perf_counter()
        _copy_ledger(url, schedule["broadcast_id"].tolist(), args.ledger_rows, now)
        loaded = time.perf_counter() - loading
        with store.engine.connect() as connection:
            count = connection.execute(
                sa.select(sa.func.count()).select_from(send_ledger)
            ).scalar_one()

        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("broadcast", schedule["broadcast_id"].tolist())
            resources = {
                "warehouse": warehouse,
                "shop_settings": ShopSettingsResource(),
                "followup_scenarios": FollowupScenariosResource(),
                "followup_clock": FollowupClockResource(now=now.isoformat()),
            }

            def first_context():
                return dg.build_sensor_context(instance=instance, resources=resources)

            first_time, first = _tick_seconds(first_context, args.repeat)

            def next_context():
                return dg.build_sensor_context(
                    instance=instance, resources=resources, cursor=first.cursor
                )

            next_time, following = _tick_seconds(next_context, args.repeat)
    finally:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    requested = len(first.run_requests)
    print(
        f"broadcast partitions: {args.broadcasts:,}; ledger rows: {count:,} "
        f"(loaded with COPY in {loaded:.1f} s); PostgreSQL warehouse"
    )
    print(f"first tick: {first_time:.3f} s (median of {args.repeat}), {requested} run requests")
    print(
        f"next tick:  {next_time:.3f} s (median of {args.repeat}), "
        f"{len(following.run_requests or [])} run requests"
    )
    print(f"target under 1 s: {'met' if max(first_time, next_time) < 1 else 'not met'}")


if __name__ == "__main__":
    main()
