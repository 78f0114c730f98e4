"""Resources of every asset, configured from the environment."""

import os

import dagster as dg

from livecrm_dagster.defs.followups.resources import (
    DEFAULT_OUTBOX_DIR,
    FollowupChannelsResource,
    FollowupClockResource,
    FollowupScenariosResource,
)
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
                url=env_or_default("LIVECRM_WAREHOUSE_URL", DEFAULT_WAREHOUSE_URL),
                events_folder=env_or_default("LIVECRM_EVENT_STORE", ""),
            ),
            "shop_settings": ShopSettingsResource(path=env_or_default("LIVECRM_SETTINGS", "")),
            "source": SourceResource(
                folder=env_or_default("LIVECRM_SOURCE_DIR", DEFAULT_SOURCE_DIR),
                orders_url=env_or_default("LIVECRM_ORDERS_URL", ""),
            ),
            "followup_scenarios": FollowupScenariosResource(
                path=env_or_default("LIVECRM_SCENARIOS", "")
            ),
            "followup_clock": FollowupClockResource(),
            "followup_channels": FollowupChannelsResource(
                outbox_dir=env_or_default("LIVECRM_OUTBOX_DIR", DEFAULT_OUTBOX_DIR),
                webhook_url=env_or_default("LIVECRM_WEBHOOK_URL", ""),
                webhook_secret=env_or_default("LIVECRM_WEBHOOK_SECRET", ""),
                line_base_url=env_or_default("LIVECRM_LINE_BASE_URL", "https://api.line.me"),
                line_token=env_or_default("LIVECRM_LINE_TOKEN", ""),
                smtp_host=env_or_default("LIVECRM_SMTP_HOST", ""),
                smtp_port=int(os.environ.get("LIVECRM_SMTP_PORT") or 25),
                smtp_starttls=os.environ.get("LIVECRM_SMTP_STARTTLS", "").lower() == "true",
                smtp_username=env_or_default("LIVECRM_SMTP_USERNAME", ""),
                smtp_password=env_or_default("LIVECRM_SMTP_PASSWORD", ""),
                smtp_from=env_or_default("LIVECRM_SMTP_FROM", ""),
            ),
        }
    )
