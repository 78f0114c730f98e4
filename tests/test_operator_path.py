"""The operator's path end to end: webserver and daemon on the production profile.

Dagster's storage and the warehouse are two fresh PostgreSQL databases. The test starts
`dagster-webserver` and `dagster-daemon` as a separate process group, backfills
broadcast b001 through the GraphQL API as the UI does, and reads the warehouse and the
asset checks afterwards. A second backfill of the same partition must leave the
broadcast's rows as they were, and a follow-up step launched twice must send once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import requests
import sqlalchemy as sa

from livecrm_dagster.pipeline import REFERENCE_ASSETS, pipeline_resources, register_broadcasts
from livecrm_dagster.tables import SCHEMAS
from livecrm_dagster.warehouse import Warehouse
from tests.conftest import _fresh_postgres_database
from tests.test_main_job import B1, B2, two_broadcasts  # noqa: F401 - fixture reused

PROJECT = Path(__file__).resolve().parents[1]
PROFILE = PROJECT / "deploy" / "dagster.postgres.yaml"
BIN = Path(sys.executable).parent
LOCATION = "livecrm_dagster"
REPOSITORY = "__repository__"

SERVER_START_TIMEOUT = 90
# The backfill daemon looks at backfills every 30 seconds (DEFAULT_DAEMON_INTERVAL_SECONDS
# in dagster/_daemon/controller.py, not configurable), so a backfill takes two iterations.
BACKFILL_TIMEOUT = 150
RUN_TIMEOUT = 90

# Runs execute their steps in the run worker instead of one subprocess per step. The
# launch path (queue, run launcher, run worker) stays the same. A run of b001 took about
# 10 s instead of 35 s on a 2-core machine, so each backfill finishes one iteration sooner.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
STOP_TIMEOUT = 15

# Per-broadcast tables whose rows a rebuild replaces: every table keyed by broadcast_id,
# except the schedule itself, which the reference data job writes.
BROADCAST_TABLES = sorted(
    name
    for name, (columns, _) in SCHEMAS.items()
    if columns[0][0] == "broadcast_id" and name != "broadcasts"
)

# The asset checks of the broadcast_analytics job, as listed in the README.
ASSET_CHECKS = [
    ("raw_viewer_events", "quarantine_share_below_threshold"),
    ("raw_viewer_events", "viewing_events_arrived"),
    ("order_attribution", "orders_counted_once"),
    ("viewer_summary", "viewing_rate_within_bounds"),
    ("broadcast_kpis", "revenue_matches_attributed_orders"),
]

# hot_archive goes to the hot segment (m001 in b001) at 09:00 shop time on the day after
# the broadcast. At FOLLOWUP_NOW, an hour later, it is due and outside quiet hours.
FOLLOWUP_STEP = "hot_archive"
FOLLOWUP_NOW = "2024-06-11T10:00:00+09:00"

LAUNCH_BACKFILL = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}
"""

BACKFILL_STATUS = """
query BackfillStatus($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PartitionBackfill {
      status
      error { message stack }
      runs { runId status }
    }
    ... on Error { message }
  }
}
"""

CHECK_EXECUTIONS = """
query CheckExecutions($assetKey: AssetKeyInput!, $checkName: String!) {
  assetCheckExecutions(assetKey: $assetKey, checkName: $checkName, limit: 20) {
    runId
    status
    partition
    evaluation { success severity description }
  }
}
"""

LAUNCH_RUN = """
mutation LaunchRun($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
  }
}
"""

RUN_STATUS = """
query RunStatus($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status }
    ... on Error { message }
  }
}
"""

ASSET_KEYS = """
query AssetKeys {
  assetNodes { assetKey { path } }
}
"""

# A database created for this module and dropped (WITH FORCE) when the module ends.
fresh_database = contextlib.contextmanager(_fresh_postgres_database)

