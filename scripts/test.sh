#!/usr/bin/env bash
# Create the virtual environment, install the project with its test tools, and run
# every test (storage tests run on SQLite and on PostgreSQL at 127.0.0.1:5432).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[dev]'
.venv/bin/ruff check livecrm_dagster tests
.venv/bin/pytest "$@"
