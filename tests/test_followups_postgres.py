"""Follow-up sends against the real PostgreSQL server on 127.0.0.1."""

import datetime as dt
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from werkzeug import Request, Response

from tests.test_followups_channels import SECRET, scenarios_with_channels
from tests.test_followups_support import (
    DST_DAY_EXPECTED,
    Harness,
    audience_row,
    broadcast,
    dst_day_instants,
    load,
    member,
    tokyo,
)

REPO = Path(__file__).resolve().parents[1]

CONCURRENT_RUN = """
import json, sys, time
from pathlib import Path
from tests.test_followups_support import Harness, tokyo

tmp, url, scenarios, hook, secret, start_at = sys.argv[1:7]
harness = Harness(Path(tmp), url, scenarios, webhook_url=hook, webhook_secret=secret)
# Both processes have imported Dagster by now; start the runs at the same instant.
time.sleep(max(0.0, float(start_at) - time.time()))
metadata = harness.run("b018", "hot_next_live", tokyo("2024-06-17 20:00"))
print(json.dumps({"sent": metadata["sent"], "skipped": metadata["skipped_by_reason"]}))
"""


@pytest.fixture(scope="session")
def httpserver_listen_address():
    return ("127.0.0.1", 0)


def test_concurrent_runs_send_each_member_once(httpserver, postgres_url, tmp_path):
    """Two runs of one step at once, then a re-execution; 50 members, 50 requests."""
    requests: list[str] = []

    def receive(request: Request) -> Response:
        requests.append(request.headers["Idempotency-Key"])
        return Response("{}", 200)

    httpserver.expect_request("/hook", method="POST").respond_with_handler(receive)
    scenarios = scenarios_with_channels(tmp_path, hot_next_live="webhook")
    harness = Harness(
        tmp_path,
        url=postgres_url,
        scenarios=scenarios,
        webhook_url=httpserver.url_for("/hook"),
        webhook_secret=SECRET,
    )
    members = [f"m{n:03d}" for n in range(100, 150)]
    load(
        harness.store,
        broadcasts=[
            broadcast(
                "b018",
                "2024-06-10 17:00",
                "2024-06-10 20:00",
                next_broadcast_at=tokyo("2024-06-24 20:00"),
            )
        ],
        members=[member(m) for m in members],
        followup_audience=[audience_row("b018", "hot", m) for m in members],
    )
    start_at = str(time.time() + 6)
    args = [str(tmp_path), postgres_url, scenarios, httpserver.url_for("/hook"), SECRET, start_at]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CONCURRENT_RUN), *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = []
    for child in children:
        stdout, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr[-2000:]
        outcomes.append(json.loads(stdout.strip().splitlines()[-1]))

    assert sorted(outcomes, key=lambda o: o["sent"]) == [
        {"sent": 0, "skipped": {"already_sent": 50}},
        {"sent": 50, "skipped": {}},
    ]
    assert len(requests) == 50
    assert len(set(requests)) == 50
    rows = harness.ledger_rows("b018")
    assert len(rows) == 50
    assert (rows["status"] == "sent").all()

    again = harness.run("b018", "hot_next_live", tokyo("2024-06-17 20:00"))
    assert again["sent"] == 0
    assert again["skipped_by_reason"] == {"already_sent": 50}
    assert len(requests) == 50


def test_database_session_time_zone_does_not_matter(postgres_url, tmp_path):
    """A PostgreSQL session in America/New_York stores and returns the same instants."""
    url = f"{postgres_url}?options=-c%20timezone%3DAmerica/New_York"
    harness = Harness(tmp_path, url=url)
    with harness.store.engine.connect() as connection:
        zone = connection.execute(sa.text("SELECT current_setting('TimeZone')")).scalar()
    assert zone == "America/New_York"
    assert dst_day_instants(harness) == DST_DAY_EXPECTED
    harness.store.engine.dispose()


def test_ledger_claims_respect_offer_and_cap(warehouse_url):
    """The partial unique indexes stop a second in-flight row for one offer or cap slot."""
    from livecrm_dagster.defs.followups.ledger import SendLedger, ledger_key
    from livecrm_dagster.warehouse import Warehouse

    ledger = SendLedger(Warehouse(warehouse_url).engine)
    now = tokyo("2024-06-10 20:00")
    lease = dt.timedelta(minutes=10)
    rows = [
        {
            "idempotency_key": ledger_key("b1", step, "m1", "outbox"),
            "broadcast_id": "b1",
            "step_id": step,
            "member_id": "m1",
            "channel": "outbox",
            "segment": "hot",
        }
        for step in ("s1", "s2", "s3")
    ]
    ledger.insert_planned(rows, now)
    ledger.insert_planned(rows, now + lease)
    keys = [row["idempotency_key"] for row in rows]
    day = ["2024-06-10#1"]

    assert ledger.claim(keys[0], "run-a", now, lease, "b1:coupon", day).outcome == "claimed"
    assert ledger.claim(keys[0], "run-b", now, lease, "b1:coupon", day).outcome == (
        "in_flight_or_sent"
    )
    assert ledger.claim(keys[1], "run-b", now, lease, "b1:coupon", day).outcome == (
        "duplicate_offer"
    )
    assert ledger.claim(keys[2], "run-b", now, lease, None, day).outcome == "frequency_cap"
    two_slots = ["2024-06-10#1", "2024-06-10#2"]
    assert ledger.claim(keys[2], "run-b", now, lease, None, two_slots).outcome == "claimed"

    # A run that lost its claim to a takeover cannot overwrite the newer outcome.
    later = now + 2 * lease
    assert ledger.claim(keys[0], "run-c", later, lease, "b1:coupon", day).outcome == "claimed"
    ledger.mark_failed([keys[0]], "run-a", later, "late answer")
    ledger.mark_sent([keys[0]], "run-c", later, "req-1")
    row = ledger.read().set_index("step_id").loc["s1"]
    assert (row["status"], row["request_id"], row["attempts"]) == ("sent", "req-1", 2)
    ledger.engine.dispose()
