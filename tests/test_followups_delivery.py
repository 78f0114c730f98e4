"""Ledger marks written beside the requests, on SQLite and on the real PostgreSQL server."""

import time

import pytest
import sqlalchemy as sa

from livecrm_dagster.defs.followups.channels.email import EmailChannel
from livecrm_dagster.defs.followups.channels.line import LineChannel
from livecrm_dagster.defs.followups.channels.outbox import OutboxChannel
from livecrm_dagster.defs.followups.channels.webhook import WebhookChannel
from livecrm_dagster.defs.followups.delivery import _LedgerMarks
from livecrm_dagster.defs.followups.ledger import SendLedger
from livecrm_dagster.warehouse import Warehouse
from tests.test_followups_ledger import LEASE, NOW, keys, planned_rows, rows_by_member

MEMBERS = ["m0", "m1", "m2"]


@pytest.fixture
def claimed(warehouse_url):
    """A ledger with three rows of step s1 claimed by run-1."""
    ledger = SendLedger(Warehouse(warehouse_url).engine)
    ledger.insert_planned(planned_rows("s1", MEMBERS), NOW)
    ledger.claim_many(keys("s1", MEMBERS), "run-1", NOW, LEASE, None, [None])
    yield ledger
    ledger.engine.dispose()


def drop_ledger_table(ledger) -> None:
    """Make every later ledger write fail, as a database that went away would."""
    with ledger.engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE send_ledger"))


def test_marks_are_written_when_block_ends(claimed):
    with _LedgerMarks(claimed, "run-1", NOW) as marks:
        marks.sent(keys("s1", ["m0", "m1"]), "req-1")
        marks.failed(keys("s1", ["m2"]), "timed out")

    rows = rows_by_member(claimed, "s1")
    assert list(rows["status"]) == ["sent", "sent", "failed"]
    assert list(rows["request_id"].fillna("")) == ["req-1", "req-1", ""]
    assert rows.at["m2", "error"] == "timed out"


def test_failed_mark_raises_at_next_mark(claimed):
    drop_ledger_table(claimed)

    with pytest.raises(sa.exc.DBAPIError):
        with _LedgerMarks(claimed, "run-1", NOW) as marks:
            marks.sent(keys("s1", ["m0"]), "req-1")
            marks.sent(keys("s1", ["m1"]), "req-2")


def test_failed_mark_raises_when_block_ends(claimed):
    drop_ledger_table(claimed)

    with pytest.raises(sa.exc.DBAPIError):
        with _LedgerMarks(claimed, "run-1", NOW) as marks:
            marks.sent(keys("s1", ["m0"]), "req-1")


def test_marks_without_overlap_are_written_at_once(claimed):
    with _LedgerMarks(claimed, "run-1", NOW, overlap=False) as marks:
        marks.sent(keys("s1", ["m0"]), "req-1")
        status = rows_by_member(claimed, "s1")["status"]
        assert list(status) == ["sent", "sending", "sending"]


def test_failed_mark_without_overlap_raises_at_once(claimed):
    drop_ledger_table(claimed)

    with _LedgerMarks(claimed, "run-1", NOW, overlap=False) as marks:
        with pytest.raises(sa.exc.DBAPIError):
            marks.sent(keys("s1", ["m0"]), "req-1")


def test_only_email_waits_for_each_mark():
    assert OutboxChannel("unused").deduplicates_by_key
    assert LineChannel("token").deduplicates_by_key
    assert WebhookChannel("http://127.0.0.1:9/hook", "secret").deduplicates_by_key
    assert not EmailChannel("127.0.0.1", 25, "shop@example.test").deduplicates_by_key


def test_failed_mark_stops_next_request(claimed):
    """`raise_failed`, called before each request, raises once the failed mark is done."""
    drop_ledger_table(claimed)

    with _LedgerMarks(claimed, "run-1", NOW) as marks:
        marks.sent(keys("s1", ["m0"]), "req-1")
        deadline = time.monotonic() + 30
        with pytest.raises(sa.exc.DBAPIError):
            while time.monotonic() < deadline:
                marks.raise_failed()
                time.sleep(0.01)
