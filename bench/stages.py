"""The benchmark's stages; each group runs in its own child process started by `run.py`.

Peak memory: each child resets the kernel's peak-RSS mark (write "5" to
/proc/self/clear_refs, Linux only) before a stage and reads VmHWM after it, so a stage's
peak is the highest resident size of the process while that stage ran, including the
inputs it holds. tracemalloc is not used because it misses numpy's and Arrow's buffers
outside Python's allocator and slows pandas several times.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
from generate import BROADCAST_ID, STARTS_AT, Scenario, write_inputs

from livecrm_dagster.event_files import COLUMNS, EventFiles

# The columns the `viewing_sessions` and `viewer_summary` assets read from the event files.
SESSION_EVENT_COLUMNS = ["member_id", "device_id", "type", "occurred_at"]
SUMMARY_EVENT_COLUMNS = [
    "member_id",
    "type",
    "occurred_at",
    "product_id",
    "question_id",
    "answer",
    "is_correct",
]

ZONE = ZoneInfo("Asia/Tokyo")
SCENARIO_VARIABLE = "LIVECRM_BENCH_SCENARIO"
TEXT_COLUMNS = [column for column in COLUMNS if column not in ("occurred_at", "is_correct")]
# Runs of each stage that takes seconds, not minutes. The fastest run counts (see Recorder).
REPEATS = 3
# A plain numpy copy of one 8-byte value per event. It is not the project's work but the
# machine's own cost of touching that much memory, a reference for the growth ratios.
MACHINE_COPY = "machine: copy 8 bytes per event"
MACHINE_COPY_REPEATS = 5


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Recorder:
    """Times stages and records each one's peak RSS in MiB."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, float]] = {}

    def measure(
        self,
        name: str,
        work: Callable[[], object],
        rows: Callable[[object], int] | None = None,
        repeat: int = 1,
        before_each: Callable[[], object] | None = None,
    ):
        """Run `work` `repeat` times and record the fastest run and the highest peak.

        Single runs of a stage of a second or two varied by a third on a quiet machine,
        which swamps a growth ratio. The fastest of several runs, which `timeit` also
        reports, varies far less. Every run does the whole work from the same inputs, and
        `before_each` (untimed) restores the state that a run starts from.
        """
        rss_before = _status_kib("VmRSS") / 1024
        peak_reset = _reset_peak()
        runs = []
        for _ in range(repeat):
            value = None  # Let a repeat free the previous run's result first.
            if before_each is not None:
                before_each()
            started = time.perf_counter()
            value = work()
            runs.append(time.perf_counter() - started)
        result = {
            "seconds": min(runs),
            "runs": runs,
            "rss_before_mib": rss_before,
            "peak_rss_mib": _status_kib("VmHWM") / 1024,
            "peak_is_per_stage": peak_reset,
        }
        if rows is not None:
            result["rows"] = rows(value)
        self.results[name] = result
        return value

    def emit(self, extra: dict | None = None) -> None:
        print(json.dumps({"stages": self.results, **(extra or {})}))


def stage_generate(scenario: Scenario, folder: Path) -> None:
    recorder = Recorder()
    counts = recorder.measure("generate", lambda: write_inputs(scenario, folder))
    recorder.emit({"counts": counts})


def prepare_valid_events(scenario: Scenario, folder: Path) -> pd.DataFrame:
    """Return the valid events of the generated file without the project's validation.

    Used above `--ingest-max`, where the project's string-by-string loader and validation
    need more time and memory than the benchmark's budget. It does what validation does to
    this generator's rows: parse times, quarantine implausible ones, keep the first copy of
    each event_id, and sort by (occurred_at, event_id). `stage_ingest` checks that both
    give the same frame whenever the project's validation runs.
    """
    events = pd.read_parquet(folder / f"events-{BROADCAST_ID}.parquet").drop(columns="broadcast_id")
    for column in TEXT_COLUMNS:
        events[column] = events[column].astype(object)
    occurred = pd.to_datetime(events["occurred_at"], utc=True, format="ISO8601")
    events["occurred_at"] = occurred.astype("datetime64[us, UTC]")
    window = pd.Timedelta(hours=24)
    plausible = (occurred >= STARTS_AT - window) & (occurred <= scenario.ends_at + window)
    events = events.loc[plausible.to_numpy()]
    events = events.loc[~events["event_id"].duplicated(keep="first").to_numpy()]
    correct = events["is_correct"].map({"true": True, "false": False, "": pd.NA})
    events["is_correct"] = correct.astype("boolean")
    events = events.sort_values(["occurred_at", "event_id"]).reset_index(drop=True)
    return events[COLUMNS]


