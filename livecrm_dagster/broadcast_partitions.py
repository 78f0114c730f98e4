"""PostgreSQL partitions of the large derived tables, one per broadcast.

A rebuild replaces one broadcast's rows. In a single table it deletes them and copies
the new rows in the same transaction. Each new row's key then meets its deleted twin in
the primary key's index, and PostgreSQL reads the deleted row from the table to check
that it no longer counts. That halved the rate of a rebuild (about 140 k against 250 k
rows/s for the derived tables of a 4 M-event broadcast). With a partition per broadcast,
a rebuild empties the partition with TRUNCATE and copies into an empty index.

TRUNCATE locks the partition until the write commits. A read of the same broadcast
waits for the rebuild instead of reading the old rows meanwhile, and so does a read
that spans every broadcast, such as attribution's look at the other broadcasts'
viewing. Reads and writes of other broadcasts go on beside it.

Tables created before this layout stay single tables and keep the delete-and-copy write
until `partition_existing_table` converts them (`python -m
livecrm_dagster.broadcast_partitions URL`, see docs/runbook.md).
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable, Mapping

import pandas as pd
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Connection, Engine

from livecrm_dagster.bulk_load import copy_rows

# PostgreSQL truncates identifiers longer than 63 bytes.
_MAX_NAME = 63
_DIGEST_LENGTH = 12


def partition_name(table_name: str, broadcast_id: str) -> str:
    """Return the name of the partition of `table_name` that contains `broadcast_id`'s rows.

    The name starts with the table and a readable part of the broadcast ID, for operators
    in psql, and ends with the first 12 hex digits of the ID's SHA-256 digest.
    NOTE: two IDs with the same 12 digits would share a name. The second one's write then
    fails on the partition's bound (broadcast_id = the first ID), so no rows mix.
    """
    digest = hashlib.sha256(broadcast_id.encode()).hexdigest()[:_DIGEST_LENGTH]
    readable = re.sub(r"[^a-z0-9]+", "_", broadcast_id.lower()).strip("_")
    room = _MAX_NAME - len(table_name) - len("__") - len("_") - _DIGEST_LENGTH
    if readable and room > 0:
        return f"{table_name}__{readable[:room].rstrip('_')}_{digest}"
    return f"{table_name}__{digest}"


def partitioned_tables(connection: Connection) -> set[str]:
    """Return the names of the partitioned tables in the connection's current schema."""
    rows = connection.execute(
        sa.text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'p' AND n.nspname = current_schema()"
        )
    )
    return set(rows.scalars())


def replace_broadcast(
    connection: Connection,
    table: sa.Table,
    broadcast_id: str,
    frame: pd.DataFrame,
    kinds: Mapping[str, str],
) -> None:
    """Replace a broadcast's rows of a partitioned table, inside the open transaction.

    Writers of the same table and broadcast take turns on an advisory lock, so a second
    writer waits and then replaces the first one's rows instead of failing on them.
    """
    name = partition_name(table.name, broadcast_id)
    connection.execute(
        sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
        {"key": f"{table.name}/{broadcast_id}"},
    )

    def fill() -> None:
        if not frame.empty:
            copy_rows(connection, name, frame, kinds)

    if _is_partition_of(connection, table.name, name):
        connection.exec_driver_sql(f'TRUNCATE "{name}"')
        fill()
    else:
        _add_partition(connection, table, broadcast_id, fill)


