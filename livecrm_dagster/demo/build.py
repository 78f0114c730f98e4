"""Write the demo source folder: the real UCI order log plus simulated broadcasts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from livecrm_dagster.demo.simulator import plan_broadcasts, simulate_viewer_events
from livecrm_dagster.demo.uci_online_retail import (
    read_invoice_lines,
    to_contract_members,
    to_contract_orders,
    to_contract_products,
)

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = (
    Path(__file__).resolve().parents[2]
    / "data"
    / "uci-online-retail"
    / "online_retail_2010-12-01_2011-12-09.csv.gz"
)


def build_demo_source(
    out_dir: str | Path,
    broadcasts: int = 8,
    seed: int = 20111209,
    *,
    source: str | Path = DEFAULT_SOURCE,
) -> dict[str, int]:
    """Write the five demo inputs under ``out_dir`` and return their row counts.

    The same source file, broadcast count and seed give byte-identical files. Existing
    files of an earlier build are overwritten, and ``viewer_events/<id>/*.jsonl`` files of
    broadcasts that this build does not plan are deleted, so that the folder only ever
    contains one build.
    """
    out = Path(out_dir)
    logger.info("building demo source in %s from %s", out, source)
    lines = read_invoice_lines(source)
    orders = to_contract_orders(lines)
    members = to_contract_members(lines, seed)
    products = to_contract_products(lines, seed)
    plan = plan_broadcasts(orders, broadcasts, seed)

    event_counts = {}
    for broadcast in plan.to_dict("records"):
        events = simulate_viewer_events(broadcast, orders, members, products, seed)
        # One sub-folder per broadcast, so a partition reads its own events only.
        path = out / "viewer_events" / broadcast["broadcast_id"] / "events.jsonl"
        write_jsonl(events, path)
        event_counts[broadcast["broadcast_id"]] = len(events)
    _remove_stale_event_files(out / "viewer_events", set(event_counts))

    write_csv(_joined_featured_ids(plan), out / "broadcasts" / "broadcasts.csv")
    write_csv(orders, out / "orders" / "uci_orders.csv")
    write_csv(members, out / "members" / "members.csv")
    write_csv(products, out / "products" / "products.csv")

    summary = {
        "broadcasts": len(plan),
        "viewer_events": sum(event_counts.values()),
        "order_lines": len(orders),
        "members": len(members),
        "products": len(products),
    }
    logger.info("built demo source: %s", summary)
    return summary


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a frame as UTF-8 CSV with booleans as ``true`` and ``false``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = frame.copy()
    for column in text.columns:
        if pd.api.types.is_bool_dtype(text[column]):
            text[column] = text[column].map({True: "true", False: "false"})
    text.to_csv(path, index=False, lineterminator="\n", encoding="utf-8")


def write_jsonl(frame: pd.DataFrame, path: Path) -> None:
    """Write a frame as JSON Lines, one object per row with the columns in frame order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for record in frame.to_dict("records"):
            handle.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
            handle.write("\n")


def _joined_featured_ids(plan: pd.DataFrame) -> pd.DataFrame:
    return plan.assign(featured_product_ids=plan["featured_product_ids"].map(";".join))


def _remove_stale_event_files(folder: Path, current_ids: set[str]) -> None:
    for path in sorted(folder.glob("*/*.jsonl")):
        if path.parent.name not in current_ids:
            logger.info("removing viewer events of an earlier build: %s", path)
            path.unlink()