def stage_prepare(scenario: Scenario, folder: Path) -> None:
    from livecrm_dagster.defs.ingestion.files import read_file
    from livecrm_dagster.defs.ingestion.orders import validate_orders

    EventFiles(folder / "events").replace(BROADCAST_ID, prepare_valid_events(scenario, folder))
    order_rows, _ = read_file(folder / "orders.parquet")
    validate_orders(order_rows).lines.to_parquet(folder / "valid-orders.parquet")
    print(json.dumps({"stages": {}}))


def stage_ingest(scenario: Scenario, folder: Path) -> None:
    """Load the partition's Parquet file with the project's reader, then validate it."""
    from livecrm_dagster.defs.ingestion.events import validate_viewer_events
    from livecrm_dagster.defs.ingestion.files import read_file
    from livecrm_dagster.defs.ingestion.orders import validate_orders

    recorder = Recorder()
    rows, _ = recorder.measure(
        "load", lambda: read_file(folder / f"events-{BROADCAST_ID}.parquet"), lambda r: len(r[0])
    )
    batch = recorder.measure(
        "validation",
        lambda: validate_viewer_events(
            rows, BROADCAST_ID, STARTS_AT, scenario.ends_at, implausible_hours=24
        ),
        lambda b: b.rows_read,
    )
    rows = None  # Free the string frame before the next step.
    shortcut = prepare_valid_events(scenario, folder)
    pd.testing.assert_frame_equal(batch.events, shortcut, check_dtype=False)
    del shortcut
    recorder.measure(
        "store raw events",
        lambda: EventFiles(folder / "events").replace(BROADCAST_ID, batch.events),
        lambda count: count,
        repeat=REPEATS,
    )
    order_rows, _ = read_file(folder / "orders.parquet")
    orders = validate_orders(order_rows)
    orders.lines.to_parquet(folder / "valid-orders.parquet")
    recorder.emit(
        {
            "valid_events": len(batch.events),
            "quarantined": len(batch.quarantine),
            "duplicates_dropped": batch.duplicates_dropped,
        }
    )


class ResultsDiffer(Exception):
    """The project's result and DuckDB's differ, so no time may be printed."""


def _require(condition: bool, message: str) -> None:
    # Not `assert`, which python -O (or PYTHONOPTIMIZE, inherited by the children) skips.
    if not condition:
        raise ResultsDiffer(message)


def _compare(
    ours_sessions: pd.DataFrame, ours_members: pd.DataFrame, summary: pd.DataFrame, duck
) -> dict:
    """Raise ResultsDiffer unless the pandas and DuckDB results are identical."""
    duck_sessions, duck_members = duck
    left = ours_sessions.reset_index(drop=True)
    right = duck_sessions.reset_index(drop=True)
    _require(
        len(left) == len(right), f"session count differs: ours {len(left)}, DuckDB {len(right)}"
    )
    for column in ("member_id", "session_no", "events", "events_inside", "devices"):
        same = np.array_equal(left[column].to_numpy(), right[column].to_numpy())
        _require(same, f"sessions differ in {column}")
    for column in ("started_at", "ended_at"):
        ours = left[column].dt.tz_convert(None).to_numpy().astype("datetime64[us]")
        theirs = right[column].dt.tz_convert(None).to_numpy().astype("datetime64[us]")
        _require(np.array_equal(ours, theirs), f"sessions differ in {column}")
    ours_us = np.round(left["watched_seconds"].to_numpy() * 1e6).astype(np.int64)
    _require(
        np.array_equal(ours_us, right["watched_us"].to_numpy()), "session watched seconds differ"
    )

    members = ours_members.sort_index()
    _require(list(members.index) == list(duck_members["member_id"]), "viewing members differ")
    member_us = np.round(members["watched_seconds"].to_numpy() * 1e6).astype(np.int64)
    _require(
        np.array_equal(member_us, duck_members["watched_us"].to_numpy()),
        "member watched seconds differ",
    )
    _require(
        np.array_equal(members["sessions"].to_numpy(), duck_members["sessions"].to_numpy()),
        "member session counts differ",
    )
    rate_gap = np.abs(members["viewing_rate"].to_numpy() - duck_members["viewing_rate"].to_numpy())
    _require(rate_gap.max(initial=0.0) <= 1e-12, f"viewing rate differs by {rate_gap.max()}")

    table = summary.set_index("member_id").sort_index()
    _require(list(table.index) == list(duck_members["member_id"]), "viewer summary members differ")
    for column in ("sessions", "chats", "likes", "clicks"):
        same = np.array_equal(table[column].to_numpy(), duck_members[column].to_numpy())
        _require(same, f"viewer summary differs in {column}")
    for column in ("first_seen_at", "last_seen_at"):
        ours = table[column].dt.tz_convert(None).to_numpy().astype("datetime64[us]")
        theirs = duck_members[column].dt.tz_convert(None).to_numpy().astype("datetime64[us]")
        _require(np.array_equal(ours, theirs), f"viewer summary differs in {column}")
    return {"sessions": len(left), "viewing_members": len(members)}


