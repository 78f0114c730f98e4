"""Scale-out with dagster-celery: the broadcast job's steps run on two Celery workers.

The test starts two `dagster-celery` workers over the Redis server at 127.0.0.1:6379 and
backfills three broadcasts with the job `broadcast_analytics_celery`. Its warehouse must
then hold the same rows as a single-process run of `broadcast_analytics` into a second
warehouse. Dagster's storage is a fresh PostgreSQL database that the test process and
the workers share through DAGSTER_HOME.

Both paths run one broadcast after another in the same order. A broadcast's attribution
reads the sessions of the broadcasts built before it, and the check `orders_counted_once`
reads their attribution, so the rows depend on the order of the runs. Within a run,
steps that do not depend on each other run on both workers at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import redis
import sqlalchemy as sa
import yaml
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.events import DagsterEventType
from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app

from livecrm_dagster.pipeline import register_broadcasts
from livecrm_dagster.settings import DEFAULT_SETTINGS_PATH
from livecrm_dagster.tables import SCHEMAS
from livecrm_dagster.warehouse import Warehouse
from tests.conftest import SourceFolder, heartbeats
from tests.test_main_job import B1, B2, _order, two_broadcasts  # noqa: F401 - fixture reused
from tests.test_operator_path import (
    BIN,
    BROADCAST_TABLES,
    IN_PROCESS,
    PROFILE,
    PROJECT,
    _load_reference_data,
    fresh_database,
    log_tails,
    read_broadcast_rows,
    stop_process_group,
)

# dagster-celery registers its step task on the Celery app again for every step it
# submits. Celery keeps the first registration, which is the same function.
pytestmark = pytest.mark.filterwarnings("ignore:Task name 'execute_plan' is already registered")

B3 = "b003"
BROADCASTS = [B1, B2, B3]
REDIS_URL = os.environ.get("LIVECRM_TEST_REDIS", "redis://127.0.0.1:6379/15")
WORKER_NAMES = ["livecrm-a", "livecrm-b"]
WORKER_START_TIMEOUT = 60
# The three Celery runs took about 30 s on a 2-core machine shared with other jobs.
BACKFILL_TIMEOUT = 180
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

# A tier rule that differs from the bundled shop.yaml: without a minimum of chats, m004
# (50 of 60 minutes of b001, no chat) is a hot viewer instead of a mid one. Workers that
# did not receive LIVECRM_SETTINGS would write the bundled file's segments.
HOT_MIN_CHATS = 0


@pytest.fixture(scope="module")
def three_broadcasts(two_broadcasts, tmp_path_factory) -> SourceFolder:  # noqa: F811
    """The two hand-computed broadcasts plus b003, whose viewers also watched b001."""
    source = SourceFolder(tmp_path_factory.mktemp("three") / "source")
    shutil.copytree(two_broadcasts.root, source.root)
    day3, day4 = "2024-06-14T", "2024-06-15T"
    source.csv(
        "broadcasts",
        "schedule-b003.csv",
        [
            {
                "broadcast_id": B3,
                "title": "Weekend skincare",
                "starts_at": day3 + "20:00:00+09:00",
                "ends_at": day3 + "21:00:00+09:00",
                "featured_product_ids": "P-1",
                "archive_url": "https://shop.example/live/b003",
            }
        ],
    )
    events = (
        heartbeats("m002", B3, day3 + "20:00:00+09:00", day3 + "21:00:00+09:00")
        + heartbeats("m006", B3, day3 + "20:00:00+09:00", day3 + "20:40:00+09:00")
        + heartbeats("m003", B3, day3 + "20:30:00+09:00", day3 + "20:40:00+09:00")
    )
    events.append(
        {
            "event_id": "c3",
            "broadcast_id": B3,
            "member_id": "m002",
            "type": "chat",
            "occurred_at": day3 + "20:15:00+09:00",
            "text": "restocked?",
        }
    )
    source.jsonl("viewer_events", f"{B3}/events.jsonl", events)
    source.csv(
        "orders",
        "export-3.csv",
        [
            _order("o7", "m006", day3 + "20:30:00+09:00", "P-1", 1, 4000),
            # Paid after b003, which m003 watched after b001: the order counts for b003.
            _order("o8", "m003", day4 + "10:00:00+09:00", "P-2", 2, 1000),
        ],
    )
    return source


@dataclass
class Workers:
    """Two Celery worker processes in one process group, with their logs."""

    logs_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def group(self) -> int:
        return self.processes[0].pid

    def logs(self) -> str:
        return log_tails(self.logs_dir)


@dataclass
class ScaleOut:
    """Both warehouses after the builds, the Celery runs and the workers that ran them."""

    instance: dg.DagsterInstance
    celery_warehouse: str
    reference_warehouse: str
    celery_run_ids: list[str]
    workers: Workers


def celery_config(redis_url: str, token: str) -> dict:
    """Return the celery executor's config: broker and results on Redis, keys under `token`."""
    # Every key and channel of the broker and of the results starts with the prefix, and
    # the tasks go to a queue of this test's own. Other users of the Redis database are
    # left alone, and teardown deletes exactly the keys that this test created.
    prefix = {"global_keyprefix": f"{token}:"}
    return {
        "broker": redis_url,
        "backend": redis_url,
        "config_source": {
            "task_default_queue": token,
            "broker_transport_options": prefix,
            "result_backend_transport_options": prefix,
        },
    }


