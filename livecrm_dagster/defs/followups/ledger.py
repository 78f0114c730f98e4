"""The send ledger: one row per (broadcast, step, member, channel), written before a send.

Life of a row: `planned` (inserted, committed) -> `sending` (claimed by one run with an
atomic conditional UPDATE) -> `sent` or `failed`. Rows that are not sent end as
`skipped` with a reason, or `holdout`. Two partial unique indexes make the claim fail
when the member already has a message in flight or sent for the same offer or the same
frequency-cap slot, so concurrent runs on PostgreSQL cannot both send.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from livecrm_dagster.warehouse import IN_CHUNK, UtcDateTime, create_tables

TABLE_NAME = "send_ledger"
# Fixed namespace of the idempotency keys; changing it would re-send every step.
KEY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "livecrm_dagster/send_ledger")

PLANNED = "planned"
SENDING = "sending"
SENT = "sent"
SKIPPED = "skipped"
FAILED = "failed"
HOLDOUT = "holdout"
STATUSES = (PLANNED, SENDING, SENT, SKIPPED, FAILED, HOLDOUT)
# Statuses a later run may claim again: a failed send is retried and a skip re-checked.
CLAIMABLE = (PLANNED, FAILED, SKIPPED)
IN_FLIGHT_OR_SENT = (SENDING, SENT)

metadata = sa.MetaData()
send_ledger = sa.Table(
    TABLE_NAME,
    metadata,
    sa.Column("broadcast_id", sa.Text, primary_key=True),
    sa.Column("step_id", sa.Text, primary_key=True),
    sa.Column("member_id", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("idempotency_key", sa.Text, nullable=False, unique=True),
    sa.Column("segment", sa.Text),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("offer_key", sa.Text),
    sa.Column("cap_slot", sa.Text),
    sa.Column("batch_key", sa.Text),
    sa.Column("request_id", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("run_id", sa.Text),
    sa.Column("due_at", UtcDateTime()),
    sa.Column("planned_at", UtcDateTime()),
    sa.Column("claimed_at", UtcDateTime()),
    sa.Column("sent_at", UtcDateTime()),
    sa.Column("updated_at", UtcDateTime()),
    sa.CheckConstraint(f"status IN {STATUSES!r}", name="ck_send_ledger_status"),
)
_in_flight = send_ledger.c.status.in_(IN_FLIGHT_OR_SENT)
sa.Index(
    "uq_send_ledger_offer",
    send_ledger.c.member_id,
    send_ledger.c.offer_key,
    unique=True,
    postgresql_where=_in_flight & send_ledger.c.offer_key.is_not(None),
    sqlite_where=_in_flight & send_ledger.c.offer_key.is_not(None),
)
sa.Index(
    "uq_send_ledger_cap",
    send_ledger.c.member_id,
    send_ledger.c.cap_slot,
    unique=True,
    postgresql_where=_in_flight & send_ledger.c.cap_slot.is_not(None),
    sqlite_where=_in_flight & send_ledger.c.cap_slot.is_not(None),
)
sa.Index("ix_send_ledger_member", send_ledger.c.member_id, send_ledger.c.status)


def _claim_values(
    run_id: str, now: dt.datetime, offer_key: str | None, cap_slot: str | None
) -> dict:
    """Return the column values that move a row to `sending` for a run."""
    return {
        "status": SENDING,
        "run_id": run_id,
        "claimed_at": now,
        "updated_at": now,
        "attempts": send_ledger.c.attempts + 1,
        "offer_key": offer_key,
        "cap_slot": cap_slot,
        "reason": None,
        "error": None,
    }


def ledger_key(broadcast_id: str, step_id: str, member_id: str, channel: str) -> str:
    """Return the idempotency key of a ledger row: a UUID5 of its four key columns."""
    name = "\x1f".join((broadcast_id, step_id, member_id, channel))
    return str(uuid.uuid5(KEY_NAMESPACE, name))


def batch_key(keys: Iterable[str]) -> str:
    """Return the idempotency key of a batch (a LINE multicast): a UUID5 of its row keys."""
    return str(uuid.uuid5(KEY_NAMESPACE, "batch:" + ",".join(sorted(keys))))


@dataclass(frozen=True)
class Claim:
    """Outcome of claiming one row: `claimed`, or why not (`in_flight_or_sent`,
    `duplicate_offer`, `frequency_cap`)."""

    outcome: str
    batch_key: str | None = None


class SendLedger:
    """Reads and writes the send ledger through the warehouse's engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        create_tables(engine, metadata)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def read(self, *conditions: sa.ColumnElement[bool]) -> pd.DataFrame:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(send_ledger).where(*conditions)).all()
        return pd.DataFrame.from_records(rows, columns=[c.name for c in send_ledger.columns])

    def step_rows(self, broadcast_id: str, step_id: str) -> pd.DataFrame:
        return self.read(
            send_ledger.c.broadcast_id == broadcast_id, send_ledger.c.step_id == step_id
        )

    def member_rows(self, member_ids: Sequence[str], statuses: Sequence[str]) -> pd.DataFrame:
        """Read the rows of some members in some statuses, in chunks to bound the IN list."""
        frames = []
        members = list(member_ids)
        for start in range(0, len(members), 1000):
            frames.append(
                self.read(
                    send_ledger.c.member_id.in_(members[start : start + 1000]),
                    send_ledger.c.status.in_(list(statuses)),
                )
            )
        if not frames:
            return self.read(sa.false())
        return pd.concat(frames, ignore_index=True)

    def insert_planned(self, rows: Sequence[dict], now: dt.datetime) -> None:
        """Insert `planned` rows and commit; rows that exist already are left untouched."""
        if not rows:
            return
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        values = [
            {**row, "status": PLANNED, "attempts": 0, "planned_at": now, "updated_at": now}
            for row in rows
        ]
        # One statement with many parameter sets: SQLAlchemy batches it ("insertmanyvalues")
        # without compiling a new multi-row VALUES clause for every 500 rows.
        with self.engine.begin() as connection:
            connection.execute(insert(send_ledger).on_conflict_do_nothing(), values)

    def claim(
        self,
        key: str,
        run_id: str,
        now: dt.datetime,
        lease: dt.timedelta,
        offer_key: str | None,
        cap_slots: Sequence[str | None],
    ) -> Claim:
        """Move one row to `sending` for this run, atomically (see `claim_many`)."""
        return self.claim_many([key], run_id, now, lease, offer_key, cap_slots)[key]

    def claim_many(
        self,
        keys: Sequence[str],
        run_id: str,
        now: dt.datetime,
        lease: dt.timedelta,
        offer_key: str | None,
        cap_slots: Sequence[str | None],
    ) -> dict[str, Claim]:
        """Move rows to `sending` for this run in one transaction, each row on its own.

        A row's UPDATE succeeds only for a claimable row or a `sending` row whose lease
        ran out (its run died). It fails on the partial unique indexes when the member
        already has this offer, or every cap slot, taken by a row in flight or sent. Each
        row's attempt runs in a savepoint, so one row's conflict leaves the others
        claimed, and the whole batch costs one commit instead of one per member.
        """
        table = send_ledger
        claimable = table.c.status.in_(CLAIMABLE) | (
            (table.c.status == SENDING) & (table.c.claimed_at < now - lease)
        )
        claims: dict[str, Claim] = {}
        with self.engine.begin() as connection:
            fast = self._claim_together(
                connection, keys, claimable, run_id, now, offer_key, cap_slots[0]
            )
            if fast is not None:
                return fast
            for key in keys:
                claims[key] = self._claim_row(
                    connection, key, claimable, run_id, now, offer_key, cap_slots
                )
        return claims

    def _claim_together(
        self,
        connection: sa.Connection,
        keys: Sequence[str],
        claimable: sa.ColumnElement[bool],
        run_id: str,
        now: dt.datetime,
        offer_key: str | None,
        cap_slot: str | None,
    ) -> dict[str, Claim] | None:
        """Claim every row with one UPDATE, or return None when a unique index objects.

        Most batches have no conflict, and one statement replaces a round trip per
        member. On any conflict the savepoint is rolled back, so nothing of the attempt
        remains and the caller decides row by row.
        """
        table = send_ledger
        statement = (
            table.update()
            .where(table.c.idempotency_key.in_(list(keys)), claimable)
            .values(**_claim_values(run_id, now, offer_key, cap_slot))
            .returning(table.c.idempotency_key, table.c.batch_key)
        )
        try:
            with connection.begin_nested():
                rows = connection.execute(statement).all()
        except sa.exc.IntegrityError:
            return None
        claimed = {row.idempotency_key: Claim("claimed", row.batch_key) for row in rows}
        return {key: claimed.get(key, Claim("in_flight_or_sent")) for key in keys}

    def _claim_row(
        self,
        connection: sa.Connection,
        key: str,
        claimable: sa.ColumnElement[bool],
        run_id: str,
        now: dt.datetime,
        offer_key: str | None,
        cap_slots: Sequence[str | None],
    ) -> Claim:
        table = send_ledger
        for cap_slot in cap_slots:
            statement = (
                table.update()
                .where(table.c.idempotency_key == key, claimable)
                .values(**_claim_values(run_id, now, offer_key, cap_slot))
                .returning(table.c.batch_key)
            )
            try:
                with connection.begin_nested():
                    row = connection.execute(statement).first()
            except sa.exc.IntegrityError:
                if offer_key is not None and self._offer_taken(key, offer_key):
                    return Claim("duplicate_offer")
                continue
            if row is None:
                return Claim("in_flight_or_sent")
            return Claim("claimed", row.batch_key)
        return Claim("frequency_cap")

    def _offer_taken(self, key: str, offer_key: str) -> bool:
        rows = self.read(
            send_ledger.c.offer_key == offer_key,
            send_ledger.c.status.in_(IN_FLIGHT_OR_SENT),
            send_ledger.c.idempotency_key != key,
        )
        return not rows.empty

    def set_batch(self, keys: Sequence[str], batch: str, run_id: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                send_ledger.update()
                .where(
                    send_ledger.c.idempotency_key.in_(list(keys)), send_ledger.c.run_id == run_id
                )
                .values(batch_key=batch)
            )

    def mark_sent(
        self, keys: Sequence[str], run_id: str, now: dt.datetime, request_id: str | None
    ) -> None:
        self._finish(keys, run_id, now, status=SENT, sent_at=now, request_id=request_id)

    def mark_failed(self, keys: Sequence[str], run_id: str, now: dt.datetime, error: str) -> None:
        self._finish(keys, run_id, now, status=FAILED, error=error[:2000])

    def _finish(self, keys: Sequence[str], run_id: str, now: dt.datetime, **values) -> None:
        # Only the run holding the claim may finish a row; a run whose lease was taken over
        # must not overwrite the newer outcome.
        keys = list(keys)
        with self.engine.begin() as connection:
            for start in range(0, len(keys), IN_CHUNK):
                connection.execute(
                    send_ledger.update()
                    .where(
                        send_ledger.c.idempotency_key.in_(keys[start : start + IN_CHUNK]),
                        send_ledger.c.run_id == run_id,
                        send_ledger.c.status == SENDING,
                    )
                    .values(updated_at=now, **values)
                )

    def record_outcome(
        self, key: str, status: str, reason: str | None, run_id: str, now: dt.datetime
    ) -> bool:
        """Record a skip or a holdout on a row that is not in flight or sent.

        A row whose status and reason are already these is left unchanged, so a re-check
        that reaches the same decision keeps the original timestamps. Returns whether the
        row was changed.
        """
        table = send_ledger
        statement = (
            table.update()
            .where(
                table.c.idempotency_key == key,
                table.c.status.in_((*CLAIMABLE, HOLDOUT)),
                sa.or_(table.c.status != status, table.c.reason.is_distinct_from(reason)),
            )
            .values(status=status, reason=reason, error=None, run_id=run_id, updated_at=now)
        )
        with self.engine.begin() as connection:
            return connection.execute(statement).rowcount > 0

    @contextlib.contextmanager
    def step_lock(self, broadcast_id: str, step_id: str) -> Iterator[None]:
        """Serialize runs of one (broadcast, step) on PostgreSQL with an advisory lock.

        The row claims alone already prevent double sends. The lock makes the run that comes
        second wait and then find every member sent, so two runs do not split the audience.
        SQLite has no such lock and relies on the row claims only.
        """
        if self.dialect != "postgresql":
            yield
            return
        digest = hashlib.sha256(f"followup:{broadcast_id}:{step_id}".encode()).digest()
        lock_id = int.from_bytes(digest[:8], "big", signed=True)
        with self.engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_advisory_lock(:id)"), {"id": lock_id})
            connection.commit()
            try:
                yield
            finally:
                connection.execute(sa.text("SELECT pg_advisory_unlock(:id)"), {"id": lock_id})
                connection.commit()
