#!/usr/bin/env bash
# Run the browser test of the asset page: installs Debian's Chromium when
# /usr/bin/chromium is missing and Playwright's Python package into .venv (Playwright
# drives the system Chromium; it never downloads a browser of its own), then runs
# tests/browser with LIVECRM_BROWSER_TEST=1. Needs PostgreSQL on 127.0.0.1:5432 like
# the rest of the suite. The screenshot goes to $LIVECRM_BROWSER_ARTIFACTS
# (default .livecrm/artifacts/browser/). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PLAYWRIGHT_VERSION=1.65.2

if [ ! -x /usr/bin/chromium ]; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[dev]'
fi
.venv/bin/pip install --quiet "playwright==${PLAYWRIGHT_VERSION}"

LIVECRM_BROWSER_TEST=1 .venv/bin/pytest tests/browser "$@"
