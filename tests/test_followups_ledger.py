"""The send ledger's batch operations, on SQLite and on the real PostgreSQL server."""

import datetime as dt

import pandas as pd
import pytest

from livecrm_dagster.defs.followups import ledger as ledger_module
from livecrm_dagster.defs.followups import sql_lists
from livecrm_dagster.defs.followups.ledger import SendLedger, ledger_key
from livecrm_dagster.warehouse import Warehouse
from tests.test_followups_support import tokyo

NOW = tokyo("2024-06-10 20:00")
LEASE = dt.timedelta(minutes=10)
DAY = "2024-06-10"


@pytest.fixture
def ledger(warehouse_url):
    store = SendLedger(Warehouse(warehouse_url).engine)
    yield store
    store.engine.dispose()


def planned_rows(step: str, members: list[str], due_at: dt.datetime | None = NOW) -> list[dict]:
    return [
        {
            "idempotency_key": ledger_key("b1", step, m, "outbox"),
            "broadcast_id": "b1",
            "step_id": step,
            "member_id": m,
            "channel": "outbox",
            "segment": "hot",
            "due_at": due_at,
        }
        for m in members
    ]


def keys(step: str, members: list[str]) -> list[str]:
    return [ledger_key("b1", step, m, "outbox") for m in members]


def rows_by_member(ledger: SendLedger, step: str) -> pd.DataFrame:
    rows = ledger.step_rows("b1", step)
    return rows.set_index("member_id").sort_index()


def take_slots(ledger: SendLedger, holders: dict[str, tuple[str | None, str | None]]) -> None:
    """Claim a row of step s0 for each member, with the given (offer key, cap slot)."""
    ledger.insert_planned(planned_rows("s0", list(holders)), NOW)
    for member_id, (offer_key, cap_slot) in holders.items():
        claim = ledger.claim(keys("s0", [member_id])[0], "run-0", NOW, LEASE, offer_key, [cap_slot])
        assert claim.outcome == "claimed"


# CLAIM_BATCH 2 puts the six rows into three transactions, and a conflict into a group of 2.
@pytest.mark.parametrize("claim_batch", [2, ledger_module.CLAIM_BATCH])
def test_claim_many_around_offer_conflicts(ledger, monkeypatch, claim_batch):
    monkeypatch.setattr(ledger_module, "CLAIM_BATCH", claim_batch)
    members = [f"m{n}" for n in range(6)]
    take_slots(ledger, {"m2": ("b1:coupon", f"{DAY}#1"), "m4": ("b1:coupon", None)})
    ledger.insert_planned(planned_rows("s1", members), NOW)

    claims = ledger.claim_many(keys("s1", members), "run-1", NOW, LEASE, "b1:coupon", [f"{DAY}#1"])

    outcomes = [claims[key].outcome for key in keys("s1", members)]
    assert outcomes == [
        "claimed",
        "claimed",
        "duplicate_offer",
        "claimed",
        "duplicate_offer",
        "claimed",
    ]
    rows = rows_by_member(ledger, "s1")
    sending = ["sending", "sending", "planned", "sending", "planned", "sending"]
    assert list(rows["status"]) == sending
    claimed = rows.loc[rows["status"] == "sending"]
    assert set(claimed["cap_slot"]) == {f"{DAY}#1"}
    assert set(claimed["offer_key"]) == {"b1:coupon"}
    assert set(claimed["run_id"]) == {"run-1"}
    assert set(claimed["attempts"]) == {1}


@pytest.mark.parametrize("claim_batch", [2, ledger_module.CLAIM_BATCH])
def test_claim_many_around_cap_conflicts(ledger, monkeypatch, claim_batch):
    monkeypatch.setattr(ledger_module, "CLAIM_BATCH", claim_batch)
    members = [f"m{n}" for n in range(6)]
    take_slots(ledger, {"m1": (None, f"{DAY}#1"), "m4": (None, f"{DAY}#1")})
    ledger.insert_planned(planned_rows("s1", members), NOW)

    claims = ledger.claim_many(keys("s1", members), "run-1", NOW, LEASE, None, [f"{DAY}#1"])

    outcomes = [claims[key].outcome for key in keys("s1", members)]
    assert outcomes == [
        "claimed",
        "frequency_cap",
        "claimed",
        "claimed",
        "frequency_cap",
        "claimed",
    ]
    rows = rows_by_member(ledger, "s1")
    assert list(rows["cap_slot"].fillna("")) == [
        f"{DAY}#1",
        "",
        f"{DAY}#1",
        f"{DAY}#1",
        "",
        f"{DAY}#1",
    ]