def check_redis(redis_url: str) -> None:
    """Fail at once, naming the URL, when the Redis server does not reply."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.ConnectionError as error:
        pytest.fail(
            f"Redis at {redis_url} is not reachable ({error}); start it or point "
            "LIVECRM_TEST_REDIS at another server"
        )
    finally:
        client.close()


def delete_keys(redis_url: str, token: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{token}:*", count=500):
            client.delete(key)
    finally:
        client.close()


def start_workers(config: dict, environment: dict[str, str], root: Path) -> Workers:
    """Start both workers with `dagster-celery worker start` in a group the first leads."""
    config_path = root / "celery.yaml"
    config_path.write_text(yaml.safe_dump({"execution": {"config": config}}), encoding="utf-8")
    workers = Workers(logs_dir=root / "logs")
    workers.logs_dir.mkdir()
    for name in WORKER_NAMES:
        group = {"process_group": workers.group if workers.processes else 0}
        command = [
            str(BIN / "dagster-celery"), "worker", "start",
            "-A", "dagster_celery.app",
            "-y", str(config_path),
            "-q", config["config_source"]["task_default_queue"],
            "-n", name,
            # Imported before the pool forks, so each pool process starts with Dagster loaded
            # and loads only the asset modules on its first task.
            "-i", "livecrm_dagster.definitions",
            "--",
            "--concurrency=1", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        with (workers.logs_dir / f"{name}.log").open("wb") as log:
            workers.processes.append(
                subprocess.Popen(
                    command,
                    cwd=PROJECT,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    **group,
                )
            )
    return workers


def wait_for_workers(workers: Workers, config: dict) -> None:
    """Ping over the broker until both workers reply, or fail with their logs."""
    app = make_app(CeleryExecutor.for_cli(**config).app_args())
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    answered: set[str] = set()
    try:
        while time.monotonic() < deadline:
            for process in workers.processes:
                if process.poll() is not None:
                    pytest.fail(f"worker exited with code {process.returncode}\n{workers.logs()}")
            replies = app.control.ping(timeout=1.0)
            answered = {name.split("@")[0] for reply in replies for name in reply}
            if answered >= set(WORKER_NAMES):
                return
    finally:
        app.close()
    pytest.fail(
        f"only {sorted(answered)} of {WORKER_NAMES} answered after {WORKER_START_TIMEOUT} s\n"
        f"{workers.logs()}"
    )


def backfill(
    instance: dg.DagsterInstance,
    job_name: str,
    run_config: dict,
    failure_context: Callable[[], str] = lambda: "",
) -> list[str]:
    """Run `job_name` once per broadcast, one run after another, and return the run IDs."""
    # The job is loaded from the code location as the workspace names it, so the workers
    # rebuild it from the same module.
    job = ReconstructableRepository.for_module(
        "livecrm_dagster.definitions", "defs", working_directory=str(PROJECT)
    ).get_reconstructable_job(job_name)
    run_ids = []
    for broadcast_id in BROADCASTS:
        result = dg.execute_job(
            job,
            instance,
            run_config=run_config,
            tags={"dagster/partition": broadcast_id, "livecrm/broadcast": broadcast_id},
        )
        assert result.success, f"{job_name} failed for {broadcast_id}\n{failure_context()}"
        run_ids.append(result.run_id)
    return run_ids


@contextlib.contextmanager
def time_limit(seconds: int, failure_context: Callable[[], str]) -> Iterator[None]:
    """Raise TimeoutError in the main thread after `seconds`.

    The Celery executor waits for each task's result without a deadline, so a lost task
    would otherwise hang the test.
    """

    def expire(_signal_number, _frame):
        raise TimeoutError(f"timed out after {seconds} s\n{failure_context()}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def scale_out(three_broadcasts, tmp_path_factory) -> Iterator[ScaleOut]:
    """Reference and Celery builds of three broadcasts, with the workers still running."""
    root = tmp_path_factory.mktemp("scale_out")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(PROFILE, home / "dagster.yaml")
    settings = root / "shop.yaml"
    settings.write_text(
        DEFAULT_SETTINGS_PATH.read_text(encoding="utf-8").replace(
            "hot_min_chats: 1", f"hot_min_chats: {HOT_MIN_CHATS}"
        ),
        encoding="utf-8",
    )
    token = f"livecrm-test-{uuid.uuid4().hex[:12]}"
    config = celery_config(REDIS_URL, token)
    check_redis(REDIS_URL)

    with contextlib.ExitStack() as stack:
        storage = sa.engine.make_url(stack.enter_context(fresh_database()))
        celery_warehouse = stack.enter_context(fresh_database())
        reference_warehouse = stack.enter_context(fresh_database())
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for name, value in {
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_USERNAME": storage.username or "root",
            "DAGSTER_PG_PASSWORD": storage.password or "",
            "DAGSTER_PG_HOST": storage.host or "127.0.0.1",
            "DAGSTER_PG_DB": storage.database,
            "LIVECRM_SOURCE_DIR": str(three_broadcasts.root),
            "LIVECRM_SETTINGS": str(settings),
            "LIVECRM_WAREHOUSE_URL": reference_warehouse,
        }.items():
            patch.setenv(name, value)
        instance = stack.enter_context(dg.DagsterInstance.get())

        # The workers get a copy of this process's environment, which carries DAGSTER_HOME,
        # the DAGSTER_PG_* variables and every LIVECRM_* variable, with the Celery build's
        # warehouse in LIVECRM_WAREHOUSE_URL. They start now and load during the reference.
        environment = {
            **os.environ,
            "LIVECRM_WAREHOUSE_URL": celery_warehouse,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        stack.callback(delete_keys, REDIS_URL, token)
        workers = start_workers(config, environment, root)
        stack.callback(stop_process_group, workers.processes)

        for warehouse_url in (reference_warehouse, celery_warehouse):
            _load_reference_data(instance, warehouse_url, str(three_broadcasts.root))
        register_broadcasts(instance, BROADCASTS)
        backfill(instance, "broadcast_analytics", {**IN_PROCESS, **QUIET})

        patch.setenv("LIVECRM_WAREHOUSE_URL", celery_warehouse)
        wait_for_workers(workers, config)
        with time_limit(BACKFILL_TIMEOUT, workers.logs):
            run_ids = backfill(
                instance,
                "broadcast_analytics_celery",
                {"execution": {"config": config}, **QUIET},
                failure_context=workers.logs,
            )
        yield ScaleOut(instance, celery_warehouse, reference_warehouse, run_ids, workers)


def read_quarantine(warehouse_url: str) -> pd.DataFrame:
    store = Warehouse(warehouse_url)
    frame = store.read("quarantine")
    store.engine.dispose()
    return frame.sort_values(list(SCHEMAS["quarantine"][1])).reset_index(drop=True)


@pytest.mark.parametrize("broadcast_id", BROADCASTS)
def test_celery_rows_match_single_process(scale_out, broadcast_id):
    celery = read_broadcast_rows(scale_out.celery_warehouse, broadcast_id)
    reference = read_broadcast_rows(scale_out.reference_warehouse, broadcast_id)
    assert len(celery["broadcast_kpis"]) == 1, f"no KPI row for {broadcast_id}"
    assert len(celery["viewer_summary"]) > 0, f"no viewer summary for {broadcast_id}"
    for name in BROADCAST_TABLES:
        pd.testing.assert_frame_equal(celery[name], reference[name], obj=name)


def test_celery_quarantine_matches_single_process(scale_out):
    pd.testing.assert_frame_equal(
        read_quarantine(scale_out.celery_warehouse),
        read_quarantine(scale_out.reference_warehouse),
        obj="quarantine",
    )


def test_workers_used_settings_file(scale_out):
    store = Warehouse(scale_out.celery_warehouse)
    audience = store.read("followup_audience", broadcast_id=B1)
    store.engine.dispose()
    hot = sorted(audience.loc[audience["segment"] == "hot", "member_id"])
    assert hot == ["m001", "m004"], f"hot segment of {B1} with hot_min_chats {HOT_MIN_CHATS}"


def step_processes(scale_out: ScaleOut) -> dict[int, list[str]]:
    """Return the step keys each process started, from the Celery runs' STEP_START events."""
    steps: dict[int, list[str]] = {}
    for run_id in scale_out.celery_run_ids:
        starts = scale_out.instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)
        assert starts, f"run {run_id} started no step"
        for entry in starts:
            steps.setdefault(entry.dagster_event.pid, []).append(entry.step_key)
    return steps


