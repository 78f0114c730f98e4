"""Channels against mocks started on 127.0.0.1: LINE, a signed webhook and SMTP."""

import csv
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from aiosmtpd.controller import Controller
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest
from werkzeug import Request, Response

from livecrm_dagster.defs.followups.channels.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    verify,
)
from livecrm_dagster.defs.followups.ledger import KEY_NAMESPACE, ledger_key
from livecrm_dagster.defs.followups.scenarios import DEFAULT_SCENARIOS_PATH
from tests.test_followups_support import (
    Harness,
    audience_row,
    broadcast,
    load,
    member,
    tokyo,
)

TOKEN = "test-channel-token-0123456789"
SECRET = "test-webhook-secret"
REPO = Path(__file__).resolve().parents[1]
# LINE's own OpenAPI document of the Messaging API, kept in the shared folder beside the repo.
LINE_SPEC = Path(__file__).parent / "specs" / "line-openapi" / "messaging-api.yml"


def scenarios_with_channels(tmp_path: Path, **channels: str) -> str:
    """Write the default scenarios with some steps moved to other channels."""
    settings = yaml.safe_load(DEFAULT_SCENARIOS_PATH.read_text())
    for scenario in settings["scenarios"].values():
        for step in scenario["steps"]:
            if step["id"] in channels:
                step["channel"] = channels[step["id"]]
    path = tmp_path / "scenarios.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


@pytest.fixture(scope="session")
def httpserver_listen_address():
    return ("127.0.0.1", 0)


class LineMock:
    """A LINE Messaging API stand-in that validates bodies against LINE's OpenAPI document,
    remembers accepted retry keys and responds to their repeats with 409."""

    def __init__(self, httpserver):
        spec = yaml.safe_load(LINE_SPEC.read_text())
        spec["servers"] = [{"url": httpserver.url_for("").rstrip("/")}]
        self.api = OpenAPI.from_dict(spec)
        self.requests: list[dict] = []
        self.accepted: dict[str, str] = {}
        self.delivered: list[object] = []
        # Behaviour of the next requests, in order: "slow" (accept, respond late) or "429".
        self.plan: list[str] = []
        self.lock = threading.Lock()
        for path in ("/v2/bot/message/push", "/v2/bot/message/multicast"):
            httpserver.expect_request(path, method="POST").respond_with_handler(self.handle)

    def handle(self, request: Request) -> Response:
        self.api.validate_request(WerkzeugOpenAPIRequest(request))
        key = request.headers.get("X-Line-Retry-Key")
        body = request.get_json()
        with self.lock:
            self.requests.append(
                {
                    "path": request.path,
                    "key": key,
                    "to": body["to"],
                    "auth": request.headers.get("Authorization"),
                    "at": time.monotonic(),
                }
            )
            action = self.plan.pop(0) if self.plan else "ok"
            if action == "429":
                return Response('{"message": "rate limited"}', 429, {"Retry-After": "1"})
            if action == "500":
                return Response('{"message": "internal error"}', 500)
            if key in self.accepted:
                headers = {"x-line-accepted-request-id": self.accepted[key]}
                return Response('{"message": "already accepted"}', 409, headers)
            request_id = str(uuid.uuid4())
            self.accepted[key] = request_id
            self.delivered.append(body["to"])
        if action == "slow":
            # Longer than the client's 0.5 s timeout. The retry waits behind this
            # single-threaded server and still gets its response within its own timeout.
            time.sleep(0.7)
        return Response(
            json.dumps({"sentMessages": [{"id": "1", "quoteToken": "q"}]}),
            200,
            {"x-line-request-id": request_id, "Content-Type": "application/json"},
        )


@pytest.fixture
def line(httpserver, tmp_path):
    mock = LineMock(httpserver)
    harness = Harness(
        tmp_path,
        scenarios=scenarios_with_channels(
            tmp_path, hot_thanks_coupon="line", mid_archive="line_multicast"
        ),
        line_base_url=httpserver.url_for("").rstrip("/"),
        line_token=TOKEN,
        http_timeout_seconds=0.5,
        http_retries=2,
        http_backoff_seconds=0,
    )
    load(
        harness.store,
        broadcasts=[broadcast("b028", "2024-06-10 17:00", "2024-06-10 18:00")],
        members=[member("m025")],
        followup_audience=[audience_row("b028", "hot", "m025")],
    )
    return mock, harness


