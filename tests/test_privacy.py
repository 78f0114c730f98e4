"""No e-mail address, LINE user ID or token reaches Dagster's logs, metadata or run tags."""

from __future__ import annotations

import dagster as dg

from livecrm_dagster.defs.followups.replay import replay_followups
from livecrm_dagster.pipeline import pipeline_resources, run_main_job
from tests.test_main_job import B1, B2, two_broadcasts  # noqa: F401 - fixture reused

TOKEN = "line-token-that-must-stay-secret-7f3a"
WEBHOOK_SECRET = "webhook-secret-that-must-stay-secret-91c2"


def _personal_values() -> list[str]:
    # The fixture's members m001 to m006 and their messaging IDs.
    emails = [f"m00{n}@example.invalid" for n in range(1, 7)]
    line_ids = [f"U{n:032x}" for n in range(1, 7)]
    return [*emails, *line_ids, TOKEN, WEBHOOK_SECRET]


def test_full_run_leaks_no_personal_data(two_broadcasts, tmp_path, monkeypatch, capfd):  # noqa: F811
    """Run the main job and every follow-up step with secrets set, then scan every output."""
    warehouse_url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("LIVECRM_WAREHOUSE_URL", warehouse_url)
    monkeypatch.setenv("LIVECRM_SOURCE_DIR", str(two_broadcasts.root))
    monkeypatch.setenv("LIVECRM_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("LIVECRM_LINE_TOKEN", TOKEN)
    monkeypatch.setenv("LIVECRM_WEBHOOK_SECRET", WEBHOOK_SECRET)
    from livecrm_dagster.definitions import defs

    with dg.instance_for_test(temp_dir=str(home)) as instance:
        run_main_job(instance, pipeline_resources(warehouse_url, str(two_broadcasts.root)))
        sends = replay_followups(instance, defs, [B1, B2])
        records = instance.get_event_records(
            dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        )
        runs = instance.get_runs()
        logs = [entry for run in runs for entry in instance.all_logs(run.run_id)]
    captured = capfd.readouterr()
    places = {
        "metadata": [str(record.asset_materialization.metadata) for record in records],
        "run tags": [str(run.tags) for run in runs],
        "log messages": [entry.user_message or "" for entry in logs],
        "errors": [
            str(entry.dagster_event.event_specific_data)
            for entry in logs
            if entry.dagster_event is not None and entry.dagster_event.is_failure
        ],
        "console": [captured.out, captured.err],
    }
    # Event logs, run storage and captured compute logs of every run, as raw bytes.
    blobs = [path.read_bytes() for path in home.rglob("*") if path.is_file()]

    # The scan means something only if messages went out and the scanned places hold
    # the run's data: the broadcast ID, which is not personal, must be found in them.
    assert int(sends["sent"].sum()) > 0
    assert B1 in "\n".join(places["run tags"])
    assert B1 in "\n".join(places["log messages"])
    assert any(B1.encode() in blob for blob in blobs)
    for place, texts in places.items():
        text = "\n".join(texts)
        assert [value for value in _personal_values() if value in text] == [], place
    in_files = [
        value for value in _personal_values() if any(value.encode() in blob for blob in blobs)
    ]
    assert in_files == []
