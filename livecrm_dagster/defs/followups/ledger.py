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
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Engine

from livecrm_dagster.defs.followups.sql_lists import any_of
from livecrm_dagster.warehouse import UtcDateTime, create_tables

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


# Rows claimed per transaction: one commit per batch instead of one per member, and a
# transaction short enough that other steps' claims do not queue behind it for long.
CLAIM_BATCH = 5_000


@dataclass(frozen=True)
class _ClaimAttempt:
    """The values that the claims of one run of one step share, and their UPDATE."""

    claimable: sa.ColumnElement[bool]
    run_id: str
    now: dt.datetime
    offer_key: str | None
    cap_slots: Sequence[str | None]

    def statement(self, rows: sa.ColumnElement[bool], cap_slot: str | None) -> sa.Update:
        """Return the UPDATE that moves the claimable rows among `rows` to `sending`."""
        return (
            send_ledger.update()
            .where(rows, self.claimable)
            .values(
                status=SENDING,
                run_id=self.run_id,
                claimed_at=self.now,
                updated_at=self.now,
                attempts=send_ledger.c.attempts + 1,
                offer_key=self.offer_key,
                cap_slot=cap_slot,
                reason=None,
                error=None,
            )
            .returning(send_ledger.c.idempotency_key, send_ledger.c.batch_key)
        )


# The columns a caller gives `insert_planned`, which sets the status and times itself.
PLANNED_COLUMNS = [
    "idempotency_key",
    "broadcast_id",
    "step_id",
    "member_id",
    "channel",
    "segment",
    "due_at",
]
_INSERT_PLANNED_FROM_ARRAYS = sa.text(
    f"""
    INSERT INTO {TABLE_NAME} (
        idempotency_key, broadcast_id, step_id, member_id, channel, segment, due_at,
        status, attempts, planned_at, updated_at
    )
    SELECT planned.*, :status, 0, :now, :now
    FROM unnest(
        CAST(:idempotency_key AS text[]), CAST(:broadcast_id AS text[]),
        CAST(:step_id AS text[]), CAST(:member_id AS text[]), CAST(:channel AS text[]),
        CAST(:segment AS text[]), CAST(:due_at AS timestamptz[])
    ) AS planned
    ON CONFLICT DO NOTHING
    """
)


def _record_statement(
    rows: sa.ColumnElement[bool], status: str, reason: str | None, run_id: str, now: dt.datetime
) -> sa.Update:
    """Return the UPDATE that records one outcome on the rows among `rows` it changes."""
    table = send_ledger
    return (
        table.update()
        .where(
            rows,
            table.c.status.in_((*CLAIMABLE, HOLDOUT)),
            sa.or_(table.c.status != status, table.c.reason.is_distinct_from(reason)),
        )
        .values(status=status, reason=reason, error=None, run_id=run_id, updated_at=now)
    )


def _nullable_list(values: pd.Series) -> list[object]:
    return values.astype(object).where(values.notna(), None).tolist()


