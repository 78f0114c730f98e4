"""Dagster resources: the warehouse, the shop settings and the input source folder."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pandas as pd
import sqlalchemy as sa
from pydantic import PrivateAttr

from livecrm_dagster.settings import ShopSettings, load_settings
from livecrm_dagster.warehouse import Warehouse

DEFAULT_WAREHOUSE_URL = "sqlite:///.livecrm/warehouse.db"
DEFAULT_SOURCE_DIR = "data/source"


class WarehouseResource(dg.ConfigurableResource):
    """The SQL warehouse: SQLite by default, PostgreSQL when the URL names it.

    `events_folder` is where the raw viewer events' Parquet files live; empty means the
    warehouse's default (see `default_events_folder`). Every process that runs steps
    must see the same folder.
    """

    url: str = DEFAULT_WAREHOUSE_URL
    events_folder: str = ""
    _warehouse: Warehouse | None = PrivateAttr(default=None)

    def get(self) -> Warehouse:
        if self._warehouse is None:
            if self.url.startswith("sqlite:///"):
                Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._warehouse = Warehouse(self.url, self.events_folder or None)
        return self._warehouse


class ShopSettingsResource(dg.ConfigurableResource):
    """The shop settings file; empty means $LIVECRM_SETTINGS or the bundled defaults."""

    path: str = ""

    def get(self) -> ShopSettings:
        return load_settings(self.path or None)


class SourceResource(dg.ConfigurableResource):
    """The input sources: a folder of file drops, and optionally the shop's database.

    When `orders_url` is set, orders come from that database through SQLAlchemy with
    `orders_query`, which must return the contract's order-line columns.
    """

    folder: str = DEFAULT_SOURCE_DIR
    orders_url: str = ""
    orders_query: str = "SELECT * FROM order_lines"

    def input_folder(self, name: str) -> Path:
        return Path(self.folder) / name

    def read_order_rows(self) -> pd.DataFrame:
        """Read order lines from the shop database as strings, one row per line."""
        engine = sa.create_engine(self.orders_url)
        try:
            with engine.connect() as connection:
                frame = pd.read_sql(sa.text(self.orders_query), connection, dtype=object)
        finally:
            engine.dispose()
        frame = frame.astype(object).where(frame.notna(), "")
        for column in frame.columns:
            frame[column] = frame[column].map(_sql_text)
        frame["_file"] = "database:orders"
        frame["_line"] = range(1, len(frame) + 1)
        return frame


def _sql_text(value: object) -> str:
    """Render a database value as the contract's text form; aware times keep their offset."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return "" if value is None else str(value)


def env_or_default(name: str, default: str) -> str | dg.EnvVar:
    """Return EnvVar(name) when the variable is set, else `default`.

    EnvVar keeps the value (a database password, say) out of the UI and the run config.
    """
    return dg.EnvVar(name) if os.environ.get(name) else default
