"""Run one follow-up step of one broadcast: re-check the audience, claim, send, record.

The ledger row of every member is committed as `planned` before any request, claimed
(`sending`) by exactly one run, and marked `sent` or `failed` after the channel responds.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from livecrm_dagster.defs.followups import rules
from livecrm_dagster.defs.followups.delivery import ChannelFactory, deliver
from livecrm_dagster.defs.followups.ledger import (
    FAILED,
    HOLDOUT,
    IN_FLIGHT_OR_SENT,
    SKIPPED,
    Claim,
    SendLedger,
    ledger_key,
)
from livecrm_dagster.defs.followups.plan import shop_day, step_timing
from livecrm_dagster.defs.followups.scenarios import FollowupSettings, Step
from livecrm_dagster.defs.followups.sql_lists import read_in
from livecrm_dagster.quality import failed_checks as failed_quality_checks
from livecrm_dagster.settings import ShopSettings
from livecrm_dagster.warehouse import Warehouse


@dataclass
class StepResult:
    """Counts of one step run, and the per-member decisions for a dry run."""

    broadcast_id: str
    step_id: str
    sent: int = 0
    failed: int = 0
    holdout: int = 0
    skipped: Counter = field(default_factory=Counter)
    # Why the whole step did nothing now (scenario_disabled, not_due, quiet_hours), if so.
    deferred: str | None = None
    audience: int = 0
    dry_run: bool = False
    decisions: list[dict] = field(default_factory=list)

    def counts(self) -> dict[str, object]:
        return {
            "audience": self.audience,
            "sent": self.sent,
            "failed": self.failed,
            "holdout": self.holdout,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "deferred": self.deferred,
        }


def run_step(
    warehouse: Warehouse,
    settings: FollowupSettings,
    shop: ShopSettings,
    channel_factory: ChannelFactory,
    broadcast_id: str,
    step_id: str,
    now: dt.datetime,
    run_id: str,
    dry_run: bool = False,
    failed_checks: list[str] | None = None,
) -> StepResult:
    """Send one step of one broadcast as of `now`, or with `dry_run` only decide it.

    `failed_checks` names upstream asset checks that failed for this broadcast; every
    member is then skipped as `blocked_by_failed_check`.
    """
    if now.tzinfo is None:
        raise ValueError(f"`now` needs a UTC offset: {now!r}")
    now = now.astimezone(dt.UTC)
    step = settings.step(step_id)
    result = StepResult(broadcast_id, step_id, dry_run=dry_run)
    if not settings.is_enabled(step_id):
        result.deferred = "scenario_disabled"
        return result

    inputs = step_inputs(warehouse, settings, shop, broadcast_id, step, now, failed_checks)
    member_ids = _step_members(inputs)
    result.audience = len(member_ids)
    ledger = SendLedger(warehouse.engine)
    blocker = rules.step_blocker(inputs)
    if blocker in ("not_due", "quiet_hours"):
        result.deferred = blocker
        return result

    with ledger.step_lock(broadcast_id, step_id):
        # Read the ledger inside the lock, so a run that waited reads the other run's sends.
        step_rows = ledger.step_rows(broadcast_id, step_id)
        inputs.step_ledger = step_rows.loc[step_rows["channel"] == step.channel]
        _add_cap_context(inputs, warehouse, ledger, settings, shop, broadcast_id, member_ids)
        decisions = rules.decide(inputs)
        if dry_run:
            _count_dry_run(result, decisions)
            return result
        _apply(result, decisions, inputs, ledger, channel_factory, run_id)
    return result


def step_inputs(
    warehouse: Warehouse,
    settings: FollowupSettings,
    shop: ShopSettings,
    broadcast_id: str,
    step: Step,
    now: dt.datetime,
    failed_checks: list[str] | None = None,
) -> rules.StepInputs:
    """Read what the rules need to decide one step of one broadcast at `now`.

    The ledger-dependent fields (step ledger, offers taken, cap context) stay empty; the
    caller fills them while it holds the step's lock.
    """
    broadcasts = warehouse.read("broadcasts", broadcast_id=broadcast_id)
    if broadcasts.empty:
        raise ValueError(f"broadcast {broadcast_id!r} is not in the broadcasts table")
    broadcast = broadcasts.iloc[0].to_dict()
    zone = shop.zone
    timing = step_timing(step, broadcast["ends_at"].to_pydatetime(), settings, zone)
    audience = warehouse.read("followup_audience", broadcast_id=broadcast_id)
    audience = audience.loc[audience["segment"].isin(step.segments)]
    audience = audience.fillna({"product_ids": "", "answer": ""})
    # Low-stock messages also list what the member clicked, from another segment's rows.
    if step.content == "low_stock":
        clicked = warehouse.read(
            "followup_audience", broadcast_id=broadcast_id, segment="clicked_not_bought"
        ).fillna({"product_ids": ""})
        audience = pd.concat([audience, clicked], ignore_index=True)
    member_ids = sorted(set(audience.loc[audience["segment"].isin(step.segments), "member_id"]))
    channel_settings = settings.channels[step.channel]

    return rules.StepInputs(
        step=step,
        settings=settings,
        zone=zone,
        now=now,
        timing=timing,
        broadcast=broadcast,
        shop_name=shop.shop_name,
        audience=audience,
        members=read_in(warehouse, "members", "member_id", member_ids).set_index("member_id"),
        products=warehouse.read("products").set_index("product_id"),
        buyers=_buyers_since(warehouse, step, broadcast, member_ids, now),
        step_ledger=pd.DataFrame(),
        channel_consent=channel_settings.consent,
        address_column=_address_column(step.channel),
        failed_checks=list(failed_checks or []),
    )


def _step_members(inputs: rules.StepInputs) -> list[str]:
    audience = inputs.audience
    return sorted(set(audience.loc[audience["segment"].isin(inputs.step.segments), "member_id"]))


def _address_column(channel: str) -> str | None:
    return {"line": "line_user_id", "line_multicast": "line_user_id", "email": "email"}.get(channel)


def _buyers_since(
    warehouse: Warehouse, step: Step, broadcast: dict, member_ids: list[str], now: dt.datetime
) -> set[str]:
    """Return members with a paid order line since the broadcast's start (or end) until now."""
    if step.exclude_buyers_since is None or not member_ids:
        return set()
    since = broadcast["starts_at" if step.exclude_buyers_since == "broadcast_start" else "ends_at"]
    orders = warehouse.table("orders")
    paid = read_in(
        warehouse,
        "orders",
        "member_id",
        member_ids,
        orders.c.status == "paid",
        orders.c.paid_at >= since.to_pydatetime(),
        orders.c.paid_at <= now,
        columns=["member_id"],
    )
    return set(paid["member_id"].dropna())


