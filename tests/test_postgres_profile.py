"""The production profile: Dagster's own storage in PostgreSQL, the warehouse too."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import sqlalchemy as sa

from livecrm_dagster.pipeline import pipeline_resources, run_main_job
from tests.test_main_job import B1, B2, two_broadcasts  # noqa: F401 - fixture reused

PROFILE = Path(__file__).resolve().parents[1] / "deploy" / "dagster.postgres.yaml"


def test_main_job_on_postgres_profile(two_broadcasts, postgres_database, tmp_path, monkeypatch):  # noqa: F811
    url = sa.engine.make_url(postgres_database)
    monkeypatch.setenv("DAGSTER_PG_USERNAME", url.username or "root")
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", url.password or "")
    monkeypatch.setenv("DAGSTER_PG_HOST", url.host or "127.0.0.1")
    monkeypatch.setenv("DAGSTER_PG_DB", url.database)
    shutil.copy(PROFILE, tmp_path / "dagster.yaml")
    resources = pipeline_resources(postgres_database, str(two_broadcasts.root))

    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        kpis = run_main_job(instance, resources).set_index("broadcast_id")
        partitions = instance.get_dynamic_partitions("broadcast")
        latest = instance.get_latest_materialization_event(dg.AssetKey("broadcast_kpis"))
        storage = type(instance.run_storage).__name__

    assert storage == "PostgresRunStorage"
    assert partitions == [B1, B2]
    assert latest is not None
    assert kpis.loc[B1, "revenue_during_live"] == 4000
    engine = sa.create_engine(postgres_database)
    with engine.connect() as connection:
        runs = connection.execute(sa.text("SELECT count(*) FROM runs")).scalar_one()
    engine.dispose()
    assert runs == 5
