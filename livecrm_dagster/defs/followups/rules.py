"""Send-time rules: who of a step's audience gets the message now, and why others do not.

Pure functions over frames already read from the warehouse and the send ledger, so every
rule can be tested without a database. The first rule that matches gives the reason.
"""

from __future__ import annotations

import datetime as dt
import itertools
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import numpy as np
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


def decide(inputs: StepInputs) -> pd.DataFrame:
    """Decide every audience member of the step, in member order.

    Returns one row per member with the columns `DECISION_COLUMNS`. `action` is `send`,
    `skipped` (with its `reason`) or `holdout`, and `subject` and `text` are set for
    `send`. `recorded` is true when the ledger already contains the final state, so nothing
    is written. Each rule runs on whole columns, and the first rule that matches a member
    decides for them, in the order of the calls below.
    """
    rows = _step_rows(inputs)
    first = rows.drop_duplicates("member_id")
    decisions = _Decisions(first["member_id"], first["segment"])
    _settle_recorded(decisions, inputs)
    blocker = step_blocker(inputs)
    if blocker in (OFFER_EXPIRED, BLOCKED_BY_FAILED_CHECK):
        decisions.settle(decisions.undecided(), SKIP, blocker)
        return decisions.frame()

    _settle_member_rules(decisions, inputs)
    messages = _messages(inputs, rows, decisions.member_ids[decisions.undecided()])
    messages = messages.reindex(decisions.member_ids)
    decisions.settle(messages["problem"].notna().to_numpy(), SKIP, messages["problem"])
    _settle_frequency_cap(decisions, inputs)
    decisions.settle(
        decisions.undecided(), SEND, subject=messages["subject"], text=messages["text"]
    )
    return decisions.frame()


# The columns of the frame `decide` returns.
DECISION_COLUMNS = ["member_id", "segment", "action", "reason", "subject", "text", "recorded"]
# Contents whose message differs between members. Every other content is built once.
MEMBER_CONTENTS = ("product_detail", "low_stock", "survey_match")


class _Decisions:
    """The decisions of a step's members, filled rule by rule: the first match decides."""

    def __init__(self, member_ids: pd.Series, segments: pd.Series):
        index = pd.Index(member_ids.to_numpy(dtype=object), name="member_id")
        self.columns = {
            "segment": pd.Series(segments.to_numpy(dtype=object), index=index, dtype=object),
            "action": pd.Series(None, index=index, dtype=object),
            "reason": pd.Series(None, index=index, dtype=object),
            "subject": pd.Series("", index=index, dtype=object),
            "text": pd.Series("", index=index, dtype=object),
            "recorded": pd.Series(False, index=index, dtype=bool),
        }

    @property
    def member_ids(self) -> pd.Index:
        return self.columns["action"].index

    def undecided(self) -> np.ndarray:
        return self.columns["action"].isna().to_numpy()

    def settle(
        self,
        matches: np.ndarray,
        action: str,
        reason: str | pd.Series | None = None,
        recorded: bool = False,
        subject: pd.Series | None = None,
        text: pd.Series | None = None,
    ) -> None:
        """Assign `action` to each undecided member where `matches` is true.

        `reason`, `subject` and `text` are one value for all, or Series indexed by member.
        """
        chosen = self.undecided() & matches
        self._assign("action", chosen, action)
        self._assign("reason", chosen, reason)
        self._assign("recorded", chosen, recorded)
        if subject is not None:
            self._assign("subject", chosen, subject)
        if text is not None:
            self._assign("text", chosen, text)

    def _assign(self, name: str, chosen: np.ndarray, value: object) -> None:
        column = self.columns[name]
        column[chosen] = value[chosen] if isinstance(value, pd.Series) else value

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.columns).reset_index()
        return frame[DECISION_COLUMNS]


