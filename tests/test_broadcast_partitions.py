"""PostgreSQL partitions per broadcast: rewrites, failures, odd IDs, concurrency, conversion."""

from __future__ import annotations

import threading

import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa

from livecrm_dagster.broadcast_partitions import (
    main,
    partition_existing_table,
    partition_name,
    replace_broadcast,
)
from livecrm_dagster.tables import PARTITIONED_BY_BROADCAST
from livecrm_dagster.warehouse import Warehouse, column_kinds


def _orders(*order_ids: str) -> pd.DataFrame:
    """Return raw_orders rows, one line per order."""
    return pd.DataFrame(
        {
            "order_id": list(order_ids),
            "line_no": 1,
            "member_id": "m1",
            "paid_at": pd.Timestamp("2026-11-20T11:30:00Z"),
            "status": "paid",
            "product_id": "P001",
        }
    )


def _partitions(store: Warehouse, table: str) -> list[str]:
    with store.engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = CAST(:t AS regclass) ORDER BY c.relname"
            ),
            {"t": table},
        )
        return list(rows.scalars())


def _relkind(store: Warehouse, table: str) -> str:
    with store.engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT relkind FROM pg_class WHERE oid = CAST(:t AS regclass)"), {"t": table}
        ).scalar_one()


def _order_ids(store: Warehouse, broadcast_id: str) -> list[str]:
    return sorted(store.read("raw_orders", broadcast_id=broadcast_id)["order_id"])


def test_new_warehouse_partitions_large_tables(postgres_url):
    store = Warehouse(postgres_url)
    assert {_relkind(store, name) for name in PARTITIONED_BY_BROADCAST} == {"p"}
    # Small tables stay single tables.
    assert _relkind(store, "broadcast_kpis") == "r"


def test_rewrite_reuses_broadcast_partition(postgres_url):
    store = Warehouse(postgres_url)
    store.replace_partition("raw_orders", "b1", _orders("o1", "o2"))
    store.replace_partition("raw_orders", "b2", _orders("o9"))
    store.replace_partition("raw_orders", "b1", _orders("o3"))

    assert _partitions(store, "raw_orders") == sorted(
        [partition_name("raw_orders", "b1"), partition_name("raw_orders", "b2")]
    )
    assert _order_ids(store, "b1") == ["o3"]
    assert _order_ids(store, "b2") == ["o9"]


def test_failed_first_write_leaves_no_partition(postgres_url):
    store = Warehouse(postgres_url)
    # o1 twice breaks the primary key when it is built after the rows are copied.
    with pytest.raises((sa.exc.IntegrityError, psycopg.IntegrityError)):
        store.replace_partition("raw_orders", "b1", _orders("o1", "o1"))

    assert _partitions(store, "raw_orders") == []
    store.replace_partition("raw_orders", "b1", _orders("o1"))
    assert _order_ids(store, "b1") == ["o1"]


@pytest.mark.parametrize(
    "broadcast_id",
    [
        "live-2026-11-20",
        "LIVE 2026/11/20",  # the same readable part as the one above, distinguished by the digest
        "ライブ配信",  # no readable ASCII at all
        "a'b%c\"d",  # quote and percent sign in the partition bound
        "x" * 300,  # far longer than an identifier may be
    ],
)
def test_odd_broadcast_ids_round_trip(postgres_url, broadcast_id):
    store = Warehouse(postgres_url)
    store.replace_partition("raw_orders", broadcast_id, _orders("o1"))
    store.replace_partition("raw_orders", broadcast_id, _orders("o2"))
    store.replace_partition("raw_orders", "other", _orders("o9"))

    assert _order_ids(store, broadcast_id) == ["o2"]
    assert partition_name("raw_orders", broadcast_id) in _partitions(store, "raw_orders")


def test_partition_names_are_short_and_distinct():
    ids = ["live-2026-11-20", "LIVE 2026/11/20", "ライブ配信", "ライブ", "", "_", "x" * 300]
    ids.append("x" * 301)
    names = [partition_name("followup_audience", broadcast_id) for broadcast_id in ids]

    assert len(set(names)) == len(ids)
    assert all(len(name.encode()) <= 63 for name in names)
    assert all(name.startswith("followup_audience__") for name in names)
    readable = partition_name("raw_orders", "live-2026-11-20")
    assert readable.startswith("raw_orders__live_2026_11_20_")


def test_concurrent_first_writes_take_turns(postgres_url):
    Warehouse(postgres_url)
    frames = [_orders("a1", "a2"), _orders("b1")]
    barrier = threading.Barrier(len(frames))
    errors: list[BaseException] = []

    def write(frame: pd.DataFrame) -> None:
        store = Warehouse(postgres_url)
        try:
            barrier.wait()
            store.replace_partition("raw_orders", "live", frame)
        except BaseException as error:  # noqa: BLE001 - reported to the test thread
            errors.append(error)
        finally:
            store.engine.dispose()

    threads = [threading.Thread(target=write, args=(frame,)) for frame in frames]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    store = Warehouse(postgres_url)
    assert errors == []
    assert _order_ids(store, "live") in (["a1", "a2"], ["b1"])
    assert _partitions(store, "raw_orders") == [partition_name("raw_orders", "live")]