def test_line_push_timeout_then_409(line):
    """A push whose response is lost is retried with one key, and 409 counts as sent."""
    mock, harness = line
    mock.plan = ["slow"]
    metadata = harness.run("b028", "hot_thanks_coupon", tokyo("2024-06-10 20:00"))
    key = ledger_key("b028", "hot_thanks_coupon", "m025", "line")
    assert str(uuid.UUID(key)) == key
    assert uuid.UUID(key).version == 5
    assert uuid.uuid5(KEY_NAMESPACE, "b028\x1fhot_thanks_coupon\x1fm025\x1fline") == uuid.UUID(key)
    assert [r["key"] for r in mock.requests] == [key, key]
    assert len(mock.delivered) == 1
    assert metadata["sent"] == 1
    row = harness.ledger_rows().iloc[0]
    assert row["status"] == "sent"
    assert row["request_id"] == mock.accepted[key]
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in mock.requests)
    # Neither the token nor the LINE user ID reaches the run's logs or metadata.
    texts = [str(entry.user_message) for entry in harness.instance.all_logs(_last_run(harness))]
    texts.append(json.dumps(metadata, default=str))
    assert not [t for t in texts if TOKEN in t or "Um025" in t or "@example" in t]


def _last_run(harness: Harness) -> str:
    (run,) = harness.instance.get_runs(limit=1)
    return run.run_id


def test_line_429_honours_retry_after(line):
    mock, harness = line
    mock.plan = ["429"]
    harness.run("b028", "hot_thanks_coupon", tokyo("2024-06-10 20:00"))
    assert len(mock.requests) == 2
    assert mock.requests[1]["at"] - mock.requests[0]["at"] >= 1.0
    assert mock.requests[0]["key"] == mock.requests[1]["key"]
    assert harness.ledger_rows().at[0, "status"] == "sent"


def test_line_500_retried_with_same_key(line):
    mock, harness = line
    mock.plan = ["500"]
    metadata = harness.run("b028", "hot_thanks_coupon", tokyo("2024-06-10 20:00"))
    assert metadata["sent"] == 1
    assert len(mock.requests) == 2
    assert mock.requests[0]["key"] == mock.requests[1]["key"]
    assert len(mock.delivered) == 1


def test_line_multicast_batches_of_500(line):
    """1,201 members go out in batches of 500, 500 and 201. A batch that timed out is
    retried with the same member list under the same key."""
    mock, harness = line
    members = [f"x{n:04d}" for n in range(1201)]
    load(
        harness.store,
        members=[member(m) for m in members],
        followup_audience=[audience_row("b028", "mid", m) for m in members],
    )
    mock.plan = ["slow"]
    metadata = harness.run("b028", "mid_archive", tokyo("2024-06-11 18:00"))
    assert metadata["sent"] == 1201
    sizes = [len(r["to"]) for r in mock.requests]
    assert sizes == [500, 500, 500, 201]
    assert mock.requests[0]["to"] == mock.requests[1]["to"]
    assert mock.requests[0]["key"] == mock.requests[1]["key"]
    assert len({r["key"] for r in mock.requests}) == 3
    assert sorted(u for batch in mock.delivered for u in batch) == [f"U{m}" for m in members]
    assert {r["path"] for r in mock.requests} == {"/v2/bot/message/multicast"}
    rows = harness.ledger_rows()
    assert rows["batch_key"].nunique() == 3
    assert (rows["status"] == "sent").all()


KILL_SCRIPT = """
import os, signal, sys
import requests.adapters
from tests.test_followups_support import Harness, tokyo

original = requests.adapters.HTTPAdapter.send

def send_then_die(self, request, **kwargs):
    if {after}:
        original(self, request, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

requests.adapters.HTTPAdapter.send = send_then_die
harness = Harness(*{harness_args})
harness.run({broadcast!r}, {step!r}, tokyo({now!r}))
"""


