"""The event file's layout worked out in chunks: member blocks and the event ID check.

The chunk and bucket sizes are made small here, so that a few thousand events cross many
chunks, blocks and buckets. The result must not depend on where the chunks fall.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from livecrm_dagster import event_files, event_layout
from livecrm_dagster.event_files import EventFiles


def _events(seed: int, size: int = 3_000) -> pd.DataFrame:
    """Time-ordered events of 40 members (some with many events) and anonymous viewers."""
    rng = np.random.default_rng(seed)
    members = [f"m{number:02d}" for number in range(40)] + ["ｍ全角", "", None]
    weights = np.linspace(1, 6, len(members))
    frame = pd.DataFrame(
        {
            "event_id": [f"{seed}-{number}" for number in rng.permutation(size)],
            "member_id": rng.choice(
                np.array(members, dtype=object), size, p=weights / weights.sum()
            ),
            "device_id": rng.choice(["", "d1", "d2"], size),
            "type": "heartbeat",
            "occurred_at": pd.Timestamp("2024-06-10T11:00:00Z")
            + pd.to_timedelta(np.sort(rng.integers(0, 3_600, size)), unit="s"),
        }
    )
    return frame


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(event_layout, "CHUNK", 257)
    monkeypatch.setattr(event_layout, "ID_BUCKET", 50)
    monkeypatch.setattr(event_files, "_ROW_GROUP", 300)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_blocks_hold_each_member_once_in_time_order(small_chunks, tmp_path, seed):
    events = _events(seed)
    files = EventFiles(tmp_path)
    files.replace("b1", events)

    blocks = list(files.blocks("b1", columns=["event_id", "member_id", "occurred_at"]))

    members = [block["member_id"].fillna("") for block in blocks]
    named = [sorted(set(block) - {""}) for block in members]
    flat = [member for block in named for member in block]
    # Every member is in exactly one block, and the blocks follow member ID order.
    assert flat == sorted(set(events["member_id"].dropna()) - {""})
    # Events without a member come after the members' blocks, in blocks of their own.
    anonymous = [index for index, block in enumerate(members) if (block == "").all()]
    assert anonymous == list(range(len(blocks) - len(anonymous), len(blocks)))
    assert all(block["occurred_at"].is_monotonic_increasing for block in blocks)
    # A block starts below the block size and passes it by at most its last member.
    for block in members[: len(members) - len(anonymous)]:
        assert len(block) - (block == block.max()).sum() < 300
    assert all(len(block) <= 300 for block in members[len(members) - len(anonymous) :])
    # Together the blocks are the events, and a whole read gives them back in time order.
    stored = pd.concat(blocks)
    assert sorted(stored["event_id"]) == sorted(events["event_id"])
    pd.testing.assert_frame_equal(
        files.read("b1", columns=["event_id", "occurred_at"]),
        events[["event_id", "occurred_at"]].astype(
            {"event_id": object, "occurred_at": "datetime64[us, UTC]"}
        ),
    )


def test_blocks_do_not_depend_on_the_chunk_size(tmp_path, monkeypatch):
    events = _events(4)
    monkeypatch.setattr(event_files, "_ROW_GROUP", 300)
    layouts = []
    for chunk in (97, 1_000, 10_000):
        monkeypatch.setattr(event_layout, "CHUNK", chunk)
        files = EventFiles(tmp_path / str(chunk))
        files.replace("b1", events)
        blocks = files.blocks("b1", columns=["event_id"])
        layouts.append([block["event_id"].tolist() for block in blocks])

    assert layouts[0] == layouts[1] == layouts[2]


@pytest.mark.parametrize("where", [0, 1, 1_499, 2_998])
def test_repeated_id_found_in_any_chunk_and_bucket(small_chunks, where):
    ids = pa.array([f"event-{number}" for number in range(2_999)] + [f"event-{where}"])

    with pytest.raises(ValueError, match=f"event_id 'event-{where}' appears 2 times"):
        event_layout.check_event_ids(ids)


def test_error_counts_repeated_id_copies(small_chunks):
    ids = pa.array([f"e{number}" for number in range(300)] + ["e42", "e42"])

    with pytest.raises(ValueError, match="'e42' appears 3 times"):
        event_layout.check_event_ids(ids)


def test_ids_that_differ_only_early_are_told_apart(small_chunks):
    # Bucketing looks at each ID's length and last eight bytes, so these all share a
    # bucket. The check inside the bucket must still compare whole IDs.
    ids = [f"{number:05d}-same-tail" for number in range(500)]
    event_layout.check_event_ids(pa.array(ids))

    with pytest.raises(ValueError, match="'00007-same-tail' appears 2 times"):
        event_layout.check_event_ids(pa.array([*ids, "00007-same-tail"]))


def test_short_and_multibyte_ids_checked(small_chunks):
    ids = ["a", "b", "ab", "é", "e", "全", "全角", "x" * 9, "x" * 10]
    event_layout.check_event_ids(pa.array(ids))

    sliced = pa.array(["pad", *ids, "全角"]).slice(1)
    with pytest.raises(ValueError, match="'全角' appears 2 times"):
        event_layout.check_event_ids(sliced)


def test_ids_across_arrow_chunks(small_chunks):
    ids = pa.chunked_array([[f"e{number}" for number in range(150)], ["e151", "e7", "e200"]])

    with pytest.raises(ValueError, match="'e7' appears 2 times"):
        event_layout.check_event_ids(ids)


def test_bad_value_in_later_chunk_named(small_chunks, tmp_path):
    files = EventFiles(tmp_path)
    files.replace("b1", _events(5))
    events = _events(6).astype({"device_id": object})
    events.loc[2_000, "device_id"] = 7

    with pytest.raises(ValueError, match="column 'device_id' cannot be stored as string"):
        files.replace("b1", events)

    assert files.read("b1", columns=["event_id"])["event_id"].str.startswith("5-").all()


@pytest.mark.parametrize("member", ["", None])
def test_partition_without_members_is_stored(tmp_path, member):
    # A broadcast watched only by anonymous viewers has no member blocks at all.
    events = _events(7, size=50).assign(member_id=member)
    files = EventFiles(tmp_path)

    files.replace("b1", events)

    blocks = list(files.blocks("b1", columns=["event_id"]))
    assert [len(block) for block in blocks] == [50]
    assert (
        files.read("b1", columns=["event_id"])["event_id"].tolist() == events["event_id"].tolist()
    )


def test_blocks_keep_reading_the_file_they_opened(small_chunks, tmp_path):
    # A rebuild renames a new file over the old one. A reader in the middle of the old
    # file must go on reading the old rows, not a mix of both.
    files = EventFiles(tmp_path)
    old = _events(8)
    files.replace("b1", old)
    reading = files.blocks("b1", columns=["event_id"])
    first = next(reading)

    files.replace("b1", _events(9))
    rest = list(reading)

    stored = pd.concat([first, *rest])["event_id"]
    assert sorted(stored) == sorted(old["event_id"])
    assert files.read("b1", columns=["event_id"])["event_id"].str.startswith("9-").all()