def test_cap_conflict_beside_another_members_offer(ledger):
    take_slots(ledger, {"m0": ("b1:coupon", None), "m1": (None, f"{DAY}#1")})
    ledger.insert_planned(planned_rows("s1", ["m1"]), NOW)

    (key,) = keys("s1", ["m1"])
    claim = ledger.claim(key, "run-1", NOW, LEASE, "b1:coupon", [f"{DAY}#1"])

    assert claim.outcome == "frequency_cap"


def test_claim_many_takes_the_next_cap_slot(ledger):
    members = ["m0", "m1", "m2"]
    take_slots(ledger, {"m1": (None, f"{DAY}#1")})
    ledger.insert_planned(planned_rows("s1", members), NOW)
    slots = [f"{DAY}#1", f"{DAY}#2"]

    claims = ledger.claim_many(keys("s1", members), "run-1", NOW, LEASE, None, slots)

    assert {claim.outcome for claim in claims.values()} == {"claimed"}
    rows = rows_by_member(ledger, "s1")
    assert list(rows["cap_slot"]) == [f"{DAY}#1", f"{DAY}#2", f"{DAY}#1"]


def test_claim_many_takes_expired_leases_only(ledger):
    members = ["m0", "m1", "m2", "m3"]
    ledger.insert_planned(planned_rows("s1", members), NOW)
    first = ledger.claim_many(keys("s1", members[:3]), "run-1", NOW, LEASE, None, [None])
    assert {claim.outcome for claim in first.values()} == {"claimed"}
    ledger.set_batches([(keys("s1", members[:3]), "batch-1")], "run-1")
    ledger.mark_sent(keys("s1", ["m0"]), "run-1", NOW, "req-1")

    # Within the lease the rows in flight stay with run-1.
    soon = ledger.claim_many(keys("s1", members), "run-2", NOW + LEASE / 2, LEASE, None, [None])
    assert [soon[k].outcome for k in keys("s1", members)] == [
        "in_flight_or_sent",
        "in_flight_or_sent",
        "in_flight_or_sent",
        "claimed",
    ]
    later = NOW + 2 * LEASE
    taken = ledger.claim_many(keys("s1", members[:3]), "run-3", later, LEASE, None, [None])
    key_m0, key_m1, key_m2 = keys("s1", members[:3])
    assert taken[key_m0].outcome == "in_flight_or_sent"
    # A row taken over returns the batch key its first run recorded.
    assert (taken[key_m1].outcome, taken[key_m1].batch_key) == ("claimed", "batch-1")
    assert (taken[key_m2].outcome, taken[key_m2].batch_key) == ("claimed", "batch-1")
    assert list(rows_by_member(ledger, "s1")["attempts"]) == [1, 2, 2, 1]


def test_insert_planned_leaves_existing_rows(ledger):
    members = ["m0", "m1"]
    ledger.insert_planned(planned_rows("s1", members, due_at=None), NOW)
    ledger.claim(keys("s1", ["m0"])[0], "run-1", NOW, LEASE, None, [None])

    later = NOW + dt.timedelta(hours=1)
    ledger.insert_planned(planned_rows("s1", [*members, "m2"], due_at=later), later)

    rows = rows_by_member(ledger, "s1")
    assert list(rows["status"]) == ["sending", "planned", "planned"]
    assert list(rows["planned_at"]) == [NOW, NOW, later]
    assert pd.isna(rows.at["m1", "due_at"])
    assert rows.at["m2", "due_at"] == later
    assert str(rows.at["m2", "due_at"].tzinfo) == "UTC"
    assert list(rows["segment"]) == ["hot", "hot", "hot"]


def test_insert_planned_accepts_a_frame(ledger):
    frame = pd.DataFrame(planned_rows("s1", ["m0", "m1"])).drop(columns="due_at")
    ledger.insert_planned(frame, NOW)
    ledger.insert_planned(frame.iloc[0:0], NOW)
    rows = rows_by_member(ledger, "s1")
    assert list(rows.index) == ["m0", "m1"]
    assert rows["due_at"].isna().all()