def run_killed(tmp_path: Path, harness: Harness, broadcast: str, step: str, now: str, after: bool):
    """Run a step in a child process that is SIGKILLed just before or after its first request."""
    channels = harness.channels.model_dump()
    channels.pop("outbox_dir")
    args = f"(__import__('pathlib').Path({str(tmp_path)!r}), None, {harness.scenarios_path!r})"
    script = KILL_SCRIPT.format(
        after=after, harness_args=args, broadcast=broadcast, step=step, now=now
    )
    script = script.replace(
        "harness = Harness(*" + args + ")", f"harness = Harness(*{args}, **{channels!r})"
    )
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # A negative return code is the signal that ended the child.
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]


def test_line_killed_after_request_rerun_gets_409(line, tmp_path):
    """The re-run after a crash reuses the key, gets 409 and records the row as sent."""
    mock, harness = line
    run_killed(tmp_path, harness, "b028", "hot_thanks_coupon", "2024-06-10 20:00", after=True)
    assert len(mock.requests) == 1
    assert harness.ledger_rows().at[0, "status"] == "sending"
    # Within the lease the row may still belong to a live run, so nothing is sent.
    soon = harness.run("b028", "hot_thanks_coupon", tokyo("2024-06-10 20:05"))
    assert soon["skipped_by_reason"] == {"in_flight": 1}
    assert len(mock.requests) == 1
    later = harness.run("b028", "hot_thanks_coupon", tokyo("2024-06-10 20:11"))
    assert later["sent"] == 1
    assert [r["key"] for r in mock.requests] == [mock.requests[0]["key"]] * 2
    assert len(mock.delivered) == 1
    row = harness.ledger_rows().iloc[0]
    assert row["status"] == "sent"
    assert row["request_id"] == mock.accepted[mock.requests[0]["key"]]


def test_line_multicast_takeover_resends_batches(line, tmp_path):
    """A multicast run dies after its first request. The run that takes the rows over sends
    each recorded batch again, with its key and member list, and LINE delivers each once."""
    mock, harness = line
    members = [f"x{n:04d}" for n in range(1201)]
    load(
        harness.store,
        members=[member(m) for m in members],
        followup_audience=[audience_row("b028", "mid", m) for m in members],
    )
    run_killed(tmp_path, harness, "b028", "mid_archive", "2024-06-11 18:00", after=True)
    assert len(mock.requests) == 1
    first = mock.requests[0]
    rows = harness.ledger_rows()
    rows = rows.loc[rows["step_id"] == "mid_archive"]
    assert (rows["status"] == "sending").all()
    recorded = rows.groupby("batch_key")["member_id"].apply(sorted).to_dict()
    assert sorted(map(len, recorded.values())) == [201, 500, 500]
    assert first["key"] in recorded

    later = harness.run("b028", "mid_archive", tokyo("2024-06-11 18:11"))

    assert later["sent"] == 1201
    resent = {r["key"]: r["to"] for r in mock.requests[1:]}
    assert len(mock.requests) == 4
    assert resent[first["key"]] == first["to"]
    assert {key: sorted(to) for key, to in resent.items()} == {
        key: sorted(f"U{m}" for m in batch) for key, batch in recorded.items()
    }
    assert sorted(u for batch in mock.delivered for u in batch) == [f"U{m}" for m in members]
    rows = harness.ledger_rows()
    assert (rows.loc[rows["step_id"] == "mid_archive", "status"] == "sent").all()


class WebhookMock:
    """A webhook receiver that checks the signature and de-duplicates on Idempotency-Key."""

    def __init__(self, httpserver):
        self.requests: list[dict] = []
        self.failing = False
        httpserver.expect_request("/hook", method="POST").respond_with_handler(self.handle)
        self.url = httpserver.url_for("/hook")

    def handle(self, request: Request) -> Response:
        body = request.get_data()
        valid = verify(
            SECRET,
            request.headers[TIMESTAMP_HEADER],
            body,
            request.headers[SIGNATURE_HEADER],
        )
        payload = json.loads(body)
        self.requests.append(
            {"key": request.headers["Idempotency-Key"], "member_id": payload["member_id"]}
        )
        if not valid:
            return Response("bad signature", 401)
        if self.failing:
            return Response("unavailable", 500)
        self.failing = self.fail_after_first
        return Response("{}", 200, {"X-Request-Id": f"req-{len(self.requests)}"})

    fail_after_first = False


