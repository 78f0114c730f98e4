#!/usr/bin/env bash
# Create the virtual environment, install the project, and run the main job on the
# bundled real order log with simulated viewing (SQLite warehouse, local Dagster instance).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e .
.venv/bin/livecrm-demo "$@"