BACKFILL_SUCCEEDED = {"COMPLETED", "COMPLETED_SUCCESS"}
BACKFILL_FAILED = {"FAILED", "COMPLETED_FAILED", "CANCELED", "CANCELING", "FAILING"}
RUN_FAILED = {"FAILURE", "CANCELED", "CANCELING"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Deployment:
    """A running webserver and daemon on the production profile, with their databases."""

    url: str
    warehouse_url: str
    outbox_dir: Path
    logs_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        response = requests.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, f"GraphQL errors: {body['errors']}"
        return body["data"]

    def server_logs(self, lines: int = 40) -> str:
        return log_tails(self.logs_dir, lines)

    def asset_keys(self) -> set[str]:
        nodes = self.graphql(ASSET_KEYS)["assetNodes"]
        return {"/".join(node["assetKey"]["path"]) for node in nodes}

    def launch_backfill(self, params: dict) -> str:
        result = self.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", f"backfill not launched: {result}"
        return result["backfillId"]

    def wait_for_backfill(self, backfill_id: str, timeout: float = BACKFILL_TIMEOUT) -> dict:
        """Poll the backfill until it completes, or fail with its error and the servers' logs."""
        deadline = time.monotonic() + timeout
        backfill: dict = {}
        while time.monotonic() < deadline:
            backfill = self.graphql(BACKFILL_STATUS, {"backfillId": backfill_id})[
                "partitionBackfillOrError"
            ]
            assert backfill["__typename"] == "PartitionBackfill", f"backfill lookup: {backfill}"
            if backfill["status"] in BACKFILL_SUCCEEDED:
                return backfill
            if backfill["status"] in BACKFILL_FAILED:
                pytest.fail(
                    f"backfill {backfill_id} ended {backfill['status']}: {backfill['error']}; "
                    f"runs {backfill['runs']}\n{self.server_logs()}"
                )
            time.sleep(1)
        pytest.fail(
            f"backfill {backfill_id} still {backfill.get('status')} after {timeout} s; "
            f"runs {backfill.get('runs')}\n{self.server_logs()}"
        )

    def backfill_broadcast(self, broadcast_id: str) -> dict:
        """Backfill one partition of every asset of the job broadcast_analytics."""
        backfill_id = self.launch_backfill(
            {
                "assetSelection": [{"path": [name]} for name in analytics_assets()],
                "partitionNames": [broadcast_id],
                "tags": [{"key": "livecrm/broadcast", "value": broadcast_id}],
                "title": f"rebuild {broadcast_id}",
                "runConfigData": IN_PROCESS,
            }
        )
        return self.wait_for_backfill(backfill_id)

    def launch_run(
        self, job_name: str, run_config: dict, tags: dict[str, str], timeout: float = RUN_TIMEOUT
    ) -> str:
        """Launch one run of a job through the run queue and wait until it succeeds."""
        params = {
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": REPOSITORY,
                "jobName": job_name,
            },
            "runConfigData": run_config,
            "executionMetadata": {
                "tags": [{"key": key, "value": value} for key, value in tags.items()]
            },
        }
        result = self.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
        assert result["__typename"] == "LaunchRunSuccess", f"run not launched: {result}"
        run_id = result["run"]["runId"]
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            run = self.graphql(RUN_STATUS, {"runId": run_id})["runOrError"]
            assert run["__typename"] == "Run", f"run lookup: {run}"
            status = run["status"]
            if status == "SUCCESS":
                return run_id
            if status in RUN_FAILED:
                pytest.fail(f"run {run_id} of {job_name} ended {status}\n{self.server_logs()}")
            time.sleep(0.5)
        pytest.fail(
            f"run {run_id} of {job_name} still {status} after {timeout} s\n{self.server_logs()}"
        )

    def stop(self) -> None:
        stop_process_group(self.processes)


def stop_process_group(processes: list[subprocess.Popen]) -> None:
    """Stop the group the first process leads: SIGTERM, then SIGKILL after STOP_TIMEOUT s."""
    if not processes:
        return
    group = processes[0].pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and _group_alive(group):
            for process in processes:
                process.poll()
            time.sleep(0.2)
        if not _group_alive(group):
            break
    for process in processes:
        process.wait(timeout=STOP_TIMEOUT)


def log_tails(logs_dir: Path, lines: int = 40) -> str:
    """Return the last lines of each log file in `logs_dir`, for failure messages."""
    tails = []
    for path in sorted(logs_dir.glob("*.log")):
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
        tails.append(f"--- {path.name} ---\n" + "\n".join(text[-lines:]))
    return "\n".join(tails)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def analytics_assets() -> list[str]:
    """Return the asset names of the job broadcast_analytics, from the code location."""
    from livecrm_dagster.definitions import defs

    job = defs().resolve_job_def("broadcast_analytics")
    return sorted(key.to_user_string() for key in job.asset_layer.selected_asset_keys)


