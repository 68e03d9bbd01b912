#!/usr/bin/env bash
# The test command: installs what it needs into ./.venv, type-checks (pyproject's [tool.mypy]), then runs
# the whole suite. Any mypy error fails it before a test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
.venv/bin/python -m mypy peer collectives recovery
exec .venv/bin/python -m pytest -q "$@"