def _step_rows(inputs: StepInputs) -> pd.DataFrame:
    """Return the audience rows in the step's segments, by member, then by segment order."""
    step = inputs.step
    rows = inputs.audience.loc[inputs.audience["segment"].isin(step.segments)]
    order = {name: rank for rank, name in enumerate(step.segments)}
    return rows.assign(_rank=rows["segment"].map(order)).sort_values(["member_id", "_rank"])


def _settle_recorded(decisions: _Decisions, inputs: StepInputs) -> None:
    """Keep the outcome of members whose ledger row of this step is final or in flight."""
    if inputs.step_ledger.empty:
        return
    previous = inputs.step_ledger.set_index("member_id").reindex(decisions.member_ids)
    status = previous["status"].to_numpy(dtype=object)
    lease = dt.timedelta(minutes=inputs.settings.sending_lease_minutes)
    claimed_at = pd.to_datetime(previous["claimed_at"], utc=True)
    # A claim younger than the lease may belong to a run that is still sending. An older
    # one is taken over and sent again with the same idempotency key.
    young = (claimed_at >= inputs.now - lease).to_numpy()

    decisions.settle(status == SENT, SKIP, ALREADY_SENT, recorded=True)
    decisions.settle((status == SENDING) & young, SKIP, IN_FLIGHT, recorded=True)
    decisions.settle(status == HOLDOUT, HOLDOUT, recorded=True)


def _settle_member_rules(decisions: _Decisions, inputs: StepInputs) -> None:
    """Skip or hold out members for reasons of their own, before any message is built."""
    ids = decisions.member_ids
    members = inputs.members.reindex(ids)
    same_offer_due = [m for m, (_, same_offer) in inputs.outranked_by.items() if same_offer]
    duplicate_offer = ids.isin(list(inputs.offer_taken)) | ids.isin(same_offer_due)
    unsubscribed_at = pd.to_datetime(_column(members, "unsubscribed_at"), utc=True)
    unsubscribed = unsubscribed_at.notna() & (unsubscribed_at <= inputs.now)

    decisions.settle(duplicate_offer, SKIP, DUPLICATE_OFFER)
    decisions.settle(~ids.isin(inputs.members.index), SKIP, UNKNOWN_MEMBER)
    decisions.settle(unsubscribed.to_numpy(), SKIP, UNSUBSCRIBED)
    consent = _truthy(_column(members, inputs.channel_consent))
    decisions.settle(~consent.to_numpy(), SKIP, NO_CONSENT)
    if inputs.address_column:
        address = text_values(_column(members, inputs.address_column))
        decisions.settle((address == "").to_numpy(), SKIP, NO_ADDRESS)
    if inputs.step.exclude_buyers_since is not None:
        decisions.settle(ids.isin(list(inputs.buyers)), SKIP, BOUGHT_SINCE_BROADCAST)
    share = inputs.settings.holdout_share
    if share > 0:
        broadcast_id = str(inputs.broadcast["broadcast_id"])
        segments = decisions.columns["segment"]
        held_out = [in_holdout(broadcast_id, s, m, share) for m, s in segments.items()]
        decisions.settle(np.array(held_out, dtype=bool), HOLDOUT)


def _settle_frequency_cap(decisions: _Decisions, inputs: StepInputs) -> None:
    """Skip members who reached the day's cap, or whom a higher-priority step takes today."""
    cap = inputs.settings.frequency_cap.messages_per_shop_day
    if not inputs.step.counts_toward_cap or cap <= 0:
        return
    ids = decisions.member_ids
    sent_today = ids.to_series().map(dict(inputs.sent_today)).fillna(0).to_numpy()
    decisions.settle((sent_today >= cap) | ids.isin(list(inputs.outranked_by)), SKIP, FREQUENCY_CAP)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """Return a column, or all missing values when the frame has no such column."""
    if name in frame.columns:
        return frame[name]
    return pd.Series(None, index=frame.index, dtype=object)


def _truthy(values: pd.Series) -> pd.Series:
    """Return, per value, whether it is present and true (`bool(value)`)."""
    present = values.notna()
    return present & values.where(present, False).astype(bool)