def test_steps_ran_in_worker_processes(scale_out):
    worker_group = scale_out.workers.group
    for pid, step_keys in step_processes(scale_out).items():
        assert pid != os.getpid(), f"steps {step_keys} ran in the test process"
        assert os.getpgid(pid) == worker_group, (
            f"steps {step_keys} ran in process {pid}, outside the workers' process group "
            f"{worker_group}"
        )


def test_both_workers_ran_steps(scale_out):
    steps_by_worker: dict[str, list[str]] = {}
    for run_id in scale_out.celery_run_ids:
        for entry in scale_out.instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
            metadata = entry.dagster_event.engine_event_data.metadata
            if "Celery worker" in metadata:
                worker = metadata["Celery worker"].value.split("@")[0]
                steps_by_worker.setdefault(worker, []).append(entry.step_key)
    assert sorted(steps_by_worker) == WORKER_NAMES, f"steps per worker: {steps_by_worker}"


def test_workers_received_livecrm_variables(scale_out):
    # The fixture's environment is still in place while its tests run.
    expected = {name: value for name, value in os.environ.items() if name.startswith("LIVECRM_")}
    assert {"LIVECRM_WAREHOUSE_URL", "LIVECRM_SOURCE_DIR", "LIVECRM_SETTINGS"} <= set(expected)
    for pid in step_processes(scale_out):
        # A pool process is forked without exec, so this is the Celery worker's environment.
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        received = dict(
            item.decode().split("=", 1) for item in environ if item.startswith(b"LIVECRM_")
        )
        assert received == expected, f"LIVECRM_* variables of step process {pid}"