def member_profiles(events: pd.DataFrame) -> pd.DataFrame:
    """Return made-up profiles (age, birth date, gender) of the members in the events."""
    members = pd.DataFrame({"member_id": pd.Series(events["member_id"].unique(), dtype=object)})
    members = members.loc[members["member_id"] != ""].reset_index(drop=True)
    codes = np.arange(len(members))
    members["birth_date"] = np.where(codes % 3 == 0, "", "1990-04-01")
    members["age"] = pd.array(np.where(codes % 3 == 0, 20 + codes % 50, -1), dtype="Int64")
    members.loc[members["age"] < 0, "age"] = pd.NA
    members["gender"] = np.where(codes % 4 == 0, "", np.where(codes % 2 == 0, "female", "male"))
    return members


def valid_orders(folder: Path) -> pd.DataFrame:
    orders = pd.read_parquet(folder / "valid-orders.parquet")
    for column in ("order_id", "member_id", "status", "product_id", "refund_of"):
        orders[column] = orders[column].astype(object)
    return orders


def stage_transform(scenario: Scenario, folder: Path, duckdb_threads: int | None) -> None:
    """Sessions, attribution, viewer summary and segments, then the DuckDB check.

    Ours starts from the partition's event file, read as the `viewing_sessions` and
    `viewer_summary` assets read it; DuckDB scans the same file with `read_parquet`.
    """
    import duck

    from livecrm_dagster.defs.attribution.attribute import Broadcast, attribute_orders
    from livecrm_dagster.defs.ingestion.orders import net_order_lines
    from livecrm_dagster.defs.reporting.summary import viewer_summary
    from livecrm_dagster.defs.segments.segment import followup_audience
    from livecrm_dagster.defs.sessions.sessionize import sessions_of_blocks, watched_by_member

    starts, ends, timeout = STARTS_AT, scenario.ends_at, scenario.timeout_seconds
    files = EventFiles(folder / "events")
    orders = valid_orders(folder)

    # Untimed: the members for made-up profiles, and the heartbeat count for the report.
    events = files.read(BROADCAST_ID, columns=["member_id", "type"], categorical=True)
    members = member_profiles(events)
    heartbeats = int((events["type"] == "heartbeat").sum())
    event_count = len(events)
    events = None

    recorder = Recorder()
    per_event = np.arange(event_count, dtype=np.int64)
    recorder.measure(MACHINE_COPY, per_event.copy, len, repeat=MACHINE_COPY_REPEATS)
    del per_event
    # Sessions and the viewer summary read the file in member blocks, as their assets do,
    # so their times include the reads.
    sessions = recorder.measure(
        "sessions",
        lambda: sessions_of_blocks(
            files.blocks(BROADCAST_ID, columns=SESSION_EVENT_COLUMNS, categorical=True),
            starts,
            ends,
            timeout,
        ),
        len,
        REPEATS,
    )
    watched = recorder.measure(
        "watched_by_member", lambda: watched_by_member(sessions, starts, ends), len, REPEATS
    )

    def attribute() -> pd.DataFrame:
        window_end = ends + pd.Timedelta(days=7)
        sales = orders.loc[
            (orders["refund_of"] == "")
            & (orders["paid_at"] >= starts)
            & (orders["paid_at"] <= window_end)
        ]
        notes = orders.loc[orders["refund_of"].isin(sales["order_id"])]
        lines = net_order_lines(sales, notes)
        clicks = files.read(
            BROADCAST_ID,
            columns=["member_id", "product_id", "occurred_at"],
            types=["product_click"],
        )
        other = pd.DataFrame(
            {
                "member_id": pd.Series(dtype=object),
                "broadcast_id": pd.Series(dtype=object),
                "starts_at": pd.Series(dtype="datetime64[us, UTC]"),
            }
        )
        return attribute_orders(
            Broadcast(BROADCAST_ID, starts, ends), lines, watched.index, clicks, other, 7, 7, ZONE
        )

    attribution = recorder.measure("attribution", attribute, len, REPEATS)
    summary = recorder.measure(
        "viewer_summary",
        lambda: viewer_summary(
            files.blocks(BROADCAST_ID, columns=SUMMARY_EVENT_COLUMNS, categorical=True),
            watched,
            attribution,
            members,
            starts,
            ZONE,
        ),
        len,
        REPEATS,
    )
    answers = files.read(
        BROADCAST_ID,
        columns=["member_id", "type", "occurred_at", "question_id", "answer", "is_correct"],
        types=["answer"],
    )
    audience = recorder.measure(
        "segments",
        lambda: followup_audience(summary, attribution, answers, 0.8, 0.4, 1, 0.8),
        len,
        REPEATS,
    )
    reference = recorder.measure(
        "duckdb_sessions_and_summary",
        lambda: duck.sessions_and_members(
            files.path(BROADCAST_ID), starts, ends, timeout, duckdb_threads
        ),
        lambda value: len(value[0]),
        REPEATS,
    )
    checked = _compare(sessions, watched, summary, reference)

    derived = {
        "viewing_sessions": sessions,
        "viewer_summary": summary,
        "order_attribution": attribution,
        "followup_audience": audience,
    }
    for name, frame in derived.items():
        frame.to_pickle(folder / f"{name}.pickle")
    recorder.emit({"checked": checked, "heartbeat_events": heartbeats})


