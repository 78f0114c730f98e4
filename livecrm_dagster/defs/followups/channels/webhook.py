"""Signed JSON webhook, for marketing tools that accept pushed messages.

Each request carries `Idempotency-Key` (the ledger key) and `X-Livecrm-Signature`:
`sha256=` and the hex HMAC-SHA256, under the shared secret, of
`<X-Livecrm-Timestamp>.<body>`. A receiver recomputes it and rejects a mismatch or an old
timestamp.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Sequence

import requests

from livecrm_dagster.defs.followups.channels.base import (
    Channel,
    ChannelError,
    Message,
    describe_request_error,
    retrying_session,
)

SIGNATURE_HEADER = "X-Livecrm-Signature"
TIMESTAMP_HEADER = "X-Livecrm-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """Return the signature header value of a body sent at `timestamp` (Unix seconds)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class WebhookChannel(Channel):
    """POSTs one JSON message per member to a URL."""

    name = "webhook"
    address_column = None

    def __init__(
        self,
        url: str,
        secret: str,
        timeout_seconds: float = 10,
        retries: int = 3,
        backoff_seconds: float = 0.5,
    ):
        if not url:
            raise ChannelError("webhook URL is not set; set LIVECRM_WEBHOOK_URL")
        if not secret:
            raise ChannelError("webhook secret is not set; set LIVECRM_WEBHOOK_SECRET")
        self.url = url
        self._secret = secret
        self.timeout_seconds = timeout_seconds
        self.session = retrying_session(retries, backoff_seconds)

    def send(self, messages: Sequence[Message], key: str) -> str | None:
        (message,) = messages
        body = json.dumps(
            {
                "idempotency_key": key,
                "broadcast_id": message.broadcast_id,
                "step_id": message.step_id,
                "member_id": message.member_id,
                "subject": message.subject,
                "text": message.text,
                "offer_expires_at": message.offer_expires_at,
            },
            ensure_ascii=False,
            sort_keys=True,
        ).encode("utf-8")
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
        }
        try:
            response = self.session.post(
                self.url, data=body, headers=headers, timeout=self.timeout_seconds
            )
        except requests.RequestException as error:
            raise ChannelError(f"webhook request failed: {describe_request_error(error)}") from None
        # 409: the receiver already has this idempotency key, so the message was delivered.
        if response.ok or response.status_code == 409:
            return response.headers.get("X-Request-Id")
        raise ChannelError(f"webhook returned HTTP {response.status_code}")

    def close(self) -> None:
        self.session.close()
