"""Shared fixtures: a fresh warehouse on SQLite or PostgreSQL, and a source folder builder."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from livecrm_dagster.warehouse import default_events_folder

POSTGRES_SERVER = os.environ.get(
    "LIVECRM_TEST_POSTGRES", "postgresql+psycopg://root@127.0.0.1:5432"
)


def _fresh_postgres_database() -> Iterator[str]:
    name = f"livecrm_test_{uuid.uuid4().hex[:12]}"
    # No pool: a test may restart the server, and a pooled connection would be dead.
    admin = sa.create_engine(
        f"{POSTGRES_SERVER}/postgres", isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        # The raw events of a server database sit in a local folder named after it.
        shutil.rmtree(default_events_folder(f"{POSTGRES_SERVER}/{name}"), ignore_errors=True)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database for one test, dropped afterwards."""
    yield from _fresh_postgres_database()


@pytest.fixture(scope="module")
def postgres_database() -> Iterator[str]:
    """An empty PostgreSQL database shared by one test module, dropped afterwards."""
    yield from _fresh_postgres_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def warehouse_url(request, tmp_path) -> str:
    """A fresh, empty warehouse URL; every storage test runs once per database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'warehouse.db'}"
    return request.getfixturevalue("postgres_url")


class SourceFolder:
    """Writes input files in the contract's layout under a temporary folder."""

    def __init__(self, root: Path):
        self.root = root

    def csv(self, input_name: str, file_name: str, rows: list[dict], encoding="utf-8") -> Path:
        path = self.root / input_name / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(path, index=False, encoding=encoding)
        return path

    def jsonl(self, input_name: str, file_name: str, rows: list[dict]) -> Path:
        path = self.root / input_name / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path


@pytest.fixture
def source(tmp_path) -> SourceFolder:
    return SourceFolder(tmp_path / "source")


def heartbeats(
    member_id: str,
    broadcast_id: str,
    first: str,
    last: str,
    every_seconds: int = 10,
    device_id: str = "",
    prefix: str | None = None,
) -> list[dict]:
    """Return heartbeat events of one device from `first` to `last` inclusive."""
    times = pd.date_range(pd.Timestamp(first), pd.Timestamp(last), freq=f"{every_seconds}s")
    prefix = prefix or f"{broadcast_id}-{member_id}-{device_id or 'd'}"
    return [
        {
            "event_id": f"{prefix}-{number}",
            "broadcast_id": broadcast_id,
            "member_id": member_id,
            "device_id": device_id,
            "type": "heartbeat",
            "occurred_at": time.isoformat(),
        }
        for number, time in enumerate(times)
    ]
