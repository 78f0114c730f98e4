"""The main command on the bundled real order log, end to end, on a fresh SQLite warehouse."""

from __future__ import annotations

import re

from livecrm_dagster.demo.main import main

REPORT_LINE = re.compile(
    r"^- (b-\d{4}-\d{2}-\d{2}-lunch) \(\d{4}-\d{2}-\d{2} 12:00 (GMT|BST)\): "
    r"(\d[\d,]*) members watched, (\d[\d,]*) bought during the live \(CVR \d+\.\d%\), "
    r"revenue £[\d,]+\.\d\d, (\d[\d,]*) to follow up$"
)


def test_main_command_prints_reports(tmp_path, monkeypatch, capsys):
    # main() moves to the project folder; monkeypatch restores the working folder after.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    # main() points the code location's variables at the demo; registering them here
    # lets monkeypatch restore them, so later tests do not run with the demo's settings.
    for name in (
        "LIVECRM_WAREHOUSE_URL",
        "LIVECRM_SETTINGS",
        "LIVECRM_SOURCE_DIR",
        "LIVECRM_OUTBOX_DIR",
        "LIVECRM_SCENARIOS",
    ):
        monkeypatch.setenv(name, "")
    (tmp_path / "dagster_home").mkdir()
    warehouse = tmp_path / "warehouse.db"

    main(
        [
            "--broadcasts",
            "2",
            "--source-dir",
            str(tmp_path / "source"),
            "--warehouse-url",
            f"sqlite:///{warehouse}",
        ]
    )

    lines = capsys.readouterr().out.splitlines()
    reports = [REPORT_LINE.match(line) for line in lines if line.startswith("- b-")]
    assert len(reports) == 2
    assert all(reports)
    for report in reports:
        watched, bought, follow_up = (int(report[n].replace(",", "")) for n in (3, 4, 5))
        assert watched > 0
        assert watched == bought + follow_up