def test_record_outcomes_skips_rows_in_flight(ledger):
    members = ["m0", "m1", "m2", "m3", "m4"]
    ledger.insert_planned(planned_rows("s1", members), NOW)
    ledger.record_outcomes(
        pd.DataFrame(
            {
                "idempotency_key": keys("s1", ["m1", "m2"]),
                "status": ["skipped", "holdout"],
                "reason": ["no_consent", None],
            }
        ),
        "run-0",
        NOW,
    )
    ledger.claim(keys("s1", ["m3"])[0], "run-1", NOW, LEASE, None, [None])
    ledger.claim(keys("s1", ["m4"])[0], "run-1", NOW, LEASE, None, [None])
    ledger.mark_failed(keys("s1", ["m4"]), "run-1", NOW, "timed out")

    later = NOW + dt.timedelta(hours=1)
    changed = ledger.record_outcomes(
        pd.DataFrame(
            {
                "idempotency_key": keys("s1", members),
                "status": ["skipped", "skipped", "holdout", "skipped", "skipped"],
                "reason": ["unsubscribed", "no_consent", None, "no_address", "no_address"],
            }
        ),
        "run-2",
        later,
    )

    # m0 is new and m4's failed send is re-checked. m1 and m2 keep their outcome, and m3 is
    # in flight.
    assert changed == 2
    rows = rows_by_member(ledger, "s1")
    assert list(rows["status"]) == ["skipped", "skipped", "holdout", "sending", "skipped"]
    assert list(rows["reason"].fillna("")) == [
        "unsubscribed",
        "no_consent",
        "",
        "",
        "no_address",
    ]
    assert list(rows["updated_at"]) == [later, NOW, NOW, NOW, later]
    assert rows.at["m4", "error"] is None


def test_record_outcome_returns_change(ledger):
    (key,) = keys("s1", ["m0"])
    ledger.insert_planned(planned_rows("s1", ["m0"]), NOW)
    assert ledger.record_outcome(key, "skipped", "no_consent", "run-1", NOW)
    assert not ledger.record_outcome(key, "skipped", "no_consent", "run-1", NOW)


def test_set_batches_touches_own_rows_only(ledger):
    members = ["m0", "m1", "m2"]
    ledger.insert_planned(planned_rows("s1", members), NOW)
    ledger.claim_many(keys("s1", ["m0", "m1"]), "run-1", NOW, LEASE, None, [None])
    ledger.claim_many(keys("s1", ["m2"]), "run-2", NOW, LEASE, None, [None])

    ledger.set_batches(
        [(keys("s1", ["m0"]), "batch-a"), (keys("s1", members[1:]), "batch-b")], "run-1"
    )

    assert list(rows_by_member(ledger, "s1")["batch_key"].fillna("")) == ["batch-a", "batch-b", ""]


def test_member_rows_reads_long_lists(ledger, monkeypatch):
    # On SQLite five members make three IN lists; PostgreSQL sends one array.
    monkeypatch.setattr(sql_lists, "SQLITE_IN_CHUNK", 2)
    members = [f"m{n}" for n in range(5)]
    ledger.insert_planned(planned_rows("s1", members), NOW)
    ledger.claim_many(keys("s1", members[1:]), "run-1", NOW, LEASE, None, [None])

    rows = ledger.member_rows([*members, "m9"], ["sending"])

    assert sorted(rows["member_id"]) == members[1:]
    assert ledger.member_rows([], ["sending"]).empty


def test_marks_cover_long_key_lists(ledger, monkeypatch):
    monkeypatch.setattr(sql_lists, "SQLITE_IN_CHUNK", 2)
    members = [f"m{n}" for n in range(5)]
    ledger.insert_planned(planned_rows("s1", members), NOW)
    ledger.claim_many(keys("s1", members), "run-1", NOW, LEASE, None, [None])

    ledger.mark_sent(keys("s1", members[:4]), "run-1", NOW, "req-1")
    ledger.mark_failed(keys("s1", members), "run-1", NOW, "x" * 3000)

    rows = rows_by_member(ledger, "s1")
    assert list(rows["status"]) == ["sent"] * 4 + ["failed"]
    assert set(rows["request_id"].iloc[:4]) == {"req-1"}
    assert len(rows.at["m4", "error"]) == 2000
