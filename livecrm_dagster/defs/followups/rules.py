"""Send-time rules: who of a step's audience gets the message now, and why others do not.

Pure functions over frames already read from the warehouse and the send ledger, so every
rule can be tested without a database. The first rule that matches gives the reason.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import pandas as pd

from livecrm_dagster.defs.followups.ledger import HOLDOUT, SENDING, SENT
from livecrm_dagster.defs.followups.plan import StepTiming, in_holdout, in_quiet_hours
from livecrm_dagster.defs.followups.scenarios import FollowupSettings, Step

# Skip reasons, as stored in send_ledger.reason and counted in the asset's metadata.
ALREADY_SENT = "already_sent"
IN_FLIGHT = "in_flight"
DUPLICATE_OFFER = "duplicate_offer"
UNKNOWN_MEMBER = "unknown_member"
UNSUBSCRIBED = "unsubscribed"
NO_CONSENT = "no_consent"
NO_ADDRESS = "no_address"
BOUGHT_SINCE_BROADCAST = "bought_since_broadcast"
OFFER_EXPIRED = "offer_expired"
UNKNOWN_PRODUCT = "unknown_product"
NO_LOW_STOCK_PRODUCT = "no_low_stock_product"
NO_PRODUCT = "no_product"
NO_ARCHIVE_URL = "no_archive_url"
NO_NEXT_BROADCAST = "no_next_broadcast"
NO_MATCHING_ANSWER = "no_matching_answer"
TEMPLATE_ERROR = "template_error"
FREQUENCY_CAP = "frequency_cap"
BLOCKED_BY_FAILED_CHECK = "blocked_by_failed_check"
CHANNEL_ERROR = "channel_error"

SEND = "send"
SKIP = "skipped"
PRODUCTS_PER_MESSAGE = 5


@dataclass(frozen=True)
class Decision:
    """Outcome for one member in one step run: send, skip with a reason, or holdout."""

    member_id: str
    segment: str
    action: str
    reason: str | None = None
    subject: str = ""
    text: str = ""
    # True when the ledger already contains the final state, so nothing is written.
    recorded: bool = False


@dataclass
class StepInputs:
    """Everything the rules read for one (broadcast, step) at one instant."""

    step: Step
    settings: FollowupSettings
    zone: ZoneInfo
    now: dt.datetime
    timing: StepTiming
    broadcast: Mapping[str, object]
    shop_name: str
    audience: pd.DataFrame
    members: pd.DataFrame
    products: pd.DataFrame
    buyers: set[str]
    step_ledger: pd.DataFrame
    # Members whose offer of this broadcast is in flight or sent by another step.
    offer_taken: set[str] = field(default_factory=set)
    # Messages in flight or sent to each member on the current shop day, other steps.
    sent_today: Mapping[str, int] = field(default_factory=dict)
    # Member -> (higher-priority step due now, whether it carries the same offer).
    outranked_by: Mapping[str, tuple[str, bool]] = field(default_factory=dict)
    channel_consent: str = "consent_email"
    address_column: str | None = None
    # Upstream asset checks whose latest evaluation for this broadcast failed.
    failed_checks: list[str] = field(default_factory=list)


def step_blocker(inputs: StepInputs) -> str | None:
    """Return why no member may be sent this step now, or None.

    `not_due` and `quiet_hours` defer the whole step and write nothing. `offer_expired`
    skips every member for good. `blocked_by_failed_check` skips every member until a
    later run finds the checks passing.
    """
    timing, now = inputs.timing, inputs.now
    if inputs.failed_checks:
        return BLOCKED_BY_FAILED_CHECK
    if timing.expires_before_send or (timing.expires_at is not None and now > timing.expires_at):
        return OFFER_EXPIRED
    if now < timing.send_at:
        return "not_due"
    if in_quiet_hours(now, inputs.settings.quiet_hours, inputs.zone):
        return "quiet_hours"
    return None


def decide(inputs: StepInputs) -> list[Decision]:
    """Decide every audience member of the step, in member order."""
    step = inputs.step
    rows = inputs.audience.loc[inputs.audience["segment"].isin(step.segments)]
    order = {name: rank for rank, name in enumerate(step.segments)}
    rows = rows.assign(_rank=rows["segment"].map(order)).sort_values(["member_id", "_rank"])
    ledger = inputs.step_ledger.set_index("member_id") if not inputs.step_ledger.empty else None
    blocker = step_blocker(inputs)
    lease = dt.timedelta(minutes=inputs.settings.sending_lease_minutes)

    decisions = []
    for member_id, member_rows in rows.groupby("member_id", sort=True):
        segment = str(member_rows["segment"].iloc[0])
        previous = (
            ledger.loc[member_id] if ledger is not None and member_id in ledger.index else None
        )
        if previous is not None:
            status = previous["status"]
            if status == SENT:
                decisions.append(Decision(member_id, segment, SKIP, ALREADY_SENT, recorded=True))
                continue
            # A claim younger than the lease may belong to a run that is still sending. An
            # older one is taken over and sent again with the same idempotency key.
            if status == SENDING and pd.Timestamp(previous["claimed_at"]) >= inputs.now - lease:
                decisions.append(Decision(member_id, segment, SKIP, IN_FLIGHT, recorded=True))
                continue
            if status == HOLDOUT:
                decisions.append(Decision(member_id, segment, HOLDOUT, recorded=True))
                continue
        if blocker in (OFFER_EXPIRED, BLOCKED_BY_FAILED_CHECK):
            decisions.append(Decision(member_id, segment, SKIP, blocker))
            continue
        decisions.append(_decide_member(inputs, member_id, segment, member_rows))
    return decisions


def _decide_member(
    inputs: StepInputs, member_id: str, segment: str, member_rows: pd.DataFrame
) -> Decision:
    step = inputs.step

    def skip(reason: str) -> Decision:
        return Decision(member_id, segment, SKIP, reason)

    outranked = inputs.outranked_by.get(member_id)
    if member_id in inputs.offer_taken or (outranked is not None and outranked[1]):
        return skip(DUPLICATE_OFFER)
    if member_id not in inputs.members.index:
        return skip(UNKNOWN_MEMBER)
    member = inputs.members.loc[member_id]
    unsubscribed_at = member.get("unsubscribed_at")
    if unsubscribed_at is not None and not pd.isna(unsubscribed_at):
        if pd.Timestamp(unsubscribed_at) <= inputs.now:
            return skip(UNSUBSCRIBED)
    if not _true(member.get(inputs.channel_consent)):
        return skip(NO_CONSENT)
    if inputs.address_column and not text_value(member.get(inputs.address_column)):
        return skip(NO_ADDRESS)
    if step.exclude_buyers_since is not None and member_id in inputs.buyers:
        return skip(BOUGHT_SINCE_BROADCAST)
    if in_holdout(
        str(inputs.broadcast["broadcast_id"]), segment, member_id, inputs.settings.holdout_share
    ):
        return Decision(member_id, segment, HOLDOUT)

    products, problem = _content_products(inputs, member_id, member_rows)
    if problem:
        return skip(problem)
    try:
        subject, text = _render(inputs, products)
    except (KeyError, ValueError, IndexError):
        return skip(TEMPLATE_ERROR)

    cap = inputs.settings.frequency_cap.messages_per_shop_day
    if step.counts_toward_cap and cap > 0:
        if inputs.sent_today.get(member_id, 0) >= cap or outranked is not None:
            return skip(FREQUENCY_CAP)
    return Decision(member_id, segment, SEND, subject=subject, text=text)


def _true(value: object) -> bool:
    return value is not None and not pd.isna(value) and bool(value)


def text_value(value: object) -> str:
    return "" if value is None or pd.isna(value) else str(value).strip()


def _ids(value: object) -> list[str]:
    return [part for part in text_value(value).split(";") if part]


def _content_products(
    inputs: StepInputs, member_id: str, member_rows: pd.DataFrame
) -> tuple[list[str], str | None]:
    """Return the lines of products the message lists, or the reason it cannot be sent."""
    content = inputs.step.content
    products = inputs.products
    featured = _ids(inputs.broadcast.get("featured_product_ids"))
    known_featured = [p for p in featured if p in products.index]

    def lines(ids: list[str], url_column: str) -> list[str]:
        return [
            f"{products.at[p, 'name']}: {text_value(products.at[p, url_column])}"
            for p in ids[:PRODUCTS_PER_MESSAGE]
        ]

    if content == "archive":
        return [], None if text_value(inputs.broadcast.get("archive_url")) else NO_ARCHIVE_URL
    if content == "next_broadcast":
        has_next = not pd.isna(inputs.broadcast.get("next_broadcast_at") or pd.NaT)
        return [], None if has_next else NO_NEXT_BROADCAST
    if content == "product_detail":
        clicked = [p for ids in member_rows["product_ids"] for p in _ids(ids)]
        known = [p for p in dict.fromkeys(clicked) if p in products.index]
        return (lines(known, "detail_url"), None) if known else ([], UNKNOWN_PRODUCT)
    if content == "low_stock":
        clicked_rows = inputs.audience.loc[
            (inputs.audience["member_id"] == member_id)
            & (inputs.audience["segment"] == "clicked_not_bought")
        ]
        clicked = [p for ids in clicked_rows["product_ids"] for p in _ids(ids)]
        candidates = [p for p in dict.fromkeys(clicked + featured) if p in products.index]
        low = [
            p
            for p in candidates
            if not pd.isna(products.at[p, "stock"])
            and not pd.isna(products.at[p, "low_stock_threshold"])
            and products.at[p, "stock"] < products.at[p, "low_stock_threshold"]
        ]
        return (lines(low, "detail_url"), None) if low else ([], NO_LOW_STOCK_PRODUCT)
    if content == "reviews":
        with_reviews = [p for p in known_featured if text_value(products.at[p, "reviews_url"])]
        return (lines(with_reviews, "reviews_url"), None) if with_reviews else ([], NO_PRODUCT)
    if content in ("related_products", "other_categories"):
        categories = {products.at[p, "category"] for p in known_featured}
        same = products["category"].isin(categories)
        chosen = products.loc[same if content == "related_products" else ~same]
        ids = [p for p in sorted(chosen.index) if p not in featured]
        return (lines(ids, "detail_url"), None) if ids else ([], NO_PRODUCT)
    if content == "survey_match":
        mapping = {k.strip().casefold(): v for k, v in inputs.step.survey_categories.items()}
        categories = [mapping.get(text_value(a).casefold()) for a in member_rows["answer"]]
        categories = [c for c in categories if c]
        if not categories:
            return [], NO_MATCHING_ANSWER
        ids = sorted(products.index[products["category"] == categories[0]])
        return (lines(ids, "detail_url"), None) if ids else ([], NO_PRODUCT)
    return [], None


def shop_time(value: object, zone: ZoneInfo) -> str:
    if value is None or pd.isna(value):
        return ""
    return pd.Timestamp(value).tz_convert(zone).strftime("%Y-%m-%d %H:%M")


def _render(inputs: StepInputs, products: list[str]) -> tuple[str, str]:
    template = inputs.settings.templates[inputs.step.template]
    fields = {
        "shop_name": inputs.shop_name,
        "broadcast_title": text_value(inputs.broadcast.get("title")),
        "archive_url": text_value(inputs.broadcast.get("archive_url")),
        "offer_expires_at": shop_time(inputs.timing.expires_at, inputs.zone),
        "products": "\n".join(products),
        "next_broadcast_at": shop_time(inputs.broadcast.get("next_broadcast_at"), inputs.zone),
    }
    return template.subject.format(**fields), template.text.format(**fields)
