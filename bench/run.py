"""Benchmark one broadcast partition at several event counts; see bench/RESULTS.md.

Each scale runs these child processes in turn (stages.py): generate the Parquet inputs,
load and validate them with the project's code (up to --ingest-max events), build
sessions, attribution, viewer summary and segments and check sessions and the viewer
summary against an independent DuckDB implementation, then write the derived tables to
SQLite and to a PostgreSQL database created for the run and dropped afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from stages import MACHINE_COPY, MACHINE_COPY_REPEATS, REPEATS

HERE = Path(__file__).resolve().parent
DERIVED = ("viewing_sessions", "viewer_summary", "order_attribution", "followup_audience")
# The generator's parameters set with --set, the same for every scale.
SCENARIO: dict[str, float] = {}

# Ours for "sessions + viewer summary": the assets' read of the event file and their
# computations. DuckDB's figure likewise includes scanning the same file.
OURS = ("sessions", "watched_by_member", "viewer_summary")


def _child(*arguments: str) -> dict:
    command = [sys.executable, str(HERE / "stages.py"), *arguments]
    environment = {**os.environ, "LIVECRM_BENCH_SCENARIO": json.dumps(SCENARIO)}
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=HERE, check=False, env=environment
    )
    if done.returncode != 0:
        raise SystemExit(f"stage {arguments[0]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _postgres_database(server: str) -> tuple[str, str]:
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return name, f"{server.replace('postgresql://', 'postgresql+psycopg://')}/{name}"


def _drop_postgres_database(server: str, name: str) -> None:
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_scale(events: int, folder: Path, args: argparse.Namespace, postgres_url: str) -> dict:
    folder.mkdir(parents=True)
    stages: dict[str, dict] = {}
    generated = _child("generate", str(folder), str(events))
    stages.update(generated["stages"])
    result = {"events": generated["counts"]["events"], "counts": generated["counts"]}
    if events <= args.ingest_max:
        ingested = _child("ingest", str(folder), str(events))
        stages.update(ingested["stages"])
        result["quarantined"] = ingested["quarantined"]
        result["duplicates_dropped"] = ingested["duplicates_dropped"]
    else:
        _child("prepare", str(folder), str(events))
    transformed = _child("transform", str(folder), str(events), str(args.duckdb_threads))
    stages.update(transformed["stages"])
    result["checked"] = transformed["checked"]
    result["heartbeat_events"] = transformed["heartbeat_events"]
    sqlite_url = f"sqlite:///{folder / 'warehouse.sqlite'}"
    stages.update(_child("write", str(folder), "0", sqlite_url, "sqlite")["stages"])
    if postgres_url:
        stages.update(_child("write", str(folder), "0", postgres_url, "postgresql")["stages"])
    result["stages"] = stages
    shutil.rmtree(folder)
    return result


def _row(name: str, stage: dict) -> str:
    rate = ""
    if stage.get("rows") and name.split(":")[0] in ("sqlite", "postgresql"):
        rate = f"{stage['rows'] / stage['seconds']:>12,.0f}"
    rows = f"{stage['rows']:>11,}" if "rows" in stage else " " * 11
    return (
        f"  {name:<38} {stage['seconds']:>8.3f} s {rows} {rate:>12} "
        f"{stage['peak_rss_mib']:>8.0f} MiB"
    )


def report(result: dict) -> None:
    stages = result["stages"]
    ours = sum(stages[name]["seconds"] for name in OURS)
    duck = stages["duckdb_sessions_and_summary"]["seconds"]
    peak = max(stages[name]["peak_rss_mib"] for name in OURS)
    print(
        f"\n{result['events']:,} events ({result['heartbeat_events']:,} heartbeats, "
        f"{result['counts']['members']:,} members, {result['checked']['sessions']:,} sessions, "
        f"{result['checked']['viewing_members']:,} viewing members)"
    )
    print("  DuckDB check: sessions and per-member watched seconds identical")
    print(
        f"  (every stage from store raw events on shows the fastest of {REPEATS} runs, "
        f"the machine copy the fastest of {MACHINE_COPY_REPEATS})"
    )
    print(f"  {'stage':<38} {'time':>10} {'rows':>11} {'rows/s':>12} {'peak RSS':>12}")
    for name, stage in stages.items():
        print(_row(name, stage))
    for label in ("sqlite", "postgresql"):
        written = [stage for name, stage in stages.items() if name.startswith(label + ":")]
        if written:
            rows = sum(stage["rows"] for stage in written)
            seconds = sum(stage["seconds"] for stage in written)
            rate = rows / seconds
            print(f"  {label} derived tables: {rows:,} rows in {seconds:.2f} s, {rate:,.0f} rows/s")
    print(
        f"  sessions + viewer summary from the event file: ours {ours:.2f} s, DuckDB {duck:.2f} s, "
        f"ours / DuckDB = {ours / duck:.2f}; peak RSS {peak:,.0f} MiB"
    )


def growth(results: list[dict]) -> None:
    if len(results) < 2:
        return
    print("\ngrowth of time between scales (events ratio, time ratio per stage)")
    for smaller, larger in zip(results, results[1:], strict=False):
        events_ratio = larger["events"] / smaller["events"]
        print(f"  {smaller['events']:,} -> {larger['events']:,} events ({events_ratio:.2f}x):")
        for name, stage in larger["stages"].items():
            before = smaller["stages"].get(name)
            if before and before["seconds"] > 0:
                ratio = stage["seconds"] / before["seconds"]
                limit = 1.1 * events_ratio
                verdict = "ok" if ratio <= limit else f"above {limit:.1f}x"
                if name == MACHINE_COPY:
                    verdict = "the machine itself, for reference"
                print(f"    {name:<38} {ratio:>6.2f}x  {verdict}")


def _scenario_parameters(settings: list[str], parser: argparse.ArgumentParser) -> dict:
    from generate import Scenario

    fields = {field.name: field.type for field in dataclasses.fields(Scenario)}
    parameters = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if name not in fields or name == "events":
            known = ", ".join(sorted(set(fields) - {"events"}))
            parser.error(f"--set {setting!r}: unknown parameter; known: {known}")
        try:
            parameters[name] = int(value) if fields[name] in (int, "int") else float(value)
        except ValueError:
            parser.error(f"--set {setting!r}: {value!r} is not a number")
    return parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events",
        type=int,
        nargs="+",
        default=[1_000_000, 4_000_000, 16_000_000],
        help="event counts of the generated broadcast, one run each",
    )
    parser.add_argument("--quick", action="store_true", help="run one scale of about 1 M events")
    parser.add_argument(
        "--ingest-max",
        type=int,
        default=4_000_000,
        help="largest event count loaded and validated with the project's code "
        "(it needs about 0.8 GiB and 12 s per million events on 2 cores)",
    )
    parser.add_argument(
        "--duckdb-threads",
        type=int,
        default=0,
        help="DuckDB threads; 0 keeps DuckDB's default (one per core)",
    )
    parser.add_argument(
        "--postgres",
        default="postgresql://root@127.0.0.1:5432",
        help="PostgreSQL server to create a scratch database on; empty to skip",
    )
    parser.add_argument(
        "--workdir", default=tempfile.gettempdir(), help="folder for generated files"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter of bench/generate.py's Scenario, for example length_minutes=90, "
        "heartbeat_seconds=5, missing_view_end_share=0.5, second_device_share=0.1, "
        "duplicate_share=0.05 or cancelled_share=0.2; repeatable. The member count "
        "follows from the events, the broadcast length and the views per member.",
    )
    args = parser.parse_args()
    SCENARIO.update(_scenario_parameters(args.set, parser))
    scales = [1_000_000] if args.quick else args.events

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    root = Path(tempfile.mkdtemp(prefix="livecrm-bench-", dir=args.workdir))
    database, postgres_url = ("", "")
    if args.postgres:
        database, postgres_url = _postgres_database(args.postgres)
    results = []
    try:
        for events in scales:
            result = run_scale(events, root / f"events-{events}", args, postgres_url)
            report(result)
            results.append(result)
        growth(results)
    finally:
        if database:
            _drop_postgres_database(args.postgres, database)
        shutil.rmtree(root, ignore_errors=True)
    (HERE / ".last-run.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