def test_rewrite_blocks_own_broadcast_reads(postgres_url):
    store = Warehouse(postgres_url)
    store.replace_partition("raw_orders", "b1", _orders("o1"))
    store.replace_partition("raw_orders", "b2", _orders("o9"))
    reader = sa.create_engine(postgres_url, connect_args={"options": "-c lock_timeout=1000"})

    with store.engine.begin() as writing:
        table = store.table("raw_orders")
        frame = _orders("o2").assign(broadcast_id="b1")
        replace_broadcast(writing, table, "b1", frame, column_kinds("raw_orders"))
        with reader.connect() as connection:
            other = connection.execute(
                sa.select(table.c.order_id).where(table.c.broadcast_id == "b2")
            ).scalars()
            assert list(other) == ["o9"]
        with reader.connect() as connection, pytest.raises(sa.exc.OperationalError):
            connection.execute(sa.select(table.c.order_id).where(table.c.broadcast_id == "b1"))
    reader.dispose()

    assert _order_ids(store, "b1") == ["o2"]


def test_whole_table_replace_is_rejected(warehouse_url):
    store = Warehouse(warehouse_url)
    with pytest.raises(ValueError, match="one broadcast at a time"):
        store.replace_table("raw_orders", _orders("o1").assign(broadcast_id="b1"))


def _make_single_table(store: Warehouse, name: str) -> None:
    """Turn a partitioned table back into the single table that older versions created."""
    keys = ", ".join(column.name for column in store.table(name).primary_key.columns)
    with store.engine.begin() as connection:
        connection.exec_driver_sql(f"ALTER TABLE {name} RENAME TO partitioned_copy")
        connection.exec_driver_sql(f"ALTER INDEX {name}_pkey RENAME TO partitioned_copy_pkey")
        connection.exec_driver_sql(
            f"CREATE TABLE {name} (LIKE partitioned_copy INCLUDING DEFAULTS)"
        )
        connection.exec_driver_sql(f"ALTER TABLE {name} ADD PRIMARY KEY ({keys})")
        connection.exec_driver_sql("DROP TABLE partitioned_copy")


def test_single_table_converts_to_partitions(postgres_url, capsys):
    _make_single_table(Warehouse(postgres_url), "raw_orders")
    older = Warehouse(postgres_url)
    assert _relkind(older, "raw_orders") == "r"
    older.replace_partition("raw_orders", "b1", _orders("o1", "o2"))
    older.replace_partition("raw_orders", "b2", _orders("o9"))
    older.replace_partition("raw_orders", "b1", _orders("o3", "o4"))
    before = older.read("raw_orders").sort_values(["broadcast_id", "order_id"])

    main([postgres_url])

    printed = capsys.readouterr().out
    assert "raw_orders: 2 broadcasts moved" in printed
    assert "viewing_sessions: already partitioned" in printed
    store = Warehouse(postgres_url)
    assert _relkind(store, "raw_orders") == "p"
    after = store.read("raw_orders").sort_values(["broadcast_id", "order_id"])
    pd.testing.assert_frame_equal(after.reset_index(drop=True), before.reset_index(drop=True))
    store.replace_partition("raw_orders", "b1", _orders("o5"))
    assert _order_ids(store, "b1") == ["o5"]
    assert _order_ids(store, "b2") == ["o9"]
    assert partition_existing_table(store.engine, store.table("raw_orders")) == -1


def test_running_process_switches_after_conversion(postgres_url):
    _make_single_table(Warehouse(postgres_url), "raw_orders")
    running = Warehouse(postgres_url)
    running.replace_partition("raw_orders", "b1", _orders("o1"))

    partition_existing_table(running.engine, running.table("raw_orders"))

    # A broadcast new to the table needs a partition, which only the partition write makes.
    running.replace_partition("raw_orders", "b2", _orders("o9"))
    running.replace_partition("raw_orders", "b1", _orders("o2"))
    assert _order_ids(running, "b1") == ["o2"]
    assert _order_ids(running, "b2") == ["o9"]
    assert len(_partitions(running, "raw_orders")) == 2


def test_conversion_output_singular_broadcast(postgres_url, capsys):
    _make_single_table(Warehouse(postgres_url), "followup_audience")
    Warehouse(postgres_url).replace_partition("followup_audience", "b1", _audience())

    main([postgres_url])

    assert "followup_audience: 1 broadcast moved" in capsys.readouterr().out


def _audience() -> pd.DataFrame:
    return pd.DataFrame(
        {"segment": ["mid"], "member_id": ["m1"], "question_id": [""], "answer": [""]}
    )


def test_conversion_rejects_sqlite_url(tmp_path):
    path = tmp_path / "typo.db"
    with pytest.raises(SystemExit, match="only a PostgreSQL warehouse has partitions"):
        main([f"sqlite:///{path}"])
    assert not path.exists()


def test_conversion_reports_unreachable_database(postgres_url):
    missing = postgres_url.rsplit("/", 1)[0] + "/livecrm_no_such_database"
    with pytest.raises(
        SystemExit, match='cannot reach the warehouse: .*"livecrm_no_such_database"'
    ):
        main([missing])


def test_colliding_partition_names_fail_safely(postgres_url, monkeypatch):
    store = Warehouse(postgres_url)
    store.replace_partition("raw_orders", "b1", _orders("o1"))
    # Two IDs whose digests agree would get the same name, as every ID does here.
    monkeypatch.setattr(
        "livecrm_dagster.broadcast_partitions.partition_name",
        lambda table_name, broadcast_id: partition_name(table_name, "b1"),
    )

    with pytest.raises((sa.exc.IntegrityError, psycopg.errors.CheckViolation)):
        store.replace_partition("raw_orders", "b2", _orders("o9"))

    assert _order_ids(store, "b1") == ["o1"]
    assert _order_ids(store, "b2") == []
