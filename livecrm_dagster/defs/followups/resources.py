"""Resources of the follow-up sends: the clock, the scenarios file and the channels."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from livecrm_dagster.defs.followups.channels import Channel, ChannelError
from livecrm_dagster.defs.followups.channels.email import EmailChannel
from livecrm_dagster.defs.followups.channels.line import DEFAULT_BASE_URL, LineChannel
from livecrm_dagster.defs.followups.channels.outbox import OutboxChannel
from livecrm_dagster.defs.followups.channels.webhook import WebhookChannel
from livecrm_dagster.defs.followups.scenarios import FollowupSettings, load_scenarios

DEFAULT_OUTBOX_DIR = ".livecrm/outbox"


def parse_instant(value: str) -> dt.datetime:
    """Parse an ISO 8601 time that carries a UTC offset, returned in UTC."""
    try:
        instant = dt.datetime.fromisoformat(value)
    except ValueError as error:
        raise ValueError(f"invalid time {value!r}; use ISO 8601 with an offset") from error
    if instant.tzinfo is None:
        raise ValueError(f"time {value!r} has no UTC offset; add one, e.g. +09:00 or Z")
    return instant.astimezone(dt.UTC)


class FollowupClockResource(dg.ConfigurableResource):
    """The due-step sensor's clock. `now` (ISO time with offset) fixes it for tests and replays."""

    now: str = ""

    def current_time(self) -> dt.datetime:
        return parse_instant(self.now) if self.now else dt.datetime.now(dt.UTC)


class FollowupScenariosResource(dg.ConfigurableResource):
    """The scenarios file. Empty means $LIVECRM_SCENARIOS or the bundled defaults."""

    path: str = ""

    def get(self) -> FollowupSettings:
        return load_scenarios(self.path or None)


class FollowupChannelsResource(dg.ConfigurableResource):
    """Addresses and credentials of the channels. Secrets should come from `dg.EnvVar`."""

    outbox_dir: str = DEFAULT_OUTBOX_DIR
    webhook_url: str = ""
    webhook_secret: str = ""
    line_base_url: str = DEFAULT_BASE_URL
    line_token: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_from: str = ""
    smtp_starttls: bool = False
    http_timeout_seconds: float = 10
    http_retries: int = 3
    http_backoff_seconds: float = 0.5

    def channel(self, name: str) -> Channel:
        """Build the channel a step names, or raise ChannelError when its settings are missing."""
        http = {
            "timeout_seconds": self.http_timeout_seconds,
            "retries": self.http_retries,
            "backoff_seconds": self.http_backoff_seconds,
        }
        if name == "outbox":
            return OutboxChannel(self.outbox_dir)
        if name == "webhook":
            return WebhookChannel(self.webhook_url, self.webhook_secret, **http)
        if name in ("line", "line_multicast"):
            return LineChannel(
                self.line_token, self.line_base_url, multicast=name == "line_multicast", **http
            )
        if name == "email":
            return EmailChannel(
                self.smtp_host,
                self.smtp_port,
                self.smtp_from,
                self.smtp_username,
                self.smtp_password,
                self.smtp_starttls,
            )
        raise ChannelError(f"unknown channel {name!r}")
