"""Time the warehouse writing one broadcast's derived tables, on PostgreSQL and on SQLite.

The four derived tables (viewing_sessions, viewer_summary, order_attribution,
followup_audience) are built with numpy. Their shapes and pandas dtypes follow what the
project's transforms give for bench/generate.py's broadcast at 4 M viewer events: per
viewing member about 2.1 sessions, 1.4 audience rows and 0.03 attributed orders. About
1 % of the survey answers are free text with quotes, commas, line breaks, backslashes
and Japanese.

Each round writes every table with `Warehouse.replace_partition` twice: first for a
broadcast not yet in the table, then again for the same broadcast (a rebuild, which
replaces the rows of the first write). On PostgreSQL the first write creates the
broadcast's partition and the rebuild empties it. Every write is read back and
compared with the frame, and rates are printed only after all the comparisons have
passed. PostgreSQL runs in a scratch database created on `--postgres` and dropped
afterwards, SQLite in a file in a temporary folder.

    .venv/bin/python bench/warehouse_load.py                   # 26,942 members, 3 rounds
    .venv/bin/python bench/warehouse_load.py --members 108000  # 4 times as many
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg

from livecrm_dagster.tables import SCHEMAS, TIME
from livecrm_dagster.warehouse import Warehouse, typed_frame

TABLES = ("viewing_sessions", "viewer_summary", "order_attribution", "followup_audience")
STARTS_AT = pd.Timestamp("2026-11-20T11:00:00Z")
LENGTH_SECONDS = 45 * 60
PRODUCTS = np.array([f"P{number:03d}" for number in range(1, 21)])
SEGMENTS = np.array(["low", "mid", "clicked_not_bought", "survey", "coupon", "hot", "buyer"])
SEGMENT_SHARES = np.array([0.50, 0.17, 0.12, 0.09, 0.06, 0.04, 0.02])
SURVEY_ANSWERS = np.array(["dry skin", "oily skin", "sensitive skin", "none"])
FREE_TEXT = np.array(
    [
        'Q2="dry, then oily"',
        "Q2=line one\nline two\r\nline three",
        "Q3=C:\\shop\\export\\",
        "Q3=\\N and \\.",
        "Q2=保湿クリーム　最高！",
        "Q3=",
    ]
)


def _microseconds(values: np.ndarray) -> pd.Series:
    return pd.Series(STARTS_AT + pd.to_timedelta(values.astype(np.int64), unit="us")).astype(
        "datetime64[us, UTC]"
    )


def _product_lists(rng: np.random.Generator, rows: int, share: float) -> np.ndarray:
    """Return ';'-joined product IDs for `share` of the rows and '' for the others."""
    lists = np.full(rows, "", dtype=object)
    chosen = np.flatnonzero(rng.random(rows) < share)
    counts = rng.integers(1, 4, size=len(chosen))
    for row, count in zip(chosen, counts, strict=True):
        lists[row] = ";".join(sorted(rng.choice(PRODUCTS, size=count, replace=False)))
    return lists


def build_frames(members: int, seed: int) -> dict[str, pd.DataFrame]:
    """Return the derived tables of one broadcast with `members` viewing members."""
    rng = np.random.default_rng(seed)
    member_ids = np.array([f"m{number}" for number in range(members)], dtype=object)

    sessions_per_member = np.minimum(rng.geometric(0.48, size=members), 10)
    session_member = np.repeat(np.arange(members), sessions_per_member)
    session_no = np.concatenate([np.arange(1, count + 1) for count in sessions_per_member])
    rows = len(session_member)
    starts = rng.uniform(0, LENGTH_SECONDS * 0.9, size=rows) * 1e6
    watched = np.minimum(rng.lognormal(5.0, 1.4, size=rows), LENGTH_SECONDS)
    events = np.maximum(1, (watched / 10).astype(np.int64) + rng.integers(0, 4, size=rows))
    sessions = pd.DataFrame(
        {
            "member_id": member_ids[session_member],
            "session_no": session_no,
            "started_at": _microseconds(starts),
            "ended_at": _microseconds(starts + watched * 1e6),
            "watched_seconds": np.round(watched, 6),
            "events": events,
            "events_inside": np.maximum(0, events - rng.integers(0, 3, size=rows)),
            "devices": np.where(rng.random(rows) < 0.027, 2, 1),
        }
    )

    first = sessions.groupby(session_member)["started_at"].min().to_numpy()
    last = sessions.groupby(session_member)["ended_at"].max().to_numpy()
    member_watched = sessions.groupby(session_member)["watched_seconds"].sum().to_numpy()
    bought = rng.random(members) < 0.016
    paid_at = _microseconds(rng.uniform(0, LENGTH_SECONDS, size=members) * 1e6)
    answers = np.where(rng.random(members) < 0.2, "Q1=A", "").astype(object)
    free = rng.random(members) < 0.01
    answers[free] = rng.choice(FREE_TEXT, size=int(free.sum()))
    amount = np.where(bought, rng.integers(7, 1400, size=members) * 100, 0)
    summary = pd.DataFrame(
        {
            "member_id": pd.Series(member_ids, dtype="str"),
            "age_band": pd.Series(
                rng.choice(["20-29", "30-39", "40-49", "50-59", "60 and over"], size=members),
                dtype="str",
            ),
            "gender": pd.Series(
                rng.choice(["female", "male", "unknown"], size=members), dtype="str"
            ),
            "first_seen_at": pd.Series(first).astype("datetime64[us, UTC]"),
            "last_seen_at": pd.Series(last).astype("datetime64[us, UTC]"),
            "watched_seconds": member_watched,
            "viewing_rate": np.minimum(member_watched / LENGTH_SECONDS, 1.0),
            "sessions": sessions_per_member.astype(np.int64),
            "chats": rng.poisson(1.07, size=members),
            "likes": rng.poisson(1.78, size=members),
            "clicks": rng.poisson(0.21, size=members),
            "clicked_product_ids": pd.Series(_product_lists(rng, members, 0.17), dtype="str"),
            "answers": pd.Series(answers, dtype="str"),
            "correct_answers": rng.poisson(0.08, size=members),
            "coupon_claimed": rng.random(members) < 0.26,
            "bought_during_live": bought,
            "amount": amount,
            "items": np.where(bought, rng.integers(1, 10, size=members), 0),
            "products_bought": pd.Series(
                np.where(bought, _product_lists(rng, members, 1.0), ""), dtype="str"
            ),
            "paid_at": paid_at.where(bought),
            "post_live_amount": np.where(rng.random(members) < 0.01, amount + 4900, 0),
        }
    )

    orders = max(1, round(members * 0.0305))
    buyers = rng.choice(members, size=orders)
    during = rng.random(orders) < 0.45
    gross = rng.integers(7, 1400, size=orders) * 100
    cancelled = rng.random(orders) < 0.08
    attribution = pd.DataFrame(
        {
            "order_id": pd.Series([f"o{number}" for number in range(orders)], dtype="str"),
            "member_id": member_ids[buyers],
            "paid_at": _microseconds(
                np.where(
                    during, rng.uniform(0, LENGTH_SECONDS, orders), rng.uniform(0, 6e5, orders)
                )
                * 1e6
            ),
            "status": np.where(cancelled, "cancelled", "paid").astype(object),
            "gross_amount": gross,
            "net_amount": np.where(cancelled, 0, gross),
            "net_items": np.where(cancelled, 0, rng.integers(1, 10, size=orders)),
            "product_ids": pd.Series(_product_lists(rng, orders, 1.0), dtype="str"),
            "during_live": during,
            "post_live": ~during,
            "same_night": ~during & (rng.random(orders) < 0.2),
            "clicked_then_bought": rng.random(orders) < 0.1,
            "claimed_by": np.full(orders, "bench-live", dtype=object),
            "counted": np.ones(orders, dtype=bool),
        }
    )

    audience_rows = round(members * 1.383)
    segment = rng.choice(SEGMENTS, size=audience_rows, p=SEGMENT_SHARES)
    # One row per (segment, member, question): members are drawn without repeats per segment.
    audience_member = np.concatenate(
        [rng.choice(members, size=int((segment == name).sum()), replace=False) for name in SEGMENTS]
    )
    segment = np.repeat(SEGMENTS, [int((segment == name).sum()) for name in SEGMENTS])
    survey = segment == "survey"
    question = np.where(survey, rng.choice(["Q2", "Q3"], size=audience_rows), "").astype(object)
    audience = pd.DataFrame(
        {
            "segment": pd.Series(segment, dtype="str"),
            "member_id": member_ids[audience_member],
            "viewing_rate": summary["viewing_rate"].to_numpy()[audience_member],
            "watched_seconds": member_watched[audience_member],
            "chats": summary["chats"].to_numpy()[audience_member],
            "product_ids": pd.Series(
                np.where(
                    segment == "clicked_not_bought", _product_lists(rng, audience_rows, 1.0), ""
                ),
                dtype="str",
            ),
            "question_id": question,
            "answer": np.where(survey, rng.choice(SURVEY_ANSWERS, size=audience_rows), "").astype(
                object
            ),
        }
    )
    return {
        "viewing_sessions": sessions,
        "viewer_summary": summary,
        "order_attribution": attribution,
        "followup_audience": audience,
    }


def _canonical(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Return the frame with one dtype per column kind, sorted by the primary key."""
    columns, keys = SCHEMAS[name]
    frame = frame.copy()
    for column, _ in columns:
        if column not in frame.columns:
            frame[column] = None
    frame = typed_frame(frame[[column for column, _ in columns]], name)
    for column, kind in columns:
        if kind == TIME:
            frame[column] = frame[column].astype("datetime64[us, UTC]")
    return frame.sort_values(list(keys)).reset_index(drop=True)


