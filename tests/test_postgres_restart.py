"""PostgreSQL restarted in the middle of a partition write: nothing partial is left behind.

The test restarts the machine's PostgreSQL server (`pg_ctlcluster restart`), so it runs
only where that command exists and the test may run it (root on the test machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from livecrm_dagster.defs.sessions.assets import viewing_sessions
from livecrm_dagster.pipeline import FIRST_PASS, REFERENCE_ASSETS, pipeline_resources
from tests.test_main_job import B1, two_broadcasts  # noqa: F401 - fixture reused

CLUSTERS = Path("/etc/postgresql")

pytestmark = pytest.mark.skipif(
    shutil.which("pg_ctlcluster") is None or not CLUSTERS.is_dir() or os.geteuid() != 0,
    reason="needs pg_ctlcluster and root to restart the local PostgreSQL server",
)


def _restart_postgres() -> None:
    version = sorted(path.name for path in CLUSTERS.iterdir())[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for _ in range(60):
        ready = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"])
        if ready.returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError("PostgreSQL did not come back within 60 s after the restart")


def _sessions(url: str) -> list[tuple]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text(
                    "SELECT member_id, session_no, started_at, ended_at, watched_seconds "
                    "FROM viewing_sessions WHERE broadcast_id = :b ORDER BY member_id, session_no"
                ),
                {"b": B1},
            ).all()
    finally:
        engine.dispose()
    return [tuple(row) for row in rows]


def test_restart_mid_write_then_retry(two_broadcasts, postgres_url):  # noqa: F811
    resources = pipeline_resources(postgres_url, str(two_broadcasts.root))
    armed = {"restarts": 0}

    def restart_before_truncate(conn, cursor, statement, parameters, context, executemany):
        # The rewrite empties the broadcast's partition, then copies the new rows, so
        # restarting now kills the transaction between the two.
        if armed["restarts"] == 0 and statement.startswith('TRUNCATE "viewing_sessions__'):
            armed["restarts"] += 1
            _restart_postgres()

    with dg.instance_for_test() as instance:
        dg.materialize(REFERENCE_ASSETS, resources=resources, instance=instance)
        instance.add_dynamic_partitions("broadcast", [B1])
        dg.materialize(FIRST_PASS, resources=resources, instance=instance, partition_key=B1)
        before = _sessions(postgres_url)

        # A fresh resource, so the write goes through a new connection pool.
        resources = pipeline_resources(postgres_url, str(two_broadcasts.root))
        sa.event.listen(sa.engine.Engine, "before_cursor_execute", restart_before_truncate)
        try:
            failed = dg.materialize(
                [viewing_sessions],
                resources=resources,
                instance=instance,
                partition_key=B1,
                raise_on_error=False,
            )
        finally:
            sa.event.remove(sa.engine.Engine, "before_cursor_execute", restart_before_truncate)
        after_failure = _sessions(postgres_url)

        retried = dg.materialize(
            [viewing_sessions],
            resources=pipeline_resources(postgres_url, str(two_broadcasts.root)),
            instance=instance,
            partition_key=B1,
        )
        after_retry = _sessions(postgres_url)

    assert armed["restarts"] == 1
    assert not failed.success
    assert before
    assert after_failure == before
    assert retried.success
    assert after_retry == before
