"""LINE Messaging API: push to one user, or multicast to at most 500 users per request.

Both calls carry `X-Line-Retry-Key`, a UUID that stays the same on every attempt, so
LINE delivers a retried request once. It responds to a repeat of an accepted key with 409
and `x-line-accepted-request-id`, which counts as sent. Only push and multicast carry the key.
"""

from __future__ import annotations

from collections.abc import Sequence

import requests

from livecrm_dagster.defs.followups.channels.base import (
    Channel,
    ChannelError,
    Message,
    describe_request_error,
    retrying_session,
)

DEFAULT_BASE_URL = "https://api.line.me"
PUSH_PATH = "/v2/bot/message/push"
MULTICAST_PATH = "/v2/bot/message/multicast"
MULTICAST_MAX_RECIPIENTS = 500
TEXT_MAX_CHARACTERS = 5000


def text_messages(message: Message) -> list[dict]:
    text = f"{message.subject}\n\n{message.text}" if message.subject else message.text
    return [{"type": "text", "text": text[:TEXT_MAX_CHARACTERS]}]


class LineChannel(Channel):
    """Sends through the LINE Messaging API with a channel access token."""

    address_column = "line_user_id"

    def __init__(
        self,
        token: str,
        base_url: str = DEFAULT_BASE_URL,
        multicast: bool = False,
        timeout_seconds: float = 10,
        retries: int = 3,
        backoff_seconds: float = 0.5,
    ):
        if not token:
            raise ChannelError("LINE channel access token is not set; set LIVECRM_LINE_TOKEN")
        self.base_url = base_url.rstrip("/")
        self.multicast = multicast
        self.name = "line_multicast" if multicast else "line"
        self.batch_size = MULTICAST_MAX_RECIPIENTS if multicast else 1
        self.timeout_seconds = timeout_seconds
        self.session = retrying_session(retries, backoff_seconds)
        self.session.headers["Authorization"] = f"Bearer {token}"

    def send(self, messages: Sequence[Message], key: str) -> str | None:
        if not messages:
            return None
        if len(messages) > self.batch_size:
            raise ValueError(f"{len(messages)} messages exceed the batch size {self.batch_size}")
        if self.multicast:
            path = MULTICAST_PATH
            body = {"to": [m.address for m in messages], "messages": text_messages(messages[0])}
        else:
            path = PUSH_PATH
            body = {"to": messages[0].address, "messages": text_messages(messages[0])}
        try:
            response = self.session.post(
                self.base_url + path,
                json=body,
                headers={"X-Line-Retry-Key": key},
                timeout=self.timeout_seconds,
            )
        except requests.RequestException as error:
            raise ChannelError(f"LINE {path} failed: {describe_request_error(error)}") from None
        if response.status_code == 200:
            return response.headers.get("x-line-request-id")
        accepted = response.headers.get("x-line-accepted-request-id")
        if response.status_code == 409 and accepted:
            return accepted
        raise ChannelError(f"LINE {path} returned HTTP {response.status_code}: {_error(response)}")

    def close(self) -> None:
        self.session.close()


def _error(response: requests.Response) -> str:
    # LINE's error bodies carry a message and details about fields, not recipients.
    try:
        return str(response.json().get("message", ""))[:200]
    except ValueError:
        return ""
