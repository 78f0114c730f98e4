"""Orders read from the shop's SQL database through SQLAlchemy, on SQLite and PostgreSQL."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import sqlalchemy as sa

from livecrm_dagster.defs.ingestion.assets import shop_orders
from livecrm_dagster.resources import ShopSettingsResource, SourceResource, WarehouseResource

ORDER_LINES = [
    # A paid order of two lines; member IDs with leading zeros stay strings.
    (
        "o1",
        1,
        "00042",
        "2024-06-10T20:10:00+09:00",
        "2024-06-10T20:11:00+09:00",
        "paid",
        "P-1",
        2,
        1500,
    ),
    (
        "o1",
        2,
        "00042",
        "2024-06-10T20:10:00+09:00",
        "2024-06-10T20:11:00+09:00",
        "paid",
        "P-2",
        1,
        800,
    ),
    # A pending order has no payment time yet.
    ("o2", 1, "00043", "2024-06-10T20:20:00+09:00", None, "pending", "P-1", 1, 1500),
    # A negative quantity breaks the contract and is quarantined.
    (
        "o3",
        1,
        "00044",
        "2024-06-10T20:30:00+09:00",
        "2024-06-10T20:30:00+09:00",
        "paid",
        "P-1",
        -1,
        1500,
    ),
]
COLUMNS = [
    "order_id",
    "line_no",
    "member_id",
    "ordered_at",
    "paid_at",
    "status",
    "product_id",
    "quantity",
    "unit_price",
]


def _shop_database(url: str) -> None:
    """Create the shop's order_lines table with the backend's own time column type.

    SQLite has no zone-aware time type and would drop the offset, so there the times
    are stored as ISO 8601 text with their offset, as SQLite applications keep them.
    """
    engine = sa.create_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    time_type = sa.Text if sqlite else sa.DateTime(timezone=True)
    metadata = sa.MetaData()
    table = sa.Table(
        "order_lines",
        metadata,
        sa.Column("order_id", sa.Text),
        sa.Column("line_no", sa.Integer),
        sa.Column("member_id", sa.Text),
        sa.Column("ordered_at", time_type),
        sa.Column("paid_at", time_type),
        sa.Column("status", sa.Text),
        sa.Column("product_id", sa.Text),
        sa.Column("quantity", sa.Integer),
        sa.Column("unit_price", sa.BigInteger),
    )
    metadata.create_all(engine)
    rows = []
    for values in ORDER_LINES:
        row = dict(zip(COLUMNS, values, strict=True))
        for column in ("ordered_at", "paid_at"):
            if row[column] is not None and not sqlite:
                row[column] = pd.Timestamp(row[column]).to_pydatetime()
        rows.append(row)
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)
    engine.dispose()


def test_orders_load_from_database(warehouse_url, tmp_path):
    # The warehouse URL doubles as the shop database: both backends are exercised.
    _shop_database(warehouse_url)
    resources = {
        "warehouse": WarehouseResource(url=warehouse_url),
        "shop_settings": ShopSettingsResource(),
        "source": SourceResource(folder=str(tmp_path), orders_url=warehouse_url),
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize([shop_orders], resources=resources, instance=instance)
    store = resources["warehouse"].get()
    orders = store.read("orders").sort_values(["order_id", "line_no"]).reset_index(drop=True)
    quarantine = store.read("quarantine", input="orders")
    metadata = result.asset_materializations_for_node("shop_orders")[0].metadata

    assert orders["order_id"].tolist() == ["o1", "o1", "o2"]
    assert orders["member_id"].tolist() == ["00042", "00042", "00043"]
    assert orders.loc[0, "paid_at"] == pd.Timestamp("2024-06-10T11:11:00Z")
    assert pd.isna(orders.loc[2, "paid_at"])
    assert int(orders["unit_price"].sum()) == 3800
    assert quarantine["record_key"].tolist() == ["o3"]
    assert quarantine["reason"].tolist() == ["quantity is below 1"]
    assert metadata["quarantined"].value == 1