def _wait_for_server(deployment: Deployment) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        for process in deployment.processes:
            if process.poll() is not None:
                pytest.fail(
                    f"{process.args[0]} exited with code {process.returncode}\n"
                    f"{deployment.server_logs()}"
                )
        try:
            if requests.get(f"{deployment.url}/server_info", timeout=5).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"webserver not ready at {deployment.url} after {SERVER_START_TIMEOUT} s\n"
        f"{deployment.server_logs()}"
    )


def _load_reference_data(instance: dg.DagsterInstance, warehouse_url: str, source_dir: str):
    """Materialize the reference_data job's assets in process and register both broadcasts."""
    result = dg.materialize(
        REFERENCE_ASSETS,
        resources=pipeline_resources(warehouse_url, source_dir),
        instance=instance,
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
    )
    assert result.success, "reference data failed to load"
    register_broadcasts(instance, [B1, B2])


@pytest.fixture(scope="module")
def deployment(two_broadcasts, tmp_path_factory) -> Iterator[Deployment]:  # noqa: F811
    """Webserver and daemon on fresh databases, with reference data and two partitions."""
    root = tmp_path_factory.mktemp("operator")
    with contextlib.ExitStack() as stack:
        storage_url = stack.enter_context(fresh_database())
        warehouse_url = stack.enter_context(fresh_database())
        yield from _run_deployment(root, storage_url, warehouse_url, str(two_broadcasts.root))


def _run_deployment(
    root: Path, storage_url: str, warehouse_url: str, source_dir: str
) -> Iterator[Deployment]:
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(PROFILE, home / "dagster.yaml")
    storage = sa.engine.make_url(storage_url)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_USERNAME": storage.username or "root",
        "DAGSTER_PG_PASSWORD": storage.password or "",
        "DAGSTER_PG_HOST": storage.host or "127.0.0.1",
        "DAGSTER_PG_DB": storage.database,
        "LIVECRM_WAREHOUSE_URL": warehouse_url,
        "LIVECRM_SOURCE_DIR": source_dir,
        "LIVECRM_OUTBOX_DIR": str(root / "outbox"),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            if os.environ.get(name) != value:
                patch.setenv(name, value)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            _load_reference_data(instance, warehouse_url, source_dir)

    logs = root / "logs"
    logs.mkdir()
    port = free_port()
    deployment = Deployment(
        url=f"http://127.0.0.1:{port}",
        warehouse_url=warehouse_url,
        outbox_dir=root / "outbox",
        logs_dir=logs,
    )
    commands = {
        "webserver": [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port)],
        "daemon": [str(BIN / "dagster-daemon"), "run"],
    }
    try:
        for name, command in commands.items():
            # The first process leads a new process group and the second joins it, so one
            # killpg stops both and the code servers and run workers they start.
            group = {"process_group": 0}
            if deployment.processes:
                group = {"process_group": deployment.processes[0].pid}
            with (logs / f"{name}.log").open("wb") as log:
                deployment.processes.append(
                    subprocess.Popen(
                        [*command, "-w", str(PROJECT / "workspace.yaml")],
                        cwd=PROJECT,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        **group,
                    )
                )
        _wait_for_server(deployment)
        yield deployment
    finally:
        deployment.stop()


def read_broadcast_rows(warehouse_url: str, broadcast_id: str) -> dict[str, pd.DataFrame]:
    """Return each per-broadcast table's rows of one broadcast, sorted by primary key."""
    store = Warehouse(warehouse_url)
    frames = {}
    for name in BROADCAST_TABLES:
        keys = list(SCHEMAS[name][1])
        frame = store.read(name, broadcast_id=broadcast_id)
        frames[name] = frame.sort_values(keys).reset_index(drop=True)
    store.engine.dispose()
    return frames


@dataclass
class BackfillOutcome:
    run_ids: list[str]
    rows: dict[str, pd.DataFrame]


@pytest.fixture(scope="module")
def first_backfill(deployment) -> BackfillOutcome:
    """Backfill b001 once and return its run IDs and its per-broadcast rows afterwards."""
    backfill = deployment.backfill_broadcast(B1)
    run_ids = [run["runId"] for run in backfill["runs"]]
    return BackfillOutcome(run_ids, read_broadcast_rows(deployment.warehouse_url, B1))


