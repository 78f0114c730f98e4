"""The asset page of broadcast_kpis in headless Chromium, on the operator test's deployment.

Skipped unless LIVECRM_BROWSER_TEST=1. `bash scripts/browser-test.sh` installs Chromium
and Playwright and runs it. The screenshot goes to $LIVECRM_BROWSER_ARTIFACTS
(default `.livecrm/artifacts/browser/`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_main_job import B1, two_broadcasts  # noqa: F401 - fixture reused
from tests.test_operator_path import PROJECT, deployment, first_backfill  # noqa: F401

pytestmark = pytest.mark.skipif(
    os.environ.get("LIVECRM_BROWSER_TEST") != "1",
    reason="browser test: set LIVECRM_BROWSER_TEST=1 or run scripts/browser-test.sh",
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
]
ASSET = "broadcast_kpis"
# The hand-computed KPIs of b001 (tests/test_main_job.py) as the report line starts.
REPORT_START = "6 members watched, 2 bought during the live"
PAGE_TIMEOUT_MS = 30_000
DIALOG_TIMEOUT_MS = 5_000


def artifacts_dir() -> Path:
    folder = Path(
        os.environ.get("LIVECRM_BROWSER_ARTIFACTS", PROJECT / ".livecrm" / "artifacts" / "browser")
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_asset_page_shows_partition(deployment, first_backfill):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found; install it with `apt-get install -y chromium`")
    url = f"{deployment.url}/assets/{ASSET}?view=partitions&partition={B1}"
    screenshot = artifacts_dir() / f"{ASSET}-{B1}.png"

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(url, wait_until="networkidle", timeout=PAGE_TIMEOUT_MS)
            # A first-run "Join the Dagster community" dialog covers the page on a new
            # instance until its Skip button is pressed.
            skip = page.get_by_role("button", name="Skip")
            try:
                skip.wait_for(state="visible", timeout=DIALOG_TIMEOUT_MS)
                skip.click()
            except sync_api.TimeoutError:
                pass
            heading = page.get_by_text(ASSET, exact=True).first
            heading.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
            partition = page.get_by_text(B1, exact=True).first
            partition.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
            # The metadata `report` of the partition's latest materialization.
            report = page.get_by_text(REPORT_START).first
            report.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
            page.wait_for_load_state("networkidle", timeout=PAGE_TIMEOUT_MS)
            page.screenshot(path=str(screenshot), full_page=True)
            dialog_open = skip.is_visible()
        finally:
            browser.close()

    assert screenshot.stat().st_size > 0
    assert not dialog_open, "the first-run dialog still covers the page"