@pytest.fixture
def webhook(httpserver, tmp_path):
    mock = WebhookMock(httpserver)
    harness = Harness(
        tmp_path,
        scenarios=scenarios_with_channels(tmp_path, clicked_detail="webhook"),
        webhook_url=mock.url,
        webhook_secret=SECRET,
        http_timeout_seconds=2,
        http_retries=1,
        http_backoff_seconds=0,
    )
    load(
        harness.store,
        broadcasts=[broadcast("b019", "2024-06-10 17:00", "2024-06-10 18:00")],
        members=[member("m030"), member("m031"), member("m032")],
        products=[
            {
                "product_id": p,
                "name": p,
                "category": "c",
                "stock": 9,
                "low_stock_threshold": 1,
                "detail_url": f"https://shop.example.test/p/{p}",
                "reviews_url": "",
                "trial_product_id": None,
            }
            for p in ("P-1", "P-2", "P-9")
        ],
        followup_audience=[
            audience_row("b019", "clicked_not_bought", "m030", product_ids="P-1"),
            audience_row("b019", "clicked_not_bought", "m031", product_ids="P-9"),
            audience_row("b019", "clicked_not_bought", "m032", product_ids="P-2"),
        ],
    )
    return mock, harness


def test_webhook_signed_and_keyed(webhook):
    mock, harness = webhook
    metadata = harness.run("b019", "clicked_detail", tokyo("2024-06-11 18:00"))
    assert metadata["sent"] == 3
    assert [r["member_id"] for r in mock.requests] == ["m030", "m031", "m032"]
    assert [r["key"] for r in mock.requests] == [
        ledger_key("b019", "clicked_detail", m, "webhook") for m in ("m030", "m031", "m032")
    ]
    assert list(harness.ledger_rows()["request_id"]) == ["req-1", "req-2", "req-3"]


def test_webhook_failure_midway_then_recovery(webhook):
    """A receiver fails after the first request, and the re-run sends only the rest."""
    mock, harness = webhook
    mock.fail_after_first = True
    first = harness.run("b019", "clicked_detail", tokyo("2024-06-11 18:00"))
    assert (first["sent"], first["failed"]) == (1, 2)
    rows = harness.ledger_rows().set_index("member_id")
    assert list(rows["status"]) == ["sent", "failed", "failed"]
    assert rows.at["m031", "error"] == "webhook returned HTTP 500"
    mock.failing = False
    mock.fail_after_first = False
    seen = len(mock.requests)
    second = harness.run("b019", "clicked_detail", tokyo("2024-06-11 18:30"))
    assert [r["member_id"] for r in mock.requests[seen:]] == ["m031", "m032"]
    assert second["sent"] == 2
    assert second["skipped_by_reason"] == {"already_sent": 1}
    assert list(harness.ledger_rows()["status"]) == ["sent", "sent", "sent"]


def test_webhook_killed_before_request_sends_once(webhook, tmp_path):
    """A run killed after the ledger write and before the HTTP call: no duplicate."""
    mock, harness = webhook
    run_killed(tmp_path, harness, "b019", "clicked_detail", "2024-06-11 18:00", after=False)
    assert mock.requests == []
    rows = harness.ledger_rows()
    # Every member is claimed before the first request, so all three rows wait for the lease.
    assert list(rows["status"]) == ["sending", "sending", "sending"]
    soon = harness.run("b019", "clicked_detail", tokyo("2024-06-11 18:05"))
    assert soon["skipped_by_reason"] == {"in_flight": 3}
    assert mock.requests == []
    again = harness.run("b019", "clicked_detail", tokyo("2024-06-11 18:20"))
    assert again["sent"] == 3
    assert [r["member_id"] for r in mock.requests] == ["m030", "m031", "m032"]
    assert len({r["key"] for r in mock.requests}) == 3