def check_round_trip(store: Warehouse, name: str, broadcast_id: str, written: pd.DataFrame):
    """Raise AssertionError unless the stored partition equals the written frame exactly."""
    stored = _canonical(store.read_partition(name, broadcast_id), name)
    expected = _canonical(written.assign(broadcast_id=broadcast_id), name)
    pd.testing.assert_frame_equal(stored, expected, check_exact=True)


def measure(
    store: Warehouse, frames: dict[str, pd.DataFrame], rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Return seconds per write kind ("first", "replace") and table, one entry per round."""
    seconds: dict[str, dict[str, list[float]]] = {"first": {}, "replace": {}}
    for round_no in range(rounds):
        broadcast_id = f"bench-{round_no}"
        for kind in ("first", "replace"):
            for name in TABLES:
                started = time.perf_counter()
                store.replace_partition(name, broadcast_id, frames[name])
                seconds[kind].setdefault(name, []).append(time.perf_counter() - started)
                check_round_trip(store, name, broadcast_id, frames[name])
    return seconds


def report(label: str, frames: dict[str, pd.DataFrame], seconds: dict) -> None:
    print(f"\n{label}: median rows/s over {len(seconds['first'][TABLES[0]])} rounds")
    print(f"  {'table':<20} {'rows':>9} {'first write':>12} {'rewrite':>12}")
    for name in TABLES:
        rows = len(frames[name])
        rates = [rows / statistics.median(seconds[kind][name]) for kind in ("first", "replace")]
        print(f"  {name:<20} {rows:>9,} {rates[0]:>12,.0f} {rates[1]:>12,.0f}")
    rows = sum(len(frames[name]) for name in TABLES)
    overall = []
    for kind in ("first", "replace"):
        per_round = [sum(times) for times in zip(*seconds[kind].values(), strict=True)]
        overall.append(rows / statistics.median(per_round))
    print(f"  {'all four':<20} {rows:>9,} {overall[0]:>12,.0f} {overall[1]:>12,.0f}")


def run_postgres(
    server: str, frames: dict, rounds: int, warehouse: Callable[[str], Warehouse] = Warehouse
) -> dict:
    name = f"bench_load_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        store = warehouse(f"{server.replace('postgresql://', 'postgresql+psycopg://')}/{name}")
        try:
            return measure(store, frames, rounds)
        finally:
            store.engine.dispose()
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_sqlite(frames: dict, rounds: int, warehouse: Callable[[str], Warehouse] = Warehouse):
    with tempfile.TemporaryDirectory(prefix="livecrm-load-") as folder:
        store = warehouse(f"sqlite:///{Path(folder) / 'warehouse.db'}")
        try:
            return measure(store, frames, rounds)
        finally:
            store.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--members",
        type=int,
        default=26_942,
        help="viewing members of the broadcast (26,942 is the 4 M-event partition)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="broadcasts written per database")
    parser.add_argument("--seed", type=int, default=20261120, help="seed of the generated rows")
    parser.add_argument(
        "--postgres",
        default="postgresql://root@127.0.0.1:5432",
        help="PostgreSQL server to create a scratch database on; empty to skip",
    )
    parser.add_argument("--skip-sqlite", action="store_true", help="measure PostgreSQL only")
    args = parser.parse_args()

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    frames = build_frames(args.members, args.seed)
    results = {}
    if args.postgres:
        results["PostgreSQL (binary COPY)"] = run_postgres(args.postgres, frames, args.rounds)
    if not args.skip_sqlite:
        results["SQLite (executemany)"] = run_sqlite(frames, args.rounds)
    print("every write read back equal to the frame written")
    for label, seconds in results.items():
        report(label, frames, seconds)


if __name__ == "__main__":
    main()
