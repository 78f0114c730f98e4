"""Data-quality checks: shown next to each asset in the UI and kept in the warehouse.

The warehouse copy (table `quality_checks`) lets the follow-up steps refuse to send for
a broadcast whose inputs failed a check, without asking Dagster's event log.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import dagster as dg
import pandas as pd

from livecrm_dagster.defs.partitions import broadcast_partitions
from livecrm_dagster.warehouse import Warehouse


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    description: str
    metadata: dict[str, float | int | str] = field(default_factory=dict)


def check_spec(asset: str, name: str, description: str) -> dg.AssetCheckSpec:
    """Describe a check evaluated per broadcast, so each partition shows its own result."""
    # Partitioned checks are a preview feature in Dagster 1.13; without a partitions
    # definition the results are stored without their broadcast. The preview warning is
    # silenced here only, since operators cannot act on it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(
            name=name, asset=asset, description=description, partitions_def=broadcast_partitions
        )


def record_checks(
    store: Warehouse, broadcast_id: str, asset: str, outcomes: list[CheckOutcome]
) -> list[dg.AssetCheckResult]:
    """Store the outcomes of one asset's checks for a broadcast and return them for Dagster."""
    rows = pd.DataFrame(
        [
            {
                "broadcast_id": broadcast_id,
                "asset": asset,
                "check_name": outcome.name,
                "passed": outcome.passed,
                "description": outcome.description,
            }
            for outcome in outcomes
        ]
    )
    store.replace_rows("quality_checks", {"broadcast_id": broadcast_id, "asset": asset}, rows)
    return [
        dg.AssetCheckResult(
            check_name=outcome.name,
            passed=outcome.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=outcome.description,
            metadata=outcome.metadata,
        )
        for outcome in outcomes
    ]


def failed_checks(store: Warehouse, broadcast_id: str) -> list[str]:
    """Return 'asset:check' keys of the broadcast's checks that failed at their last run."""
    rows = store.read("quality_checks", broadcast_id=broadcast_id)
    failed = rows.loc[~rows["passed"].astype(bool)]
    return sorted(failed["asset"] + ":" + failed["check_name"])
