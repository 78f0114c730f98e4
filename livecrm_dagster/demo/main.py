"""`livecrm-demo`: build the demo inputs, run the main job, print reports, replay follow-ups.

The orders are the real UCI online-retail log bundled in data/uci-online-retail; the
viewing side is simulated (see docs/demo-data.md). Everything runs in this process on
the embedded default: a SQLite warehouse and the local Dagster instance of dagster.yaml,
so `dagster dev` afterwards shows the same runs and materializations. The follow-up
steps then run on a simulated clock through the same sensor and asset as in production,
writing the file outbox. The send ledger keeps a second run from sending anything again.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import yaml

from livecrm_dagster.definitions import defs
from livecrm_dagster.defs.followups.replay import replay_followups
from livecrm_dagster.defs.followups.scenarios import scenarios_path
from livecrm_dagster.defs.reporting.summary import report_line
from livecrm_dagster.demo.build import build_demo_source
from livecrm_dagster.demo.simulator import SURVEY_ANSWERS
from livecrm_dagster.pipeline import pipeline_resources, run_main_job
from livecrm_dagster.settings import load_settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEMO_SETTINGS = PROJECT_ROOT / "livecrm_dagster" / "settings" / "uci-demo.yaml"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="livecrm-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--broadcasts", type=int, default=8, help="number of simulated broadcasts")
    parser.add_argument("--seed", type=int, default=20111209, help="seed of the simulator")
    parser.add_argument(
        "--source-dir",
        default=str(PROJECT_ROOT / ".livecrm" / "demo" / "source"),
        help="folder the demo inputs are written to",
    )
    parser.add_argument(
        "--outbox-dir",
        default=str(PROJECT_ROOT / ".livecrm" / "demo" / "outbox"),
        help="folder the follow-up outbox files are written to",
    )
    parser.add_argument(
        "--warehouse-url",
        default=os.environ.get("LIVECRM_WAREHOUSE_URL", "sqlite:///.livecrm/warehouse.db"),
        help="SQLAlchemy URL of the warehouse (default: $LIVECRM_WAREHOUSE_URL or SQLite)",
    )
    return parser.parse_args(argv)


def _instance() -> dg.DagsterInstance:
    """Use $DAGSTER_HOME when set, else the project's dagster.yaml (what `dagster dev` uses)."""
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    return dg.DagsterInstance.from_config(str(PROJECT_ROOT))


def _demo_scenarios(folder: Path) -> Path:
    """Write the default scenarios with a survey map that fits the demo shop's answers.

    The bundled map is written for a cosmetics shop (dry skin -> moisturiser). The
    simulated viewers answer what they are shopping for, and each answer names one of
    the demo products' categories, so the demo maps every answer to itself.
    """
    raw = yaml.safe_load(scenarios_path(None).read_text(encoding="utf-8"))
    for scenario in raw["scenarios"].values():
        for step in scenario["steps"]:
            if "survey_categories" in step:
                step["survey_categories"] = {answer: answer for answer in SURVEY_ANSWERS}
    path = folder / "scenarios.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _print_reports(kpis, resources, settings) -> None:
    schedule = resources["warehouse"].get().read("broadcasts").set_index("broadcast_id")
    print(f"\nKPI report per broadcast ({settings.shop_name}, {settings.currency}):")
    for row in kpis.to_dict("records"):
        starts = schedule.loc[row["broadcast_id"], "starts_at"].tz_convert(settings.zone)
        print(
            f"- {row['broadcast_id']} ({starts:%Y-%m-%d %H:%M %Z}): "
            f"{report_line(row, settings.currency)}"
        )


def _print_followups(sends: pd.DataFrame, outbox_dir: str) -> None:
    """Print per step, over all broadcasts, how many were sent, held out and skipped why."""
    print("\nFollow-up steps replayed on a simulated clock (all broadcasts):")
    if sends.empty:
        print("- no step fell due")
        return
    reasons = [column for column in sends.columns if column.startswith("skipped_")]
    totals = sends.groupby("step_id", sort=False)[["sent", "failed", "holdout", *reasons]].sum()
    for step_id, row in totals.iterrows():
        skipped = ", ".join(
            f"{int(row[column])} {column.removeprefix('skipped_')}"
            for column in reasons
            if row[column]
        )
        print(
            f"- {step_id}: sent {int(row['sent'])}, failed {int(row['failed'])}, "
            f"holdout {int(row['holdout'])}, skipped {skipped or 'none'}"
        )
    print(f"outbox files: {outbox_dir}")


def main(argv: list[str] | None = None) -> None:
    arguments = _arguments(argv)
    logging.basicConfig(level=logging.WARNING)
    os.chdir(PROJECT_ROOT)
    settings = load_settings(DEMO_SETTINGS)

    started = time.monotonic()
    counts = build_demo_source(arguments.source_dir, arguments.broadcasts, arguments.seed)
    print(
        f"demo inputs: {counts['broadcasts']} broadcasts, {counts['viewer_events']:,} simulated "
        f"viewer events, {counts['order_lines']:,} real order lines, {counts['members']:,} "
        f"members, {counts['products']:,} products ({time.monotonic() - started:.0f} s)"
    )

    # The follow-up replay loads the code location's resources, which read these.
    os.environ["LIVECRM_WAREHOUSE_URL"] = arguments.warehouse_url
    os.environ["LIVECRM_SETTINGS"] = str(DEMO_SETTINGS)
    os.environ["LIVECRM_SOURCE_DIR"] = arguments.source_dir
    os.environ["LIVECRM_OUTBOX_DIR"] = arguments.outbox_dir
    os.environ["LIVECRM_SCENARIOS"] = str(_demo_scenarios(Path(arguments.source_dir).parent))
    resources = pipeline_resources(
        arguments.warehouse_url, arguments.source_dir, str(DEMO_SETTINGS)
    )
    with _instance() as instance:
        kpis = run_main_job(instance, resources)
        _print_reports(kpis, resources, settings)
        print(f"main job finished in {time.monotonic() - started:.0f} s")
        replay_started = time.monotonic()
        sends = replay_followups(instance, defs, kpis["broadcast_id"].tolist())
    _print_followups(sends, arguments.outbox_dir)
    print(f"follow-up replay finished in {time.monotonic() - replay_started:.0f} s")
    print("open the UI with `dagster dev` (see README)")


if __name__ == "__main__":
    main()
