"""The message type, error type and interface shared by every channel."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry


@dataclass(frozen=True)
class Message:
    """One rendered message for one member; `address` is personal data and is never logged."""

    key: str
    broadcast_id: str
    step_id: str
    member_id: str
    address: str | None
    subject: str
    text: str
    offer_expires_at: str | None = None


class ChannelError(Exception):
    """A send failed; the text names the status or error class, never an address or token."""


class Channel(abc.ABC):
    """A way to deliver messages; `send` returns the request ID the receiver accepted, if any."""

    name: str = ""
    # Members column holding the address this channel needs; None when the member ID is enough.
    address_column: str | None = None
    # Largest number of messages in one request; messages in a batch share one text.
    batch_size: int = 1
    # Whether the receiver delivers a request resent under the same idempotency key once.
    # Only then may a request leave before the previous request's ledger mark is written.
    deduplicates_by_key: bool = True

    @abc.abstractmethod
    def send(self, messages: Sequence[Message], key: str) -> str | None:
        """Deliver `messages` in one request carrying idempotency key `key`."""

    def close(self) -> None:  # noqa: B027 - channels without connections need no cleanup
        pass


def retrying_session(retries: int, backoff_seconds: float) -> requests.Session:
    """Return a session that retries connection errors, read timeouts, 429 and 5xx.

    POST is retried too, which is safe only because every request carries an idempotency
    key. urllib3 sleeps for a `Retry-After` header's full value, uncapped.
    """
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"POST"}),
        backoff_factor=backoff_seconds,
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def describe_request_error(error: requests.RequestException) -> str:
    """Name a transport error by its class and cause, without the request's headers."""
    cause = getattr(error, "__context__", None) or getattr(error, "__cause__", None)
    detail = type(cause).__name__ if cause else ""
    return f"{type(error).__name__}{f' ({detail})' if detail else ''}"