def text_values(values: pd.Series) -> pd.Series:
    """Return the values as stripped text, with "" for missing ones, like `text_value`."""
    return values.where(values.notna(), "").astype(str).str.strip()


@dataclass(frozen=True)
class _MemberContent:
    """The audience values that member-specific contents read, for one member."""

    # `product_ids` and `answer` of the member's rows in the step's segments, in row order.
    product_ids: tuple = ()
    answers: tuple = ()
    # `product_ids` of the member's rows in the clicked_not_bought segment.
    clicked: tuple = ()


def _messages(inputs: StepInputs, rows: pd.DataFrame, member_ids: pd.Index) -> pd.DataFrame:
    """Build each member's message, or the reason it cannot be built.

    Returns the columns `problem`, `subject` and `text`, indexed by member. A message that
    is the same for everyone is built once, and a member-specific one once per distinct
    input, because templates and product lookups cost far more than the comparison.
    """
    columns = ["problem", "subject", "text"]
    if inputs.step.content not in MEMBER_CONTENTS:
        message = _message(inputs, _MemberContent())
        return pd.DataFrame([message] * len(member_ids), index=member_ids, columns=columns)

    contents = _member_contents(inputs, rows)
    built: dict[_MemberContent, tuple[str | None, str, str]] = {}
    messages = []
    for member_id in member_ids:
        content = contents.get(member_id, _MemberContent())
        if content not in built:
            built[content] = _message(inputs, content)
        messages.append(built[content])
    return pd.DataFrame(messages, index=member_ids, columns=columns)


def _message(inputs: StepInputs, member: _MemberContent) -> tuple[str | None, str, str]:
    """Return (problem, subject, text): why the message cannot be sent, or its text."""
    products, problem = _content_products(inputs, member)
    if problem:
        return problem, "", ""
    try:
        subject, text = _render(inputs, products)
    except (KeyError, ValueError, IndexError):
        return TEMPLATE_ERROR, "", ""
    return None, subject, text


def _member_contents(inputs: StepInputs, rows: pd.DataFrame) -> dict[str, _MemberContent]:
    """Collect each member's product IDs, answers and clicked products from the audience."""
    product_ids = _tuples_by_member(rows["member_id"], rows["product_ids"])
    answers = _tuples_by_member(rows["member_id"], rows["answer"])
    audience = inputs.audience
    clicked_rows = audience.loc[audience["segment"] == "clicked_not_bought"]
    clicked_rows = clicked_rows.sort_values("member_id", kind="stable")
    clicked = _tuples_by_member(clicked_rows["member_id"], clicked_rows["product_ids"])
    return {
        member_id: _MemberContent(ids, answers[member_id], clicked.get(member_id, ()))
        for member_id, ids in product_ids.items()
    }


def _tuples_by_member(member_ids: pd.Series, values: pd.Series) -> dict[str, tuple]:
    """Group the values of rows sorted by member into one tuple per member, in row order."""
    pairs = zip(member_ids.tolist(), values.tolist(), strict=True)
    return {
        member_id: tuple(value for _, value in group)
        for member_id, group in itertools.groupby(pairs, key=operator.itemgetter(0))
    }


def text_value(value: object) -> str:
    return "" if value is None or pd.isna(value) else str(value).strip()


def _ids(value: object) -> list[str]:
    return [part for part in text_value(value).split(";") if part]


def _content_products(inputs: StepInputs, member: _MemberContent) -> tuple[list[str], str | None]:
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
        clicked = [p for ids in member.product_ids for p in _ids(ids)]
        known = [p for p in dict.fromkeys(clicked) if p in products.index]
        return (lines(known, "detail_url"), None) if known else ([], UNKNOWN_PRODUCT)
    if content == "low_stock":
        clicked = [p for ids in member.clicked for p in _ids(ids)]
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
        categories = [mapping.get(text_value(a).casefold()) for a in member.answers]
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