def _add_cap_context(
    inputs: rules.StepInputs,
    warehouse: Warehouse,
    ledger: SendLedger,
    settings: FollowupSettings,
    shop: ShopSettings,
    broadcast_id: str,
    member_ids: list[str],
) -> None:
    """Fill what the offer and frequency-cap rules need from the ledger and other steps.

    A step without an offer that is exempt from the cap (or runs with the cap off) reads
    nothing: neither rule could change one of its decisions.
    """
    step, now, zone = inputs.step, inputs.now, inputs.zone
    if step.offer is None and not _capped(step, settings):
        return
    today = shop_day(now, zone).isoformat()
    taken = ledger.member_rows(member_ids, IN_FLIGHT_OR_SENT)
    others = taken.loc[(taken["broadcast_id"] != broadcast_id) | (taken["step_id"] != step.id)]
    if step.offer is not None:
        offer_key = f"{broadcast_id}:{step.offer.id}"
        inputs.offer_taken = set(others.loc[others["offer_key"] == offer_key, "member_id"])
    today_rows = others.loc[others["cap_slot"].fillna("").str.startswith(today + "#")]
    inputs.sent_today = today_rows.groupby("member_id").size().to_dict()
    inputs.outranked_by = _outranked_by(inputs, warehouse, ledger, settings, shop, broadcast_id)


def _capped(step: Step, settings: FollowupSettings) -> bool:
    """Return whether the frequency cap applies to the step."""
    return step.counts_toward_cap and settings.frequency_cap.messages_per_shop_day > 0