def stage_write(folder: Path, url: str, label: str) -> None:
    """Write the derived tables of the partition to a warehouse, as the assets do.

    Each table is written three times, each time into the empty table, so every run is a
    first write of the partition. `bench/warehouse_load.py` times rewrites.

    On SQLite each timed write ends with a checkpoint of the write-ahead log, and starts
    with an empty log. SQLite itself checkpoints at the first commit that leaves 1,000
    pages or more in the log: a write of fewer pages left its checkpoint to a later
    commit, and a larger one paid for its own. The 37,266 audience rows at 4 M events
    take 835 pages and the 148,709 at 16 M 3,427, so the write seemed to grow 4.4 ×
    while the work grows 4.0 ×.
    """
    import sqlalchemy as sa

    from livecrm_dagster.warehouse import Warehouse

    store = Warehouse(url)
    sqlite = store.dialect == "sqlite"
    recorder = Recorder()
    for name in ("viewing_sessions", "viewer_summary", "order_attribution", "followup_audience"):
        frame = pd.read_pickle(folder / f"{name}.pickle")
        empty = f'DELETE FROM "{name}"' if sqlite else f'TRUNCATE "{name}"'

        def empty_table(statement: str = empty) -> None:
            with store.engine.begin() as connection:
                connection.execute(sa.text(statement))
            if sqlite:
                _checkpoint(store.engine, "TRUNCATE")

        def write(frame: pd.DataFrame = frame, name: str = name) -> int:
            written = store.replace_partition(name, BROADCAST_ID, frame)
            if sqlite:
                _checkpoint(store.engine, "PASSIVE")
            return written

        recorder.measure(
            f"{label}:{name}", write, lambda count: count, REPEATS, before_each=empty_table
        )
    store.engine.dispose()
    recorder.emit()


def _checkpoint(engine, mode: str) -> None:
    """Copy SQLite's write-ahead log into the database file (TRUNCATE also empties it)."""
    with engine.connect() as connection:
        busy = connection.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})").first()[0]
    if busy:
        raise RuntimeError(f"the SQLite checkpoint ({mode}) was blocked by another connection")


def main(argv: list[str]) -> None:
    stage, folder, events = argv[0], Path(argv[1]), int(argv[2])
    # run.py passes the generator's parameters other than the event count as JSON.
    scenario = Scenario(events=events, **json.loads(os.environ.get(SCENARIO_VARIABLE, "{}")))
    if stage == "generate":
        stage_generate(scenario, folder)
    elif stage == "prepare":
        stage_prepare(scenario, folder)
    elif stage == "ingest":
        stage_ingest(scenario, folder)
    elif stage == "transform":
        stage_transform(scenario, folder, int(argv[3]) or None)
    elif stage == "write":
        stage_write(folder, argv[3], argv[4])
    else:
        raise SystemExit(
            f"unknown stage {stage!r}; expected generate, prepare, ingest, transform or write"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