class Inbox:
    def __init__(self):
        self.messages: list[tuple[list[str], str]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.messages.append((list(envelope.rcpt_tos), envelope.content.decode()))
        return "250 OK"


def test_email_over_smtp(tmp_path):
    inbox = Inbox()
    # aiosmtpd's Controller connects to its own port to check readiness, so it needs a
    # concrete port rather than 0.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        harness = Harness(
            tmp_path,
            scenarios=scenarios_with_channels(tmp_path, mid_archive="email"),
            smtp_host="127.0.0.1",
            smtp_port=port,
            smtp_from="shop@example.test",
        )
        load(
            harness.store,
            broadcasts=[broadcast("b040", "2024-06-10 17:00", "2024-06-10 18:00")],
            members=[member("m050"), member("m051", email=None)],
            followup_audience=[audience_row("b040", "mid", m) for m in ("m050", "m051")],
        )
        metadata = harness.run("b040", "mid_archive", tokyo("2024-06-11 18:00"))
    finally:
        controller.stop()
    assert metadata["sent"] == 1
    assert metadata["skipped_by_reason"] == {"no_address": 1}
    ((recipients, content),) = inbox.messages
    assert recipients == ["m050@example.test"]
    key = ledger_key("b040", "mid_archive", "m050", "email")
    assert f"Message-ID: <{key}@livecrm>" in content
    assert "Subject: Watch Live b040 again" in content
    assert (
        harness.ledger_rows().set_index("member_id").at["m050", "request_id"] == f"<{key}@livecrm>"
    )


def test_email_server_down_marks_failed(tmp_path):
    harness = Harness(
        tmp_path,
        scenarios=scenarios_with_channels(tmp_path, mid_archive="email"),
        smtp_host="127.0.0.1",
        smtp_port=9,
        smtp_from="shop@example.test",
    )
    load(
        harness.store,
        broadcasts=[broadcast("b041", "2024-06-10 17:00", "2024-06-10 18:00")],
        members=[member("m052")],
        followup_audience=[audience_row("b041", "mid", "m052")],
    )
    metadata = harness.run("b041", "mid_archive", tokyo("2024-06-11 18:00"))
    assert metadata["failed"] == 1
    row = harness.ledger_rows().iloc[0]
    assert row["error"] == "SMTP send failed: ConnectionRefusedError"
    assert "@" not in row["error"]


def test_email_line_break_fails_member_alone(tmp_path):
    inbox = Inbox()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        harness = Harness(
            tmp_path,
            scenarios=scenarios_with_channels(tmp_path, mid_archive="email"),
            smtp_host="127.0.0.1",
            smtp_port=port,
            smtp_from="shop@example.test",
        )
        # m053's address would inject a header; m052 and m054 are sent around it.
        load(
            harness.store,
            broadcasts=[broadcast("b041", "2024-06-10 17:00", "2024-06-10 18:00")],
            members=[
                member("m052"),
                member("m053", email="m053@example.test\r\nBcc: everyone@example.test"),
                member("m054"),
            ],
            followup_audience=[audience_row("b041", "mid", m) for m in ("m052", "m053", "m054")],
        )
        metadata = harness.run("b041", "mid_archive", tokyo("2024-06-11 18:00"))
    finally:
        controller.stop()
    assert metadata["sent"] == 2
    assert metadata["failed"] == 1
    assert sorted(recipients[0] for recipients, _ in inbox.messages) == [
        "m052@example.test",
        "m054@example.test",
    ]
    rows = harness.ledger_rows().set_index("member_id")
    assert rows.at["m053", "status"] == "failed"
    assert "everyone" not in str(rows.at["m053", "error"])