def _outranked_by(
    inputs: rules.StepInputs,
    warehouse: Warehouse,
    ledger: SendLedger,
    settings: FollowupSettings,
    shop: ShopSettings,
    broadcast_id: str,
) -> dict[str, tuple[str, bool]]:
    """Map members to a higher-priority step that will also go out to them today.

    A competitor is an enabled step of a broadcast in the follow-up window. Its send time
    is on today's shop day and not after now, it outranks this step (higher priority, then
    lower broadcast and step id), it has not yet decided this member, and its own rules
    would send to the member (consent, content, buyers and so on). Without the first
    conditions, whichever of two runs due in the same tick came first would win the cap.
    Without the last, a member would lose this step to a competitor that then skips them.
    """
    step, now, zone = inputs.step, inputs.now, inputs.zone
    today = shop_day(now, zone)
    window_start = now - dt.timedelta(days=settings.followup_window_days)
    broadcasts_table = warehouse.table("broadcasts")
    recent = warehouse.query(
        "broadcasts",
        broadcasts_table.c.ends_at >= window_start,
        broadcasts_table.c.ends_at <= now,
    )
    ours = (-step.priority, broadcast_id, step.id)
    competitors: list[tuple[str, Step, bool]] = []
    for row in recent.itertuples(index=False):
        for other in settings.enabled_steps():
            if (row.broadcast_id, other.id) == (broadcast_id, step.id):
                continue
            same_offer = (
                row.broadcast_id == broadcast_id
                and step.offer is not None
                and other.offer is not None
                and other.offer.id == step.offer.id
            )
            # Without a shared offer, a competitor matters only to the frequency cap.
            if not same_offer and not (_capped(step, settings) and other.counts_toward_cap):
                continue
            if (-other.priority, row.broadcast_id, other.id) >= ours:
                continue
            timing = step_timing(other, row.ends_at.to_pydatetime(), settings, zone)
            if timing.expires_before_send or timing.send_at > now:
                continue
            if shop_day(timing.send_at, zone) != today:
                continue
            competitors.append((row.broadcast_id, other, same_offer))
    if not competitors:
        return {}

    members = set(inputs.audience["member_id"])
    audiences = warehouse.read(
        "followup_audience", broadcast_id=sorted({b for b, _, _ in competitors})
    )
    audiences = audiences.loc[audiences["member_id"].isin(members)]
    decided = ledger.member_rows(sorted(members), [*IN_FLIGHT_OR_SENT, SKIPPED, FAILED, HOLDOUT])
    decided_keys = set(
        zip(decided["broadcast_id"], decided["step_id"], decided["member_id"], strict=True)
    )
    outranked: dict[str, tuple[str, bool]] = {}
    for other_broadcast, other, same_offer in competitors:
        in_segments = audiences.loc[
            (audiences["broadcast_id"] == other_broadcast)
            & audiences["segment"].isin(other.segments)
        ]
        undecided = sorted(
            member_id
            for member_id in set(in_segments["member_id"])
            if (other_broadcast, other.id, member_id) not in decided_keys
        )
        if not undecided:
            continue
        would_send = _would_send(
            warehouse, ledger, settings, shop, other_broadcast, other, inputs.now, undecided
        )
        for member_id in undecided:
            if member_id not in would_send:
                continue
            label = f"{other_broadcast}/{other.id}"
            if member_id not in outranked or (same_offer and not outranked[member_id][1]):
                outranked[member_id] = (label, same_offer)
    return outranked


def _would_send(
    warehouse: Warehouse,
    ledger: SendLedger,
    settings: FollowupSettings,
    shop: ShopSettings,
    broadcast_id: str,
    step: Step,
    now: dt.datetime,
    member_ids: list[str],
) -> set[str]:
    """Return the members a competing step would send to now, before the frequency cap."""
    inputs = step_inputs(
        warehouse,
        settings,
        shop,
        broadcast_id,
        step,
        now,
        failed_quality_checks(warehouse, broadcast_id),
    )
    inputs.audience = inputs.audience.loc[inputs.audience["member_id"].isin(member_ids)]
    step_rows = ledger.step_rows(broadcast_id, step.id)
    inputs.step_ledger = step_rows.loc[step_rows["channel"] == step.channel]
    decisions = rules.decide(inputs)
    return set(decisions.loc[decisions["action"] == rules.SEND, "member_id"])


