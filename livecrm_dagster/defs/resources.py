"""Resources of every asset, configured from the environment."""

import dagster as dg

from livecrm_dagster.resources import (
    DEFAULT_SOURCE_DIR,
    DEFAULT_WAREHOUSE_URL,
    ShopSettingsResource,
    SourceResource,
    WarehouseResource,
    env_or_default,
)


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "warehouse": WarehouseResource(
                url=env_or_default("LIVECRM_WAREHOUSE_URL", DEFAULT_WAREHOUSE_URL)
            ),
            "shop_settings": ShopSettingsResource(path=env_or_default("LIVECRM_SETTINGS", "")),
            "source": SourceResource(
                folder=env_or_default("LIVECRM_SOURCE_DIR", DEFAULT_SOURCE_DIR),
                orders_url=env_or_default("LIVECRM_ORDERS_URL", ""),
            ),
        }
    )