def _records(frame: pd.DataFrame) -> list[dict]:
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


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
        """Read the rows of some members in some statuses."""
        matches = any_of(send_ledger.c.member_id, member_ids, self.dialect)
        if not matches:
            return self.read(sa.false())
        in_statuses = send_ledger.c.status.in_(list(statuses))
        frames = [self.read(match, in_statuses) for match in matches]
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)

    def insert_planned(self, rows: Sequence[dict] | pd.DataFrame, now: dt.datetime) -> None:
        """Insert `planned` rows and commit; rows that exist already are left untouched.

        Each row has the columns `idempotency_key`, `broadcast_id`, `step_id`, `member_id`,
        `channel`, `segment` and optionally `due_at`.
        """
        frame = pd.DataFrame(rows, columns=PLANNED_COLUMNS)
        if frame.empty:
            return
        if self.dialect == "postgresql":
            self._insert_planned_postgres(frame, now)
            return
        values = [
            {**row, "status": PLANNED, "attempts": 0, "planned_at": now, "updated_at": now}
            for row in _records(frame)
        ]
        with self.engine.begin() as connection:
            connection.execute(sqlite.insert(send_ledger).on_conflict_do_nothing(), values)

    def _insert_planned_postgres(self, frame: pd.DataFrame, now: dt.datetime) -> None:
        # One INSERT from column arrays: a statement per row, or a VALUES list compiled by
        # SQLAlchemy, costs seconds for 100,000 members.
        utc = UtcDateTime()
        arrays = {column: _nullable_list(frame[column]) for column in PLANNED_COLUMNS[:-1]}
        arrays["due_at"] = [utc.process_bind_param(v, self.engine.dialect) for v in frame["due_at"]]
        parameters = {
            **arrays,
            "status": PLANNED,
            "now": utc.process_bind_param(now, self.engine.dialect),
        }
        with self.engine.begin() as connection:
            connection.execute(_INSERT_PLANNED_FROM_ARRAYS, parameters)

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
        """Move rows to `sending` for this run, each row on its own, and commit.

        A row's UPDATE succeeds only for a claimable row or a `sending` row whose lease
        ran out (its run died). It fails on the partial unique indexes when the member
        already has this offer, or every cap slot, taken by a row in flight or sent. Rows
        are claimed in transactions of `CLAIM_BATCH` rows, so a batch costs one commit
        instead of one per member, and every claim has committed when this returns.
        """
        keys = list(keys)
        table = send_ledger
        claimable = table.c.status.in_(CLAIMABLE) | (
            (table.c.status == SENDING) & (table.c.claimed_at < now - lease)
        )
        claim = _ClaimAttempt(claimable, run_id, now, offer_key, list(cap_slots))
        claims: dict[str, Claim] = {}
        for start in range(0, len(keys), CLAIM_BATCH):
            with self.engine.begin() as connection:
                self._claim_group(connection, keys[start : start + CLAIM_BATCH], claim, claims)
        return claims

    def _claim_group(
        self,
        connection: sa.Connection,
        keys: list[str],
        claim: _ClaimAttempt,
        claims: dict[str, Claim],
    ) -> None:
        """Claim a group of rows with one UPDATE, and split the group when an index objects.

        Most groups have no conflict, and one statement replaces a round trip per member.
        On a conflict the savepoint is rolled back, so nothing of the attempt remains, and
        each half is tried again, down to single rows that try every cap slot. A
        conflicting row thus costs about 2 * log2(len(keys)) statements. The outcome is the
        same as claiming the rows one by one in order, because a group that succeeds gives
        each row the first cap slot, as a single claim without a conflict would.
        """
        if len(keys) == 1:
            claims[keys[0]] = self._claim_row(connection, keys[0], claim)
            return
        together = self._claim_together(connection, keys, claim)
        if together is not None:
            claims.update(together)
            return
        middle = len(keys) // 2
        self._claim_group(connection, keys[:middle], claim, claims)
        self._claim_group(connection, keys[middle:], claim, claims)

    def _claim_together(
        self, connection: sa.Connection, keys: list[str], claim: _ClaimAttempt
    ) -> dict[str, Claim] | None:
        """Claim every row with the first cap slot, or return None when an index objects."""
        # A group has at most CLAIM_BATCH keys, so SQLite's IN lists fit one statement.
        in_group = sa.or_(*any_of(send_ledger.c.idempotency_key, keys, self.dialect))
        try:
            with connection.begin_nested():
                rows = connection.execute(claim.statement(in_group, claim.cap_slots[0])).all()
        except sa.exc.IntegrityError:
            return None
        claimed = {row.idempotency_key: Claim("claimed", row.batch_key) for row in rows}
        return {key: claimed.get(key, Claim("in_flight_or_sent")) for key in keys}

    def _claim_row(self, connection: sa.Connection, key: str, claim: _ClaimAttempt) -> Claim:
        for cap_slot in claim.cap_slots:
            statement = claim.statement(send_ledger.c.idempotency_key == key, cap_slot)
            try:
                with connection.begin_nested():
                    row = connection.execute(statement).first()
            except sa.exc.IntegrityError:
                if claim.offer_key is not None and self._offer_taken(key, claim.offer_key):
                    return Claim("duplicate_offer")
                continue
            if row is None:
                return Claim("in_flight_or_sent")
            return Claim("claimed", row.batch_key)
        return Claim("frequency_cap")

    def _offer_taken(self, key: str, offer_key: str) -> bool:
        """Return whether the row's own member has the offer through another row.

        Only then did the claim fail on the offer index. Otherwise the cap index failed it.
        """
        member = (
            sa.select(send_ledger.c.member_id)
            .where(send_ledger.c.idempotency_key == key)
            .scalar_subquery()
        )
        rows = self.read(
            send_ledger.c.member_id == member,
            send_ledger.c.offer_key == offer_key,
            send_ledger.c.status.in_(IN_FLIGHT_OR_SENT),
            send_ledger.c.idempotency_key != key,
        )
        return not rows.empty

    def set_batches(self, batches: Sequence[tuple[Sequence[str], str]], run_id: str) -> None:
        """Record each batch's key on its rows claimed by this run, in one transaction.

        `batches` contains (row keys, batch key) pairs. The caller records them before the
        first request, so a run that takes over after a crash resends a batch under its key.
        """
        with self.engine.begin() as connection:
            for keys, batch in batches:
                for match in any_of(send_ledger.c.idempotency_key, keys, self.dialect):
                    connection.execute(
                        send_ledger.update()
                        .where(match, send_ledger.c.run_id == run_id)
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
        with self.engine.begin() as connection:
            for match in any_of(send_ledger.c.idempotency_key, keys, self.dialect):
                connection.execute(
                    send_ledger.update()
                    .where(match, send_ledger.c.run_id == run_id, send_ledger.c.status == SENDING)
                    .values(updated_at=now, **values)
                )

    def record_outcome(
        self, key: str, status: str, reason: str | None, run_id: str, now: dt.datetime
    ) -> bool:
        """Record a skip or a holdout on one row as `record_outcomes` does, and return
        whether the row changed."""
        outcome = pd.DataFrame({"idempotency_key": [key], "status": [status], "reason": [reason]})
        return self.record_outcomes(outcome, run_id, now) > 0

    def record_outcomes(self, outcomes: pd.DataFrame, run_id: str, now: dt.datetime) -> int:
        """Record skips and holdouts on rows that are not in flight or sent, in one transaction.

        `outcomes` has the columns `idempotency_key`, `status` and `reason`. A row whose
        status and reason are already these is left unchanged, so a re-check that reaches
        the same decision keeps the original timestamps. Returns the number of rows changed.
        """
        if outcomes.empty:
            return 0
        changed = 0
        groups = outcomes.groupby(["status", "reason"], dropna=False, sort=False)
        with self.engine.begin() as connection:
            for (status, reason), group in groups:
                reason = None if pd.isna(reason) else reason
                keys = group["idempotency_key"]
                for match in any_of(send_ledger.c.idempotency_key, keys, self.dialect):
                    statement = _record_statement(match, status, reason, run_id, now)
                    changed += connection.execute(statement).rowcount
        return changed

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
