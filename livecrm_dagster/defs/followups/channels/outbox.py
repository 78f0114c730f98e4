"""File outbox: CSV and JSON Lines per (broadcast, step), for upload to a marketing tool.

It is the default channel, so nothing leaves the machine by accident. The folder and files
are created readable by the owner only because they contain e-mail addresses. A message
whose idempotency key is already in the JSON Lines file is not written again, so a run
that died between writing and marking the ledger cannot duplicate a line.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from livecrm_dagster.defs.followups.channels.base import Channel, ChannelError, Message

COLUMNS = [
    "idempotency_key",
    "broadcast_id",
    "step_id",
    "member_id",
    "email",
    "subject",
    "text",
    "offer_expires_at",
]


class OutboxChannel(Channel):
    """Appends messages to `<folder>/<broadcast>/<step>.jsonl` and `.csv`."""

    name = "outbox"
    address_column = None

    def __init__(self, folder: str | os.PathLike, with_email: bool = True):
        self.folder = Path(folder)
        self.with_email = with_email
        self._written: dict[Path, set[str]] = {}

    def paths(self, broadcast_id: str, step_id: str) -> tuple[Path, Path]:
        base = self.folder / broadcast_id
        return base / f"{step_id}.jsonl", base / f"{step_id}.csv"

    def send(self, messages: Sequence[Message], key: str) -> str | None:
        for message in messages:
            self._write(message)
        return None

    def _written_keys(self, path: Path) -> set[str]:
        if path not in self._written:
            keys: set[str] = set()
            if path.exists():
                with path.open(encoding="utf-8") as lines:
                    keys = {json.loads(line)["idempotency_key"] for line in lines if line.strip()}
            self._written[path] = keys
        return self._written[path]

    def _write(self, message: Message) -> None:
        jsonl_path, csv_path = self.paths(message.broadcast_id, message.step_id)
        written = self._written_keys(jsonl_path)
        if message.key in written:
            return
        record = {
            "idempotency_key": message.key,
            "broadcast_id": message.broadcast_id,
            "step_id": message.step_id,
            "member_id": message.member_id,
            "email": message.address if self.with_email else None,
            "subject": message.subject,
            "text": message.text,
            "offer_expires_at": message.offer_expires_at,
        }
        try:
            _make_private_dir(jsonl_path.parent)
            new_csv = not csv_path.exists()
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
            if new_csv:
                writer.writeheader()
            writer.writerow({name: _spreadsheet_safe(value) for name, value in record.items()})
            _append_private(csv_path, buffer.getvalue())
            # The JSON Lines file is written last: a key in it means the CSV row exists too.
            _append_private(jsonl_path, json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as error:
            raise ChannelError(
                f"outbox write failed: {type(error).__name__}: {error.strerror}"
            ) from None
        written.add(message.key)


# A cell starting with one of these is run as a formula by spreadsheet programs.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _spreadsheet_safe(value: object) -> object:
    """Prefix a text cell that a spreadsheet would evaluate with an apostrophe.

    The CSV goes to operators and MA tools that may open it in a spreadsheet, and member
    IDs, titles and product names come from outside. The JSON Lines file keeps the
    values unchanged.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _make_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def _append_private(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, text.encode("utf-8"))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