def partition_existing_table(engine: Engine, table: sa.Table) -> int:
    """Convert a single table into a table partitioned by broadcast, in one transaction.

    `table` must be the partitioned definition (`Warehouse.table`). Returns the number of
    broadcasts moved, or -1 if the table was partitioned already. Readers and writers of
    the table wait until the conversion commits.
    """
    with engine.begin() as connection:
        if table.name in partitioned_tables(connection):
            return -1
        old = f"{table.name}__single"
        columns = ", ".join(f'"{column.name}"' for column in table.columns)
        connection.exec_driver_sql(f'LOCK TABLE "{table.name}" IN ACCESS EXCLUSIVE MODE')
        connection.exec_driver_sql(f'ALTER TABLE "{table.name}" RENAME TO "{old}"')
        # A renamed table keeps its key's index name, <table>_pkey, which the new key needs.
        connection.exec_driver_sql(f'ALTER INDEX "{table.name}_pkey" RENAME TO "{old}_pkey"')
        table.create(connection)
        broadcasts = (
            connection.exec_driver_sql(
                f'SELECT DISTINCT broadcast_id FROM "{old}" ORDER BY broadcast_id'
            )
            .scalars()
            .all()
        )
        for broadcast_id in broadcasts:
            name = partition_name(table.name, broadcast_id)

            def fill(name: str = name, broadcast_id: str = broadcast_id) -> None:
                connection.execute(
                    sa.text(
                        f'INSERT INTO "{name}" ({columns}) '
                        f'SELECT {columns} FROM "{old}" WHERE broadcast_id = :broadcast_id'
                    ),
                    {"broadcast_id": broadcast_id},
                )

            _add_partition(connection, table, broadcast_id, fill)
        connection.exec_driver_sql(f'DROP TABLE "{old}"')
    return len(broadcasts)


def _is_partition_of(connection: Connection, parent: str, name: str) -> bool:
    found = connection.execute(
        sa.text(
            "SELECT 1 FROM pg_inherits "
            "WHERE inhparent = CAST(:parent AS regclass) AND inhrelid = to_regclass(:name)"
        ),
        {"parent": parent, "name": name},
    )
    return found.first() is not None


def _add_partition(
    connection: Connection, table: sa.Table, broadcast_id: str, fill: Callable[[], None]
) -> None:
    """Create a broadcast's partition as a table of its own, fill it, then attach it.

    Attaching locks the parent only against other attachments and schema changes, where
    `CREATE TABLE … PARTITION OF` would hold every reader of the table back. The rows go
    in before the attachment, so the parent is locked only at the end of the write.
    """
    name = partition_name(table.name, broadcast_id)
    keys = ", ".join(f'"{column.name}"' for column in table.primary_key.columns)
    connection.exec_driver_sql(f'CREATE TABLE "{name}" (LIKE "{table.name}" INCLUDING DEFAULTS)')
    fill()
    connection.exec_driver_sql(f'ALTER TABLE "{name}" ADD PRIMARY KEY ({keys})')
    attach = sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})").format(
        sql.Identifier(table.name), sql.Identifier(name), sql.Literal(broadcast_id)
    )
    # psycopg composes the literal; passed as text through SQLAlchemy, a '%' in the ID
    # would be read as a parameter marker.
    connection.connection.driver_connection.execute(attach)


def main(argv: list[str]) -> None:
    """Convert a PostgreSQL warehouse's large derived tables to partitions by broadcast."""
    from livecrm_dagster.tables import PARTITIONED_BY_BROADCAST
    from livecrm_dagster.warehouse import Warehouse

    if len(argv) != 1:
        raise SystemExit("usage: python -m livecrm_dagster.broadcast_partitions DATABASE_URL")
    try:
        backend = sa.engine.make_url(argv[0]).get_backend_name()
    except sa.exc.ArgumentError as error:
        raise SystemExit(f"not a database URL: {error}") from None
    # Checked before connecting: a Warehouse would create a SQLite file at a mistyped path.
    if backend != "postgresql":
        raise SystemExit("only a PostgreSQL warehouse has partitions")
    try:
        store = Warehouse(argv[0])
    except sa.exc.OperationalError as error:
        raise SystemExit(f"cannot reach the warehouse: {error.orig}") from None
    for name in sorted(PARTITIONED_BY_BROADCAST):
        moved = partition_existing_table(store.engine, store.table(name))
        if moved < 0:
            outcome = "already partitioned"
        else:
            outcome = f"{moved} broadcast{'' if moved == 1 else 's'} moved"
        sys.stdout.write(f"{name}: {outcome}\n")
    store.engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1:])
