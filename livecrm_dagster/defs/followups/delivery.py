"""Deliver the claimed messages of one step run: build them, group them into requests,
send each request, and mark its ledger rows.

Every row that reaches this module is `sending`, claimed by this run. A batch's key is
recorded before its request leaves, and its rows are marked `sent` or `failed` only after
the channel responds.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

import pandas as pd

from livecrm_dagster.defs.followups import rules
from livecrm_dagster.defs.followups.channels import Channel, ChannelError, Message
from livecrm_dagster.defs.followups.ledger import SendLedger, batch_key

logger = logging.getLogger(__name__)

ChannelFactory = Callable[[str], Channel]


@dataclass
class Delivered:
    """Counts of the messages one delivery sent and the ones that failed."""

    sent: int = 0
    failed: int = 0


def deliver(
    to_send: pd.DataFrame,
    inputs: rules.StepInputs,
    ledger: SendLedger,
    channel_factory: ChannelFactory,
    run_id: str,
) -> Delivered:
    """Send the claimed rows in `to_send` through the step's channel and mark each of them.

    `to_send` has one row per message with `idempotency_key`, `member_id`, `subject`,
    `text` and `batch_key` (the key a run that died recorded, or missing). When the channel
    cannot be created, every row is marked `failed` with the error.
    """
    step, now = inputs.step, inputs.now
    broadcast_id = str(inputs.broadcast["broadcast_id"])
    delivered = Delivered()
    try:
        channel = channel_factory(step.channel)
    except ChannelError as error:
        claimed = to_send["idempotency_key"].tolist()
        ledger.mark_failed(claimed, run_id, now, str(error))
        delivered.failed += len(claimed)
        logger.error(
            "step %s of %s: channel %s unusable: %s", step.id, broadcast_id, step.channel, error
        )
        return delivered

    try:
        messages = _messages(to_send, inputs, channel.address_column or "email")
        batches = _batches(messages, channel.batch_size, ledger, run_id)
        overlap = channel.deduplicates_by_key
        with _LedgerMarks(ledger, run_id, now, overlap) as marks:
            for batch, key in batches:
                marks.raise_failed()
                _send_batch(delivered, channel, batch, key, inputs, marks)
    finally:
        channel.close()
    return delivered


def _messages(
    to_send: pd.DataFrame, inputs: rules.StepInputs, address_column: str
) -> list[tuple[Message, str | None]]:
    """Build the message of every claimed row, with the batch key a previous run recorded."""
    step = inputs.step
    broadcast_id = str(inputs.broadcast["broadcast_id"])
    expires_at = inputs.timing.expires_at
    # Machine-readable for the MA tool: ISO 8601 in shop time, with its UTC offset.
    expires = (
        pd.Timestamp(expires_at).tz_convert(inputs.zone).isoformat()
        if expires_at is not None
        else None
    )
    members = inputs.members.reindex(to_send["member_id"])
    if address_column in members.columns:
        addresses = rules.text_values(members[address_column]).tolist()
    else:
        addresses = [""] * len(to_send)

    previous_batches = to_send["batch_key"].astype(object).where(to_send["batch_key"].notna(), None)
    columns = ["idempotency_key", "member_id", "subject", "text"]
    values = [to_send[column].tolist() for column in columns]
    rows = zip(*values, previous_batches.tolist(), addresses, strict=True)
    return [
        (
            Message(
                key=key,
                broadcast_id=broadcast_id,
                step_id=step.id,
                member_id=member_id,
                address=address or None,
                subject=subject,
                text=text,
                offer_expires_at=expires,
            ),
            previous_batch,
        )
        for key, member_id, subject, text, previous_batch, address in rows
    ]


def _batches(
    messages: list[tuple[Message, str | None]], size: int, ledger: SendLedger, run_id: str
) -> list[tuple[list[Message], str]]:
    """Group messages into requests with their idempotency key.

    Single messages use their ledger key. Batches (LINE multicast) share one text. A batch
    taken over from a run that died keeps its recorded key and member list, so the receiver
    recognises the retry as the same request. The keys of new batches are recorded in one
    transaction before this returns, so a retry after a crash reuses them.
    """
    if size == 1:
        return [([message], message.key) for message, _ in messages]
    batches: list[tuple[list[Message], str]] = []
    resumed: dict[str, list[Message]] = {}
    fresh: dict[tuple[str, str], list[Message]] = {}
    for message, previous in messages:
        if previous:
            resumed.setdefault(previous, []).append(message)
        else:
            fresh.setdefault((message.subject, message.text), []).append(message)
    for key, batch in resumed.items():
        batches.append((batch, key))
    new_batches = []
    for group in fresh.values():
        for start in range(0, len(group), size):
            batch = group[start : start + size]
            key = batch_key(m.key for m in batch)
            new_batches.append(([m.key for m in batch], key))
            batches.append((batch, key))
    ledger.set_batches(new_batches, run_id)
    return batches


def _send_batch(
    delivered: Delivered,
    channel: Channel,
    batch: list[Message],
    key: str,
    inputs: rules.StepInputs,
    marks: _LedgerMarks,
) -> None:
    """Send one request and mark its rows `sent`, or `failed` with the channel's error."""
    batch_keys = [m.key for m in batch]
    try:
        request_id = channel.send(batch, key)
    except ChannelError as error:
        marks.failed(batch_keys, str(error))
        delivered.failed += len(batch)
        logger.error(
            "step %s of %s: %d message(s) failed, key %s: %s",
            inputs.step.id,
            inputs.broadcast["broadcast_id"],
            len(batch),
            key,
            error,
        )
        return
    marks.sent(batch_keys, request_id)
    delivered.sent += len(batch)


class _LedgerMarks:
    """Marks each request's rows on a worker thread while the next request is out.

    Marking a request's rows (an UPDATE and a commit) and sending the next request both
    wait most of the time, on the database and on the network, so they overlap. A mark is
    submitted only after its request's response, so no row is marked before its request
    completed. At most one mark is pending: the next mark, and leaving the `with` block,
    wait for it and raise its error. A run that dies with a mark pending leaves those rows
    `sending` with their batch key, as a crash between a response and its mark always
    could, and the run that takes them over resends under the same key.

    With `overlap` false, each mark is written before the next request leaves. Channels
    whose receiver does not drop a resent key (SMTP) use that, so a failed mark stops
    the run before one more message could go out twice.
    """

    def __init__(self, ledger: SendLedger, run_id: str, now: dt.datetime, overlap: bool = True):
        self.ledger = ledger
        self.run_id = run_id
        self.now = now
        self.overlap = overlap
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-marks")
        self._pending: Future | None = None

    def __enter__(self) -> _LedgerMarks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.wait()
        finally:
            self._worker.shutdown()

    def sent(self, keys: Sequence[str], request_id: str | None) -> None:
        self._submit(self.ledger.mark_sent, keys, self.run_id, self.now, request_id)

    def failed(self, keys: Sequence[str], error: str) -> None:
        self._submit(self.ledger.mark_failed, keys, self.run_id, self.now, error)

    def wait(self) -> None:
        """Wait for the pending mark, and raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def raise_failed(self) -> None:
        """Raise the error of a pending mark that already failed, so no request follows it."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def _submit(self, mark: Callable[..., None], *args: object) -> None:
        self.wait()
        self._pending = self._worker.submit(mark, *args)
        if not self.overlap:
            self.wait()