def test_outbox_csv_neutralises_formulas(tmp_path):
    harness = Harness(tmp_path)
    # A member ID and a title that a spreadsheet would run as formulas.
    load(
        harness.store,
        broadcasts=[
            broadcast("b042", "2024-06-10 17:00", "2024-06-10 18:00", title='=HYPERLINK("x")')
        ],
        members=[member("+cmd|'/C calc'!A0")],
        followup_audience=[audience_row("b042", "mid", "+cmd|'/C calc'!A0")],
    )
    harness.run("b042", "mid_archive", tokyo("2024-06-11 18:00"))
    folder = tmp_path / "outbox" / "b042"
    rows = list(csv.DictReader((folder / "mid_archive.csv").open(encoding="utf-8")))
    (line,) = (folder / "mid_archive.jsonl").read_text(encoding="utf-8").splitlines()
    assert rows[0]["member_id"] == "'+cmd|'/C calc'!A0"
    assert json.loads(line)["member_id"] == "+cmd|'/C calc'!A0"


class DroppingPeer:
    """A raw HTTP peer on 127.0.0.1 that closes the first connections without answering.

    A dropped connection is the hard case for once-only sending: the request may or may
    not have been processed. The peer records every request's Idempotency-Key.
    """

    def __init__(self, drops: int, key_header: str = "Idempotency-Key"):
        self.drops = drops
        self.key_header = key_header
        self.keys: list[str] = []
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.base_url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.url = self.base_url + "/hook"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                request = self._read_request(connection)
                if request is None:
                    continue
                self.keys.append(request)
                if self.drops > 0:
                    self.drops -= 1
                    continue
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: ok\r\n"
                    b"Connection: close\r\n\r\n{}"
                )

    def _read_request(self, connection: socket.socket) -> str | None:
        connection.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        headers = dict(
            line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line
        )
        length = int(headers.get("Content-Length", "0"))
        while len(body) < length:
            body += connection.recv(65536)
        return headers.get(self.key_header, "")

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize(
    ("drops", "retries", "sent", "failed"),
    [
        (1, 1, 1, 0),  # one dropped connection, retried once with the same key: sent
        (2, 1, 0, 1),  # dropped again on the retry: failed, and the next run resends
    ],
)
def test_webhook_dropped_connection(tmp_path, drops, retries, sent, failed):
    peer = DroppingPeer(drops)
    try:
        harness = Harness(
            tmp_path,
            scenarios=scenarios_with_channels(tmp_path, mid_archive="webhook"),
            webhook_url=peer.url,
            webhook_secret=SECRET,
            http_timeout_seconds=2,
            http_retries=retries,
            http_backoff_seconds=0,
        )
        load(
            harness.store,
            broadcasts=[broadcast("b044", "2024-06-10 17:00", "2024-06-10 18:00")],
            members=[member("m063")],
            followup_audience=[audience_row("b044", "mid", "m063")],
        )
        first = harness.run("b044", "mid_archive", tokyo("2024-06-11 18:00"))
        second = harness.run("b044", "mid_archive", tokyo("2024-06-11 18:30"))
    finally:
        peer.close()
    key = ledger_key("b044", "mid_archive", "m063", "webhook")
    assert (first["sent"], first["failed"]) == (sent, failed)
    # Every attempt, across retries and runs, carries the same key for the receiver.
    assert set(peer.keys) == {key}
    # Each dropped attempt was followed by one more, until one was answered.
    assert len(peer.keys) == drops + 1
    assert harness.ledger_rows()["status"].tolist() == ["sent"]
    assert second["sent"] + first["sent"] == 1


def test_line_push_dropped_connection(tmp_path):
    peer = DroppingPeer(drops=1, key_header="X-Line-Retry-Key")
    try:
        harness = Harness(
            tmp_path,
            scenarios=scenarios_with_channels(tmp_path, mid_archive="line"),
            line_base_url=peer.base_url,
            line_token=TOKEN,
            http_timeout_seconds=2,
            http_retries=1,
            http_backoff_seconds=0,
        )
        load(
            harness.store,
            broadcasts=[broadcast("b045", "2024-06-10 17:00", "2024-06-10 18:00")],
            members=[member("m064")],
            followup_audience=[audience_row("b045", "mid", "m064")],
        )
        result = harness.run("b045", "mid_archive", tokyo("2024-06-11 18:00"))
    finally:
        peer.close()
    key = ledger_key("b045", "mid_archive", "m064", "line")
    assert result["sent"] == 1
    # The push was sent twice, both times under the ledger's retry key.
    assert peer.keys == [key, key]
