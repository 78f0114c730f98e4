"""E-mail over SMTP, one message per member.

SMTP has no idempotency key. The ledger key goes into the Message-ID, so a receiving
system may drop a duplicate. NOTE: a run that dies between the SMTP transaction and the
ledger update sends that member the message again when the row is taken over.
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence
from email.message import EmailMessage

from livecrm_dagster.defs.followups.channels.base import Channel, ChannelError, Message


class EmailChannel(Channel):
    """Sends plain-text e-mail through an SMTP server."""

    name = "email"
    address_column = "email"
    deduplicates_by_key = False

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        username: str = "",
        password: str = "",
        starttls: bool = False,
        timeout_seconds: float = 30,
    ):
        if not host or not sender:
            raise ChannelError("SMTP host or sender is not set; set LIVECRM_SMTP_HOST and _FROM")
        self.host = host
        self.port = port
        self.sender = sender
        self.username = username
        self._password = password
        self.starttls = starttls
        self.timeout_seconds = timeout_seconds
        self._smtp: smtplib.SMTP | None = None

    def _connection(self) -> smtplib.SMTP:
        if self._smtp is None:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout_seconds)
            if self.starttls:
                smtp.starttls()
            if self.username:
                smtp.login(self.username, self._password)
            self._smtp = smtp
        return self._smtp

    def send(self, messages: Sequence[Message], key: str) -> str | None:
        (message,) = messages
        email = EmailMessage()
        try:
            email["From"] = self.sender
            email["To"] = message.address
            email["Subject"] = message.subject
        except ValueError:
            # A line break in an address or subject would inject headers. The error text
            # may quote the address, so only the fact is kept, and this member fails alone.
            raise ChannelError("invalid e-mail header (address or subject)") from None
        email["Message-ID"] = f"<{key}@livecrm>"
        email.set_content(message.text)
        try:
            self._connection().send_message(email)
        except smtplib.SMTPResponseException as error:
            self.close()
            raise ChannelError(
                f"SMTP server rejected the message with code {error.smtp_code}"
            ) from None
        except (smtplib.SMTPException, OSError) as error:
            # Some of these errors carry the recipient address, so only the class is kept.
            self.close()
            raise ChannelError(f"SMTP send failed: {type(error).__name__}") from None
        return email["Message-ID"]

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._smtp = None
