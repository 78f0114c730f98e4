"""Channels that deliver follow-up messages: file outbox, webhook, LINE and e-mail."""

from livecrm_dagster.defs.followups.channels.base import Channel, ChannelError, Message

__all__ = ["Channel", "ChannelError", "Message"]