def test_backfill_builds_kpis(first_backfill):
    kpis = first_backfill.rows["broadcast_kpis"]
    assert len(kpis) == 1
    first = kpis.iloc[0]
    assert first["revenue_during_live"] == 4000
    assert first["viewing_members"] == 6
    assert first["buyers_during_live"] == 2


def test_backfill_records_passed_checks(first_backfill):
    checks = first_backfill.rows["quality_checks"]
    stored = {(row.asset, row.check_name): bool(row.passed) for row in checks.itertuples()}
    assert sorted(stored) == sorted(ASSET_CHECKS)
    assert all(stored.values()), f"failed checks in quality_checks: {stored}"


def test_backfill_check_executions_passed(deployment, first_backfill):
    assert first_backfill.run_ids, "the backfill launched no run"
    for asset, check in ASSET_CHECKS:
        # The checks are declared without a partitions definition, so Dagster stores their
        # executions without a partition key; the backfill's run IDs pick out b001's.
        executions = deployment.graphql(
            CHECK_EXECUTIONS, {"assetKey": {"path": [asset]}, "checkName": check}
        )["assetCheckExecutions"]
        of_backfill = [row for row in executions if row["runId"] in first_backfill.run_ids]
        assert of_backfill, f"no execution of {asset}:{check} in runs {first_backfill.run_ids}"
        for execution in of_backfill:
            assert execution["status"] == "SUCCEEDED", f"{asset}:{check}: {execution}"
            assert execution["evaluation"]["success"], f"{asset}:{check}: {execution}"


def test_second_backfill_keeps_rows(deployment, first_backfill):
    deployment.backfill_broadcast(B1)
    second = read_broadcast_rows(deployment.warehouse_url, B1)
    assert second["broadcast_kpis"].shape[0] == 1
    for name in BROADCAST_TABLES:
        pd.testing.assert_frame_equal(second[name], first_backfill.rows[name], obj=name)


def _run_followup_step(deployment: Deployment, broadcast_id: str, step_id: str) -> str:
    """Launch the (broadcast, step) partition of followup_sends as the UI's launchpad does."""
    return deployment.launch_run(
        "followup_send_job",
        run_config={
            **IN_PROCESS,
            "ops": {"followup_sends": {"config": {"now": FOLLOWUP_NOW}}},
        },
        tags={
            "dagster/partition": f"{broadcast_id}|{step_id}",
            "dagster/partition/broadcast": broadcast_id,
            "dagster/partition/step": step_id,
            "livecrm/broadcast": broadcast_id,
            "livecrm/step": step_id,
        },
    )


def _read_ledger(warehouse_url: str, broadcast_id: str, step_id: str) -> pd.DataFrame:
    engine = sa.create_engine(warehouse_url)
    with engine.connect() as connection:
        ledger = pd.read_sql(
            sa.text(
                "SELECT member_id, channel, status, reason, idempotency_key, attempts, sent_at"
                " FROM send_ledger WHERE broadcast_id = :broadcast AND step_id = :step"
                " ORDER BY member_id, channel"
            ),
            connection,
            params={"broadcast": broadcast_id, "step": step_id},
        )
    engine.dispose()
    return ledger


def _outbox_members(outbox_dir: Path, broadcast_id: str, step_id: str) -> list[str]:
    path = outbox_dir / broadcast_id / f"{step_id}.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return sorted(json.loads(line)["member_id"] for line in lines if line.strip())


def test_followup_step_twice_sends_once(deployment, first_backfill):
    if "followup_sends" not in deployment.asset_keys():
        pytest.skip("the code location has no asset followup_sends yet")

    _run_followup_step(deployment, B1, FOLLOWUP_STEP)
    ledger_first = _read_ledger(deployment.warehouse_url, B1, FOLLOWUP_STEP)
    outbox_first = _outbox_members(deployment.outbox_dir, B1, FOLLOWUP_STEP)
    _run_followup_step(deployment, B1, FOLLOWUP_STEP)
    ledger_second = _read_ledger(deployment.warehouse_url, B1, FOLLOWUP_STEP)
    outbox_second = _outbox_members(deployment.outbox_dir, B1, FOLLOWUP_STEP)

    sent = ledger_first.loc[ledger_first["status"] == "sent", "member_id"].tolist()
    assert sent == ["m001"], f"ledger after the first run:\n{ledger_first}"
    assert outbox_first == ["m001"]
    assert outbox_second == ["m001"]
    pd.testing.assert_frame_equal(ledger_second, ledger_first, obj="send_ledger")
