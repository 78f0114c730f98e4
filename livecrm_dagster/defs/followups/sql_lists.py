"""Conditions and reads that match a column against a long list of text values.

A step can address 100,000 members. On PostgreSQL the list travels as one `text[]`
parameter (`column = ANY(:values)`), so the statement text stays short, is compiled once
and needs one round trip. An expanding `IN (...)` instead renders one placeholder per
value into the statement on each execution, and psycopg parses that long text again.
SQLite has no arrays, so there the list is split into `IN` lists of at most
`SQLITE_IN_CHUNK` values, under SQLite's default limit of 32,766 parameters per statement
(since SQLite 3.32; a build may raise it).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from livecrm_dagster.warehouse import Warehouse

SQLITE_IN_CHUNK = 10_000


def any_of(
    column: sa.ColumnElement, values: Sequence[str], dialect: str
) -> list[sa.ColumnElement[bool]]:
    """Return conditions that together select the rows whose `column` is one of `values`.

    PostgreSQL gets one condition. SQLite gets one per chunk of values, and the caller runs
    one statement per condition. An empty list gives no condition, so no statement.
    """
    values = list(values)
    if not values:
        return []
    if dialect == "postgresql":
        return [column == sa.any_(sa.literal(values, postgresql.ARRAY(sa.Text)))]
    return [
        column.in_(values[start : start + SQLITE_IN_CHUNK])
        for start in range(0, len(values), SQLITE_IN_CHUNK)
    ]


def read_in(
    warehouse: Warehouse,
    name: str,
    column: str,
    values: Sequence[str],
    *conditions: sa.ColumnElement[bool],
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """Read a warehouse table's rows whose `column` is one of `values`, with typed columns."""
    matches = any_of(warehouse.table(name).c[column], values, warehouse.dialect)
    if not matches:
        return warehouse.query(name, sa.false(), columns=columns)
    parts = [warehouse.query(name, match, *conditions, columns=columns) for match in matches]
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