def _count_dry_run(result: StepResult, decisions: pd.DataFrame) -> None:
    action = decisions["action"]
    result.sent += int((action == rules.SEND).sum())
    result.holdout += int((action == HOLDOUT).sum())
    result.skipped.update(_reason_counts(decisions.loc[action == rules.SKIP, "reason"]))
    listed = decisions.assign(decision=action.where(action != rules.SEND, "would_send"))
    listed = listed[["member_id", "segment", "decision", "reason", "subject"]]
    result.decisions.extend(listed.astype(object).where(listed.notna(), None).to_dict("records"))


def _reason_counts(reasons: pd.Series) -> dict[str, int]:
    return {str(reason): int(count) for reason, count in reasons.value_counts().items()}


def _apply(
    result: StepResult,
    decisions: pd.DataFrame,
    inputs: rules.StepInputs,
    ledger: SendLedger,
    channel_factory: ChannelFactory,
    run_id: str,
) -> None:
    """Write every decision to the ledger, claim the sends, then deliver what was claimed."""
    step = inputs.step
    broadcast_id = str(inputs.broadcast["broadcast_id"])
    ledger_keys = [
        ledger_key(broadcast_id, step.id, member_id, step.channel)
        for member_id in decisions["member_id"]
    ]
    decisions = decisions.assign(idempotency_key=ledger_keys)
    unrecorded = decisions.loc[~decisions["recorded"]]
    planned = unrecorded[["idempotency_key", "member_id", "segment"]].assign(
        broadcast_id=broadcast_id,
        step_id=step.id,
        channel=step.channel,
        due_at=inputs.timing.due_at,
    )
    ledger.insert_planned(planned, inputs.now)

    sends = decisions.loc[decisions["action"] == rules.SEND]
    keys = sends["idempotency_key"].tolist()
    claims = _claim(ledger, keys, inputs, run_id)
    sends = sends.assign(
        outcome=[claims[key].outcome for key in keys],
        batch_key=[claims[key].batch_key for key in keys],
    )
    to_send = sends.loc[sends["outcome"] == "claimed"]
    _record_outcomes(result, decisions, sends, ledger, run_id, inputs.now)

    if not to_send.empty:
        delivered = deliver(to_send, inputs, ledger, channel_factory, run_id)
        result.sent += delivered.sent
        result.failed += delivered.failed


def _claim(
    ledger: SendLedger, keys: list[str], inputs: rules.StepInputs, run_id: str
) -> dict[str, Claim]:
    """Claim the rows to send with the step's offer and cap slots; every claim commits
    before the first request leaves."""
    step, now = inputs.step, inputs.now
    broadcast_id = str(inputs.broadcast["broadcast_id"])
    offer_key = f"{broadcast_id}:{step.offer.id}" if step.offer else None
    cap = inputs.settings.frequency_cap.messages_per_shop_day
    day = shop_day(now, inputs.zone).isoformat()
    cap_slots = (
        [f"{day}#{n}" for n in range(1, cap + 1)] if step.counts_toward_cap and cap else [None]
    )
    lease = dt.timedelta(minutes=inputs.settings.sending_lease_minutes)

    return ledger.claim_many(keys, run_id, now, lease, offer_key, cap_slots)


def _record_outcomes(
    result: StepResult,
    decisions: pd.DataFrame,
    sends: pd.DataFrame,
    ledger: SendLedger,
    run_id: str,
    now: dt.datetime,
) -> None:
    """Count every decision, and write the skips and holdouts not yet in the ledger.

    A send whose claim was rejected is skipped with the claim's reason. A row in flight or
    sent by another run is only counted as `already_sent`: its outcome is that run's.
    """
    rejected = sends.loc[sends["outcome"] != "claimed"]
    rejected_reason = rejected["outcome"].where(
        rejected["outcome"] != "in_flight_or_sent", rules.ALREADY_SENT
    )
    others = decisions.loc[decisions["action"] != rules.SEND]
    outcomes = pd.concat(
        [
            rejected.loc[rejected_reason != rules.ALREADY_SENT].assign(
                status=rules.SKIP, reason=rejected_reason
            ),
            others.loc[~others["recorded"]].assign(status=others["action"]),
        ]
    )

    ledger.record_outcomes(outcomes[["idempotency_key", "status", "reason"]], run_id, now)
    result.skipped.update(_reason_counts(rejected_reason))
    result.skipped.update(_reason_counts(others.loc[others["action"] == rules.SKIP, "reason"]))
    result.holdout += int((others["action"] == HOLDOUT).sum())
