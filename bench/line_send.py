"""Time one follow-up step sent to many members through a LINE mock with multicast.

The mock listens on 127.0.0.1, responds to each request after `--latency-ms`, and records
every recipient. The step `mid_archive` is switched to the `line_multicast` channel
(batches of up to 500 user IDs) and run once with the product's `run_step` against a
fresh PostgreSQL warehouse on 127.0.0.1:5432. The timed run covers everything the step
does: it reads the audience, members and orders, decides, writes and claims the ledger
rows, records the batch keys, sends the requests and marks the rows sent. Before the rate
is printed, the run is checked: every member is delivered exactly once and every ledger
row is `sent`.

The frequency cap is off by default, as in the recorded figures. `--cap 1` runs with the
shipped default of one message per member and shop day, which adds the cap's ledger
reads and gives every claim a cap slot.

    .venv/bin/python bench/line_send.py --members 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import psycopg
import yaml

from livecrm_dagster.defs.followups.ledger import SendLedger
from livecrm_dagster.defs.followups.resources import FollowupChannelsResource
from livecrm_dagster.defs.followups.scenarios import load_scenarios, scenarios_path
from livecrm_dagster.defs.followups.send import run_step
from livecrm_dagster.settings import load_settings
from livecrm_dagster.warehouse import Warehouse

SERVER = "postgresql://root@127.0.0.1:5432"
BROADCAST = "b-bench"


class LineMock(BaseHTTPRequestHandler):
    latency_seconds = 0.005
    recipients: Counter = Counter()
    requests = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - the standard library's handler name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(self.latency_seconds)
        with self.lock:
            LineMock.requests += 1
            to = body["to"] if isinstance(body["to"], list) else [body["to"]]
            LineMock.recipients.update(to)
        payload = b"{}"
        self.send_response(200)
        self.send_header("x-line-request-id", str(uuid.uuid4()))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args):  # noqa: A002 - silence the per-request log
        return


def _fixture(store: Warehouse, members: int, ends_at: dt.datetime) -> None:
    ids = [f"m{n:07d}" for n in range(members)]
    store.replace_table(
        "broadcasts",
        pd.DataFrame(
            [
                {
                    "broadcast_id": BROADCAST,
                    "title": "benchmark",
                    "starts_at": ends_at - dt.timedelta(hours=1),
                    "ends_at": ends_at,
                    "archive_url": "https://shop.example/live/b-bench",
                }
            ]
        ),
    )
    store.replace_table(
        "members",
        pd.DataFrame(
            {
                "member_id": ids,
                "line_user_id": [f"U{n:032x}" for n in range(members)],
                "consent_line": True,
                "consent_email": True,
            }
        ),
    )
    store.replace_partition(
        "followup_audience",
        BROADCAST,
        pd.DataFrame({"segment": "mid", "member_id": ids, "question_id": ""}),
    )


def _scenarios(folder: Path, cap: int) -> str:
    raw = yaml.safe_load(scenarios_path(None).read_text(encoding="utf-8"))
    raw["frequency_cap"] = {"messages_per_shop_day": cap}
    for scenario in raw["scenarios"].values():
        for step in scenario["steps"]:
            if step["id"] == "mid_archive":
                step["channel"] = "line_multicast"
    path = folder / "scenarios.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100_000, help="members in the step")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="mock latency per request")
    parser.add_argument(
        "--cap",
        type=int,
        default=0,
        help="messages per member and shop day (the frequency cap), where 0 turns it off",
    )
    args = parser.parse_args()
    LineMock.latency_seconds = args.latency_ms / 1000

    server = ThreadingHTTPServer(("127.0.0.1", 0), LineMock)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        with tempfile.TemporaryDirectory() as folder:
            store = Warehouse(f"postgresql+psycopg://root@127.0.0.1:5432/{name}")
            ends_at = dt.datetime(2024, 6, 10, 9, 0, tzinfo=dt.UTC)
            _fixture(store, args.members, ends_at)
            settings = load_scenarios(_scenarios(Path(folder), args.cap))
            channels = FollowupChannelsResource(
                outbox_dir=folder,
                line_base_url=f"http://127.0.0.1:{server.server_address[1]}",
                line_token="benchmark-token",
            )
            now = ends_at + dt.timedelta(days=1)  # 18:00 in Tokyo, outside quiet hours
            started = time.perf_counter()
            result = run_step(
                store,
                settings,
                load_settings(),
                channels.channel,
                BROADCAST,
                "mid_archive",
                now,
                run_id="benchmark",
            )
            seconds = time.perf_counter() - started
            rows = SendLedger(store.engine).step_rows(BROADCAST, "mid_archive")
    finally:
        server.shutdown()
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    delivered = LineMock.recipients
    # Checked with `if`, not `assert`, so python -O cannot skip the once-only check.
    if result.sent != args.members or len(delivered) != args.members:
        raise SystemExit(f"the step did not reach every member exactly once: {result.counts()}")
    if max(delivered.values()) != 1:
        raise SystemExit("a member received the step more than once")
    if not (rows["status"] == "sent").all():
        raise SystemExit("some ledger rows are not marked sent")
    print(
        f"{args.members:,} members in {LineMock.requests:,} multicast requests "
        f"({args.latency_ms:g} ms latency each): {seconds:.1f} s, "
        f"{args.members / seconds:,.0f} members/s; each member delivered once, ledger all sent"
    )


if __name__ == "__main__":
    main()
