"""Generate one broadcast's viewer events and the shop's orders with numpy, at a chosen scale.

The shapes follow the viewing simulator's defaults: a join spike around the start with an
exponential tail, a mixture of early bounces and lognormal watch times, heartbeats every
`heartbeat_seconds` ± 1 s with a few dropped, pauses longer than the session timeout,
missing `view_end`, a second device overlapping some member views, stray events near and
far from the broadcast, delivery duplicates, and orders with cancellations and credit notes.
Every value is drawn per view or per event with vectorised numpy calls, so 16 M events take
seconds, not minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

BROADCAST_ID = "bench-live"
STARTS_AT = pd.Timestamp("2026-11-20T11:00:00Z")  # 20:00 in Tokyo
PRODUCTS = np.array([f"P{number:03d}" for number in range(1, 21)])
QUIZ_QUESTION = "Q1"
SURVEY_QUESTIONS = np.array(["Q2", "Q3"])
SURVEY_ANSWERS = np.array(["dry skin", "oily skin", "sensitive skin", "none"])
COUPON_CODE = "LIVE10"
_US = 1_000_000


@dataclass(frozen=True)
class Scenario:
    """Parameters of one generated broadcast; times are in seconds unless named otherwise."""

    events: int
    length_minutes: float = 45.0
    heartbeat_seconds: float = 10.0
    anonymous_share: float = 0.30
    views_per_member: float = 1.4
    missing_view_end_share: float = 0.35
    second_device_share: float = 0.03
    dropped_heartbeat_share: float = 0.015
    pause_share: float = 0.10
    stray_share: float = 0.002
    implausible_share: float = 0.0005
    duplicate_share: float = 0.01
    conflicting_duplicate_share: float = 0.0002
    buyer_share: float = 0.03
    cancelled_share: float = 0.08
    credit_note_share: float = 0.03
    seed: int = 20261120

    @property
    def ends_at(self) -> pd.Timestamp:
        return STARTS_AT + pd.Timedelta(minutes=self.length_minutes)

    @property
    def timeout_seconds(self) -> float:
        # The shop settings' rule: 3 heartbeats without a signal, at least 60 s.
        return max(3 * self.heartbeat_seconds, 60.0)


def _views(rng: np.random.Generator, scenario: Scenario, count: int) -> dict[str, np.ndarray]:
    """Draw per-view join offset, duration, pause and view_end presence (seconds from start)."""
    length = scenario.length_minutes * 60
    branch = rng.random(count)
    offset = np.where(
        branch < 0.2,
        rng.uniform(-300, 0, count),
        np.where(branch < 0.9, rng.exponential(600, count), rng.uniform(0, length, count)),
    )
    offset = np.minimum(offset, length - 1)
    bounce = rng.random(count) < 0.3
    duration = np.where(bounce, rng.exponential(60, count), rng.lognormal(np.log(480), 1.1, count))
    # Players stop at the end give or take a minute, so a few events land after the end.
    duration = np.minimum(duration, length + rng.uniform(0, 60, count) - offset)
    heartbeats = np.floor(duration / scenario.heartbeat_seconds).astype(np.int64)
    has_end = rng.random(count) >= scenario.missing_view_end_share
    paused = rng.random(count) < scenario.pause_share
    pause_at = (rng.random(count) * (heartbeats + 1)).astype(np.int64) + 1
    pause_seconds = np.where(paused, rng.uniform(70, 300, count), 0.0)
    return {
        "offset": offset,
        "heartbeats": heartbeats,
        "has_end": has_end,
        "pause_at": pause_at,
        "pause_seconds": pause_seconds,
        "duration": duration,
    }


def _take(views: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[keep] for name, values in views.items()}


def generate(scenario: Scenario) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Return (viewer event rows, order rows, counts), both as string columns like a file drop."""
    rng = np.random.default_rng(scenario.seed)
    heartbeat = scenario.heartbeat_seconds

    # Draw more views than needed, then keep the prefix whose events reach the target;
    # engagement, stray and duplicate events add about 3 % on top of the viewing events.
    viewing_target = int(scenario.events * 0.97)
    pool = _views(rng, scenario, max(1000, viewing_target // 20))
    per_view = 2 + pool["heartbeats"] + pool["has_end"]
    cut = int(np.searchsorted(np.cumsum(per_view), viewing_target)) + 1
    views = _take(pool, np.arange(min(cut, len(per_view))))
    view_count = len(views["offset"])

    # Members: anonymous views get their own device; member views reuse the member's device.
    members = max(1, int(view_count * (1 - scenario.anonymous_share) / scenario.views_per_member))
    anonymous = rng.random(view_count) < scenario.anonymous_share
    member = np.where(anonymous, -1, rng.integers(0, members, view_count))
    device = np.where(anonymous, np.arange(view_count) + members * 2, member * 2)

    # A second device of the same member, overlapping 30-100 % of the first view.
    second = np.flatnonzero(~anonymous & (rng.random(view_count) < scenario.second_device_share))
    copies = _take(views, second)
    overlap = rng.uniform(0.3, 1.0, len(second))
    copies["offset"] = copies["offset"] + (1 - overlap) * copies["duration"]
    views = {name: np.concatenate([views[name], copies[name]]) for name in views}
    member = np.concatenate([member, member[second]])
    device = np.concatenate([device, device[second] + 1])
    view_count = len(member)

    # Viewing events: view_start at position 0, heartbeats 1..k, then view_end if present.
    per_view = 1 + views["heartbeats"] + views["has_end"]
    view_of = np.repeat(np.arange(view_count), per_view)
    first = np.cumsum(per_view) - per_view
    position = np.arange(len(view_of)) - first[view_of]
    heartbeats = views["heartbeats"][view_of]
    kind = np.where(position == 0, 0, np.where(position <= heartbeats, 1, 2))
    seconds = views["offset"][view_of] + position * heartbeat
    jitter = rng.uniform(-1, 1, len(view_of))
    seconds = seconds + np.where(kind == 1, jitter, 0.0)
    seconds = seconds + np.where(kind == 2, (jitter + 1) * heartbeat / 2 - heartbeat, 0.0)
    seconds = seconds + np.where(
        position >= views["pause_at"][view_of], views["pause_seconds"][view_of], 0.0
    )
    dropped = (kind == 1) & (rng.random(len(view_of)) < scenario.dropped_heartbeat_share)
    keep = ~dropped
    view_of, kind, seconds = view_of[keep], kind[keep], seconds[keep]

    # Engagement: a propensity per view drives chats, likes, clicks, answers and claims.
    propensity = rng.beta(0.5, 5, view_count)
    span_start = views["offset"]
    span = np.maximum(views["heartbeats"] * heartbeat, 1.0)
    engagement = []
    for code, rate in ((3, 6.0), (4, 10.0), (5, 1.2), (6, 1.5), (7, 2.0)):
        counts = rng.poisson(propensity * rate)
        source = np.repeat(np.arange(view_count), counts)
        at = span_start[source] + rng.random(len(source)) * span[source]
        engagement.append((source, np.full(len(source), code), at))
    view_of = np.concatenate([view_of, *(part[0] for part in engagement)])
    kind = np.concatenate([kind, *(part[1] for part in engagement)])
    seconds = np.concatenate([seconds, *(part[2] for part in engagement)])

    # Strays: a tab woken hours after the end (kept, adds no watched time), and clocks
    # more than a day off (quarantined as implausible).
    total = len(view_of)
    strays = rng.choice(total, int(total * scenario.stray_share), replace=False)
    length = scenario.length_minutes * 60
    seconds[strays] = np.where(
        rng.random(len(strays)) < 0.5,
        length + rng.uniform(600, 20 * 3600, len(strays)),
        rng.uniform(-6 * 3600, -600, len(strays)),
    )
    far = rng.choice(total, int(total * scenario.implausible_share), replace=False)
    seconds[far] = length + rng.uniform(25 * 3600, 72 * 3600, len(far))

    microseconds = np.round(seconds * _US).astype(np.int64)
    event_number = np.arange(total)
    product = rng.integers(0, len(PRODUCTS), total)
    survey = rng.random(total) < 0.5
    question = rng.integers(0, len(SURVEY_QUESTIONS), total)
    answer_choice = rng.integers(0, len(SURVEY_ANSWERS), total)
    correct = rng.random(total) < 0.6

    # Delivery duplicates: identical copies, and a few copies with another payload.
    duplicated = rng.choice(total, int(total * scenario.duplicate_share), replace=False)
    conflicting = rng.choice(
        total, int(total * scenario.conflicting_duplicate_share), replace=False
    )
    rows = np.concatenate([np.arange(total), duplicated, conflicting])
    shift = np.concatenate(
        [np.zeros(total + len(duplicated), np.int64), np.full(len(conflicting), _US)]
    )
    order = rng.permutation(len(rows))
    rows, shift = rows[order], shift[order]

    events = _event_table(
        rows=rows,
        event_number=event_number,
        microseconds=microseconds + 0,
        shift=shift,
        kind=kind,
        member=member[view_of],
        device=device[view_of],
        product=product,
        survey=survey,
        question=question,
        answer_choice=answer_choice,
        correct=correct,
    )
    orders = _orders(rng, scenario, members, member, views)
    counts = {
        "events": events.num_rows,
        "heartbeats": int((kind == 1).sum()),
        "views": view_count,
        "members": members,
        "order_rows": orders.num_rows,
    }
    return events, orders, counts


_TYPES = np.array(
    [
        "view_start",
        "heartbeat",
        "view_end",
        "chat",
        "like",
        "product_click",
        "answer",
        "coupon_claim",
    ]
)


def _strings(indices: np.ndarray, values: np.ndarray) -> pa.Array:
    """Build a string column from small-dictionary indices without a Python loop per row."""
    dictionary = pa.DictionaryArray.from_arrays(
        pa.array(indices.astype(np.int32)), pa.array(values)
    )
    return dictionary.cast(pa.string())


def _numbered(prefix: str, numbers: np.ndarray) -> pa.Array:
    digits = pa.array(numbers).cast(pa.string())
    return pa.compute.binary_join_element_wise(pa.scalar(prefix), digits, "")


def _event_table(**columns: np.ndarray) -> pa.Table:
    import pyarrow.compute as pc

    rows = columns["rows"]
    kind = columns["kind"][rows]
    instants = STARTS_AT.value // 1000 + columns["microseconds"][rows] + columns["shift"]
    occurred = pa.array(instants, type=pa.timestamp("us", tz="UTC"))
    occurred_text = pc.strftime(occurred, format="%Y-%m-%dT%H:%M:%S", locale="C")
    fraction = pc.utf8_lpad(pa.array(instants % _US).cast(pa.string()), 6, "0")
    occurred_text = pc.binary_join_element_wise(
        pc.utf8_slice_codeunits(occurred_text, 0, 19), ".", fraction, "+00:00", ""
    )

    member = columns["member"][rows]
    member_text = pc.if_else(
        pa.array(member < 0), pa.scalar(""), _numbered("m", member.clip(min=0))
    )
    device_text = _numbered("d", columns["device"][rows])
    empty = pa.scalar("")
    is_click = pa.array(kind == 5)
    is_answer = pa.array(kind == 6)
    is_quiz = pa.array((kind == 6) & ~columns["survey"][rows])
    question = pc.if_else(
        is_quiz, pa.scalar(QUIZ_QUESTION), _strings(columns["question"][rows], SURVEY_QUESTIONS)
    )
    answer = pc.if_else(
        is_quiz,
        _strings(columns["answer_choice"][rows] % 3, np.array(["A", "B", "C"])),
        _strings(columns["answer_choice"][rows], SURVEY_ANSWERS),
    )
    correct = _strings(columns["correct"][rows].astype(np.int64), np.array(["false", "true"]))
    chat_text = _strings(
        columns["answer_choice"][rows], np.array(["かわいい", "price?", "買いました", "wow"])
    )
    return pa.table(
        {
            "event_id": _numbered("e", columns["event_number"][rows]),
            "broadcast_id": pa.array(np.full(len(rows), BROADCAST_ID)),
            "member_id": member_text,
            "device_id": device_text,
            "type": _strings(kind, _TYPES),
            "occurred_at": occurred_text,
            "product_id": pc.if_else(is_click, _strings(columns["product"][rows], PRODUCTS), empty),
            "question_id": pc.if_else(is_answer, question, empty),
            "answer": pc.if_else(is_answer, answer, empty),
            "is_correct": pc.if_else(is_quiz, correct, empty),
            "coupon_code": pc.if_else(pa.array(kind == 7), pa.scalar(COUPON_CODE), empty),
            "text": pc.if_else(pa.array(kind == 3), chat_text, empty),
        }
    )


def _orders(
    rng: np.random.Generator,
    scenario: Scenario,
    members: int,
    member_of_view: np.ndarray,
    views: dict[str, np.ndarray],
) -> pa.Table:
    """Draw orders of viewing members and of other members, with cancellations and refunds."""
    import pyarrow.compute as pc

    watchers = np.unique(member_of_view[member_of_view >= 0])
    buyers = watchers[rng.random(len(watchers)) < scenario.buyer_share]
    others = rng.integers(members, members * 2 + 1, max(1, len(buyers) // 2))
    buyer = np.concatenate([buyers, others])
    count = len(buyer)
    length = scenario.length_minutes * 60
    during = rng.random(count) < 0.6
    paid = np.where(
        during, rng.uniform(0, length, count), length + rng.exponential(2 * 86400, count)
    )
    ordered = paid - rng.uniform(0, 300, count)
    deferred = rng.random(count) < 0.1
    paid = np.where(deferred, paid + rng.uniform(0, 3 * 86400, count), paid)
    status = np.where(rng.random(count) < scenario.cancelled_share, 2, 1)
    status = np.where(rng.random(count) < 0.02, 0, status)
    lines = rng.integers(1, 4, count)
    order_of = np.repeat(np.arange(count), lines)
    line_no = np.arange(len(order_of)) - (np.cumsum(lines) - lines)[order_of] + 1
    product = rng.integers(0, len(PRODUCTS), len(order_of))
    quantity = rng.integers(1, 4, len(order_of))
    price = rng.integers(5, 200, len(order_of)) * 100

    # Credit notes: a later refund of one unit of one line of a paid order.
    refunded = np.flatnonzero(
        (status[order_of] == 1) & (rng.random(len(order_of)) < scenario.credit_note_share)
    )
    note_order = order_of[refunded]
    all_order = np.concatenate([order_of, note_order])
    all_line = np.concatenate([line_no, np.ones(len(refunded), np.int64)])
    all_product = np.concatenate([product, product[refunded]])
    all_quantity = np.concatenate([quantity, np.ones(len(refunded), np.int64)])
    all_price = np.concatenate([price, price[refunded]])
    all_status = np.concatenate([status[order_of], np.full(len(refunded), 3)])
    ids = np.concatenate([order_of, count + np.arange(len(refunded))])
    base = STARTS_AT.value // 1000
    paid_us = base + np.round(
        np.concatenate([paid[order_of], paid[note_order] + 86400]) * _US
    ).astype(np.int64)
    ordered_us = base + np.round(
        np.concatenate([ordered[order_of], paid[note_order] + 86400]) * _US
    ).astype(np.int64)

    def times(values: np.ndarray, present: np.ndarray) -> pa.Array:
        stamps = pa.array(values, type=pa.timestamp("us", tz="UTC"))
        text = pc.strftime(stamps, format="%Y-%m-%dT%H:%M:%S", locale="C")
        text = pc.binary_join_element_wise(pc.utf8_slice_codeunits(text, 0, 19), "+00:00", "")
        return pc.if_else(pa.array(present), text, pa.scalar(""))

    pending = all_status == 0
    return pa.table(
        {
            "order_id": _numbered("o", ids),
            "line_no": pa.array(all_line).cast(pa.string()),
            "member_id": _numbered("m", buyer[all_order]),
            "ordered_at": times(ordered_us, np.ones(len(ids), bool)),
            "paid_at": times(paid_us, ~pending),
            "status": _strings(all_status, np.array(["pending", "paid", "cancelled", "refunded"])),
            "product_id": _strings(all_product, PRODUCTS),
            "quantity": pa.array(all_quantity).cast(pa.string()),
            "unit_price": pa.array(all_price).cast(pa.string()),
            "refund_of": pc.if_else(
                pa.array(all_status == 3), _numbered("o", all_order), pa.scalar("")
            ),
        }
    )


def write_inputs(scenario: Scenario, folder: Path) -> dict[str, int]:
    """Write the events (one Parquet file for the broadcast's partition) and the orders."""
    events, orders, counts = generate(scenario)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(events, folder / f"events-{BROADCAST_ID}.parquet")
    pq.write_table(orders, folder / "orders.parquet")
    return counts
