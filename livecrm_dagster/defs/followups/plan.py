"""Due times of follow-up steps in the shop's time zone, quiet hours and holdout membership.

Every function takes and returns aware instants, so neither the server's zone nor the
database session's zone changes a result.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from livecrm_dagster.defs.followups.scenarios import FollowupSettings, QuietHours, Step


@dataclass(frozen=True)
class StepTiming:
    """When a step of one broadcast falls due, when it may go out, and when its offer expires."""

    due_at: dt.datetime
    send_at: dt.datetime
    expires_at: dt.datetime | None

    @property
    def expires_before_send(self) -> bool:
        return self.expires_at is not None and self.send_at > self.expires_at

    @property
    def trigger_at(self) -> dt.datetime:
        """The instant the sensor requests the step: when it may go out, or at the due time
        when its offer expires first, so the skips are recorded without waiting."""
        return self.due_at if self.expires_before_send else self.send_at


def _require_aware(instant: dt.datetime) -> None:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"a time without a zone is ambiguous here: {instant!r}")


def _at_local(day: dt.date, time: dt.time, zone: ZoneInfo) -> dt.datetime:
    # A wall time skipped by a clock change (a DST gap) resolves to the instant after it.
    local = dt.datetime.combine(day, time, tzinfo=zone)
    return local.astimezone(dt.UTC)


def due_at(step: Step, ends_at: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """Return the instant a step falls due: the end plus its delay, or a time of day
    `days_after_end` shop days after the end's shop day."""
    _require_aware(ends_at)
    if step.delay_timedelta is not None:
        # Delays are elapsed time, so "+24h" over a clock change stays 24 real hours.
        return (ends_at + step.delay_timedelta).astimezone(dt.UTC)
    end_day = ends_at.astimezone(zone).date()
    return _at_local(end_day + dt.timedelta(days=step.days_after_end), step.at_time, zone)


def in_quiet_hours(instant: dt.datetime, quiet: QuietHours, zone: ZoneInfo) -> bool:
    """Return whether a shop-time instant lies in the half-open range [start, end)."""
    _require_aware(instant)
    start, end = quiet.start_time, quiet.end_time
    if start == end:
        return False
    clock = instant.astimezone(zone).time()
    if start < end:
        return start <= clock < end
    return clock >= start or clock < end


def next_allowed(instant: dt.datetime, quiet: QuietHours, zone: ZoneInfo) -> dt.datetime:
    """Return the instant itself outside quiet hours, else the end of the quiet hours."""
    if not in_quiet_hours(instant, quiet, zone):
        return instant.astimezone(dt.UTC)
    local = instant.astimezone(zone)
    day = local.date()
    passes_midnight = quiet.start_time > quiet.end_time
    if passes_midnight and local.time() >= quiet.start_time:
        day += dt.timedelta(days=1)
    return _at_local(day, quiet.end_time, zone)


def offer_expires_at(step: Step, due: dt.datetime, zone: ZoneInfo) -> dt.datetime | None:
    if step.offer is None:
        return None
    day = due.astimezone(zone).date() + dt.timedelta(days=step.offer.days_after_due)
    return _at_local(day, dt.time.fromisoformat(step.offer.time), zone)


def step_timing(
    step: Step, ends_at: dt.datetime, settings: FollowupSettings, zone: ZoneInfo
) -> StepTiming:
    due = due_at(step, ends_at, zone)
    return StepTiming(
        due_at=due,
        send_at=next_allowed(due, settings.quiet_hours, zone),
        expires_at=offer_expires_at(step, due, zone),
    )


def shop_day(instant: dt.datetime, zone: ZoneInfo) -> dt.date:
    _require_aware(instant)
    return instant.astimezone(zone).date()


def in_holdout(broadcast_id: str, segment: str, member_id: str, share: float) -> bool:
    """Return whether a member is held out of a broadcast's segment.

    The draw is a SHA-256 of the three ids, so it is the same on every run and machine,
    and a member is held out of every step of that segment of that broadcast.
    """
    if share <= 0:
        return False
    digest = hashlib.sha256(f"{broadcast_id}\x1f{segment}\x1f{member_id}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    return draw < share
